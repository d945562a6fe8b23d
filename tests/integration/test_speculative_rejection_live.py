"""Speculative rejection on the real engine: token-exact decisions, the best candidate returned,
one engine request per track, and nothing left running after a client leaves."""

from __future__ import annotations

import math
import threading

import httpx
import pytest
from live import wait_until

from runtime.model_prep import embedded_model_dir
from runtime.settings import EngineSettings

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "Give me three tips for sleeping better."}]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir(EngineSettings().home))


def spr(client, model_name, **kw):
    alignment = {"strategy": "speculative_rejection", "n": 8, "alpha": 0.5, "decision_tokens": 8,
                 "return_candidates": True, **kw.pop("alignment", {})}
    return client.chat.completions.create(model=model_name, messages=ASK, max_tokens=48,
                                          temperature=1.0, extra_body={"alignment": alignment},
                                          **kw)


def test_rounds_are_token_exact(client, model_name, tokenizer):
    r = spr(client, model_name)
    a = r.model_extra["alignment"]
    assert a["rounds"] >= 2 and sum(a["rejected"]) > 0
    for c in a["candidates"]:
        ids = c["token_ids"]
        assert c["tokens"] == len(ids) <= 48
        # The text of every candidate, stitched from several engine calls, is exactly the
        # decoding of its ids: nothing dropped or duplicated at a decision point.
        assert tokenizer.decode(ids, skip_special_tokens=True) == c["text"]
    chosen = next(c for c in a["candidates"] if c["text"] == r.choices[0].message.content)
    assert tokenizer.decode(chosen["token_ids"], skip_special_tokens=True) == \
        r.choices[0].message.content
    # Greedy re-tokenisation of the text gives back the ids whenever the model sampled the
    # canonical segmentation (it may not: tokenisation is not injective); the chosen answer's
    # ids must decode to its text either way.
    assert tokenizer.decode(chosen["token_ids"], skip_special_tokens=True) == chosen["text"]
    finished = [c for c in a["candidates"] if c["finish_reason"] is not None]
    assert chosen in finished and len(finished) >= 8 - sum(a["rejected"])  # rejected: null
    assert a["reward"] == max(c["reward"] for c in finished)
    # Every token the engine produced is counted, the rejected ones' too.
    assert a["generated_tokens"] == sum(c["tokens"] for c in a["candidates"])
    assert a["generated_tokens"] < 8 * 48
    assert a["kl_bound"] == pytest.approx(math.log(8)) and a["kl_estimate"] is None


def test_streaming_and_choices(client, model_name):
    stream = spr(client, model_name, n=2, stream=True, alignment={"alpha": 0.75})
    chunks = list(stream)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(c.choices[0].index for c in finals) == [0, 1]
    for c in finals:
        assert c.model_extra["alignment"]["strategy"] == "speculative_rejection"
        assert c.model_extra["alignment"]["rounds"] >= 1


def test_seeded_answers_are_reproducible(client, model_name):
    a, b = (spr(client, model_name, seed=4321, alignment={"n": 6}) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    ca, cb = (x.model_extra["alignment"]["candidates"] for x in (a, b))
    assert [c["finish_reason"] for c in ca] == [c["finish_reason"] for c in cb]
    assert len({tuple(c["token_ids"][:8]) for c in ca}) > 1  # tracks' seeds differ


def test_seeded_tracks_are_the_best_of_n_candidates(client, model_name):
    """Track i is seeded seed + i, the seed vLLM gives child i of one n = N request: with the
    same request seed, speculative rejection's tracks are best-of-N's candidates, each cut where
    it was rejected (a paired comparison of the two strategies)."""
    s = spr(client, model_name, seed=77, alignment={"n": 6})
    b = client.chat.completions.create(
        model=model_name, messages=ASK, max_tokens=48, temperature=1.0, seed=77,
        extra_body={"alignment": {"strategy": "best_of_n", "n": 6, "return_candidates": True}})
    tracks = [c["token_ids"] for c in s.model_extra["alignment"]["candidates"]]
    candidates = [c["token_ids"] for c in b.model_extra["alignment"]["candidates"]]
    assert len(tracks) == len(candidates) == 6
    assert sum(s.model_extra["alignment"]["rejected"]) > 0  # some tracks were cut
    for track, candidate in zip(tracks, candidates):
        assert candidate[:len(track)] == track


def test_client_gone_mid_flight_leaves_no_engine_request(server):
    """A long SpR answer whose client leaves after a few seconds: every live track's engine
    request is aborted (`unfinished engine requests` back to 0)."""
    body = {"prompt": "Here is a very long story about dragons, told in great detail:",
            "max_tokens": 600, "temperature": 1.0,
            "alignment": {"strategy": "speculative_rejection", "n": 8, "alpha": 0.5,
                          "decision_tokens": 8}}
    before = server.metric("alignserve:engine_aborts_total")
    outcome = []

    def leave_early():
        try:
            httpx.post(f"{server.base_url}/v1/completions", json=body,
                       timeout=httpx.Timeout(4.0, connect=5.0))
            outcome.append("answered")
        except httpx.ReadTimeout:
            outcome.append("left")

    client = threading.Thread(target=leave_early)
    client.start()
    assert wait_until(lambda: server.metric("alignserve:engine_requests_unfinished") >= 2, 30)
    client.join(60)
    assert outcome == ["left"]
    assert wait_until(lambda: server.metric("alignserve:engine_requests_unfinished") == 0, 10), \
        "engine request still running"
    # the tracks rejected at decision points and the survivors the disconnect stopped
    assert wait_until(lambda: server.metric("alignserve:engine_aborts_total") >= before + 2, 5)
