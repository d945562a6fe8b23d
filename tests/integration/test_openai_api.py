"""The real engine and model through the official `openai` SDK."""

from __future__ import annotations

import math

import httpx
import pytest

from decoding.kl import bon_kl_bound, bon_kl_estimate, selection_kl_bound

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_chat(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=24)
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completions(client, model_name):
    r = client.completions.create(model=model_name, prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens <= 8


def test_stream_with_usage(client, model_name):
    stream = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=24, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # streamed token by token
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens >= len(pieces)


def test_two_choices(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=16, n=2)
    assert [c.index for c in r.choices] == [0, 1]


def test_two_streamed_choices(client, model_name):
    chunks = list(client.completions.create(model=model_name, prompt="Once upon a time",
                                            max_tokens=16, n=2, stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts[0] and texts[1] and texts[0] != texts[1]
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 2


def test_seed_is_reproducible(client, model_name):
    kw = dict(model=model_name, messages=HELLO, max_tokens=16, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_best_of_n_returns_the_best_candidate(client, model_name):
    n = 6
    r = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=32, temperature=0.9, top_p=0.95,
        extra_body={"alignment": {"strategy": "best_of_n", "n": n, "reward": "relevance",
                                  "return_candidates": True}})
    a = r.model_extra["alignment"]
    cands = a["candidates"]
    assert len(cands) == n and a["scored_candidates"] == n
    text = r.choices[0].message.content
    chosen = next(c for c in cands if c["text"] == text)  # the answer is one of the candidates
    assert a["reward"] == max(c["reward"] for c in cands) == chosen["reward"]
    assert a["kl_bound"] == pytest.approx(bon_kl_bound(n))
    assert a["kl_estimate"] == pytest.approx(bon_kl_estimate(n, chosen["logprob"]))
    assert 0 <= a["kl_estimate"] <= a["kl_bound"]
    assert all(c["logprob"] < 0 for c in cands)
    assert a["win_rate_bound"] == pytest.approx(n / (n + 1))
    assert a["generated_tokens"] == sum(c["tokens"] for c in cands)
    assert r.usage.completion_tokens == chosen["tokens"]
    assert len({c["text"] for c in cands}) > 1  # i.i.d. draws, not copies


def test_best_of_n_with_cost_and_seeded_candidates_differ(client, model_name):
    r = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=24, seed=7,
        extra_body={"alignment": {"strategy": "best_of_n", "n": 4, "reward": "sentiment",
                                  "cost": "profanity", "cost_weight": 2.0,
                                  "return_candidates": True}})
    cands = r.model_extra["alignment"]["candidates"]
    assert len({c["text"] for c in cands}) > 1  # per-candidate seeds differ
    scores = [c["reward"] - 2.0 * c["cost"] for c in cands]
    assert r.choices[0].message.content == cands[scores.index(max(scores))]["text"]
    assert all(0 <= c["cost"] <= 1 for c in cands)


def test_seeded_choices_draw_disjoint_candidates(client, model_name):
    """Choice c of a seeded best-of-6 starts at seed + 6c: before, choice 1 used seeds
    s+1..s+6 and shared 5 of its 6 candidates with choice 0."""
    r = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=16, temperature=1.0, seed=7, n=2,
        extra_body={"alignment": {"strategy": "best_of_n", "n": 6, "return_candidates": True}})
    by_choice = [{tuple(c["token_ids"]) for c in ch.model_extra["alignment"]["candidates"]}
                 for ch in sorted(r.choices, key=lambda ch: ch.index)]
    assert len(by_choice[0]) > 1 and not by_choice[0] & by_choice[1]


def test_soft_best_of_n_and_length_reward(client, model_name):
    r = client.completions.create(
        model=model_name, prompt="Once upon a time", max_tokens=24,
        extra_body={"alignment": {"strategy": "soft_best_of_n", "n": 4, "reward": "length",
                                  "temperature": 0.1, "return_candidates": True}})
    a = r.model_extra["alignment"]
    assert a["strategy"] == "soft_best_of_n" and a["kl_estimate"] is None
    assert a["kl_bound"] == pytest.approx(selection_kl_bound(4))
    assert r.choices[0].text in {c["text"] for c in a["candidates"]}


def test_aligned_stream_puts_alignment_in_the_last_chunk(client, model_name):
    stream = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=24, stream=True, n=2,
        stream_options={"include_usage": True},
        extra_body={"alignment": {"strategy": "best_of_n", "n": 3}})
    chunks = list(stream)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(c.choices[0].index for c in finals) == [0, 1]
    for c in finals:
        assert c.model_extra["alignment"]["n"] == 3
        assert c.model_extra["alignment"]["kl_bound"] == pytest.approx(bon_kl_bound(3))
    texts = {}
    for c in chunks:
        if c.choices and c.choices[0].delta.content:
            texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].delta.content
    assert set(texts) == {0, 1}
    assert chunks[-1].usage.completion_tokens > 0


def test_concurrent_requests_are_batched(server, model_name):
    import concurrent.futures as cf

    def one(i):
        return httpx.post(f"{server.base_url}/v1/chat/completions", timeout=300, json={
            "model": model_name, "max_tokens": 16,
            "messages": [{"role": "user", "content": f"Count to {i}."}],
            "alignment": {"strategy": "best_of_n", "n": 2}}).status_code

    with cf.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [200] * 8


def test_metrics_show_alignment_and_vllm(server, client, model_name):
    client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=8,
                                   extra_body={"alignment": {"strategy": "best_of_n", "n": 2}})
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("alignserve:requests_total", "alignserve:kl_bound_bucket",
                 "alignserve:kl_estimate_bucket", "alignserve:chosen_reward_bucket",
                 "alignserve:generated_tokens_total", "alignserve:generate_latency_seconds_bucket",
                 "alignserve:score_latency_seconds_bucket", "alignserve:requests_in_flight",
                 "vllm:"):
        assert name in text, name
    assert server.metric('alignserve:requests_total{endpoint="chat",strategy="best_of_n"}') >= 1
    assert math.isfinite(server.metric("alignserve:engine_requests_unfinished"))
