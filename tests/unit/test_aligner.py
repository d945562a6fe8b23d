"""Aligner (arXiv 2402.02416) as a strategy, against the fake engine: the draft comes from the
policy, the answer from one corrector generation (the LoRA adapter) conditioned on the
question and the draft; both stages are counted; unknown correctors are 400s; cancelling
leaves nothing running."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fakes import WORDS, FakeEngine, WordReward, make_app

from decoding.aligner import NO_KL_WARNING, TEMPLATE, corrector_prompt
from decoding.context import DecodeContext
from decoding.errors import EngineRejected
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.types import Sampling

QUESTION = "say something nice"


def request(engine: FakeEngine, **kw) -> DecodeRequest:
    prompt = engine.tokenizer.encode(QUESTION)
    base = dict(prompt_ids=prompt, prompt_text=QUESTION, sampling=Sampling(max_tokens=6, seed=3),
                options=STRATEGIES["aligner"].Options(corrector="fixer"))
    return DecodeRequest(**{**base, **kw})


def test_template_is_the_reference_aligner_prompt():
    assert corrector_prompt(" q? ", " a. ") == (
        "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it "
        "more helpful and harmless: q? | a. ASSISTANT:")
    assert TEMPLATE.count("{question}") == TEMPLATE.count("{answer}") == 1


async def test_draft_then_correction_with_the_adapter_and_both_counted():
    engine = FakeEngine(seed=1)
    pieces: list[str] = []
    r = await STRATEGIES["aligner"].run(request(engine, emit=pieces.append), DecodeContext(engine))
    (draft_prompt, _, draft_s), (corr_prompt, _, corr_s) = engine.calls
    assert draft_s.adapter is None and corr_s.adapter == "fixer"
    assert draft_prompt == engine.tokenizer.encode(QUESTION)
    # the corrector prompt is the template around the question and the draft's text
    text = engine.tokenizer.decode(corr_prompt).strip()
    assert text.startswith("BEGINNING OF CONVERSATION: USER: Edit the following")
    assert f": {QUESTION} | " in text and text.endswith("ASSISTANT:")
    assert r.extra["draft_tokens"] >= 1 and r.extra["correction_tokens"] == len(r.sample.token_ids)
    assert r.generated_tokens == r.extra["draft_tokens"] + r.extra["correction_tokens"]
    assert r.generated_tokens == engine.generated_tokens  # every generated token counted
    assert r.kl_bound is None and r.kl_estimate is None and r.warnings == [NO_KL_WARNING]
    assert "".join(pieces) == r.sample.text and not r.sample.text.startswith(" ")
    assert r.sample.text.split() == [WORDS[t] for t in r.sample.token_ids]
    assert r.extra["correct_generate_s"] >= 0 and r.extra["draft_generate_s"] >= 0
    assert r.candidates is None and r.reward is None and engine.active == 0


async def test_draft_text_reaches_the_corrector_prompt():
    engine = FakeEngine(seed=2)
    r = await STRATEGIES["aligner"].run(request(engine, return_candidates=True),
                                        DecodeContext(engine))
    draft, corrected = r.candidates
    assert corrected.sample is r.sample
    expected = engine.tokenizer.encode(corrector_prompt(QUESTION, draft.sample.text))
    assert engine.calls[1][0] == expected


async def test_reward_scores_draft_and_correction():
    engine = FakeEngine(seed=4)
    req = request(engine, objective=Objective(WordReward("good")), return_candidates=True)
    r = await STRATEGIES["aligner"].run(req, DecodeContext(engine))
    draft, corrected = r.candidates
    assert r.reward == corrected.reward == r.sample.text.split().count("good")
    assert r.extra["draft_reward"] == draft.reward == draft.sample.text.split().count("good")
    assert r.scored_candidates == 2


async def test_corrector_max_tokens_is_clipped_to_the_context_left():
    engine = FakeEngine(seed=5, max_model_len=80, full_length=True)
    r = await STRATEGIES["aligner"].run(request(engine, sampling=Sampling(max_tokens=30)),
                                        DecodeContext(engine))
    prompt_len = len(engine.calls[1][0])
    assert engine.calls[1][2].max_tokens == 80 - prompt_len < 30
    assert len(r.sample.token_ids) == 80 - prompt_len
    tight = FakeEngine(seed=5, max_model_len=40, full_length=True)
    with pytest.raises(EngineRejected):
        await STRATEGIES["aligner"].run(request(tight, sampling=Sampling(max_tokens=20)),
                                        DecodeContext(tight))
    assert tight.active == 0


async def test_cancelling_during_the_correction_aborts_it():
    engine = FakeEngine(seed=6, full_length=True)
    reached = asyncio.Event()
    hold = asyncio.Event()

    async def before_token(rec):
        if rec["tokens"] == 2:
            reached.set()
            await hold.wait()

    engine.before_token = before_token
    task = asyncio.ensure_future(STRATEGIES["aligner"].run(request(engine), DecodeContext(engine)))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.active == 0 and engine.sequences[-1]["end"] == "cancelled"


async def test_cancelling_during_the_draft_starts_no_correction():
    engine = FakeEngine(seed=7)
    engine.gate = asyncio.Event()
    task = asyncio.ensure_future(STRATEGIES["aligner"].run(request(engine), DecodeContext(engine)))
    while engine.active == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.active == 0 and engine.cancelled == 1 and engine.sequences == []


# ---------------------------------------------------------------- over HTTP

@pytest.fixture
async def aligner_client():
    engine = FakeEngine(seed=11)
    app = make_app(engine)
    app.state.runtime.adapters["fixer"] = "/adapters/fixer"
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c, engine


BODY = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "seed": 1,
        "alignment": {"strategy": "aligner", "corrector": "fixer", "reward": "good_count",
                      "return_candidates": True}}


async def test_unknown_or_missing_corrector_is_a_400_naming_the_field(aligner_client):
    client, engine = aligner_client
    for corrector in ("nope", None):
        body = {**BODY, "alignment": {**BODY["alignment"], "corrector": corrector}}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "alignment.corrector" and err["type"] == "invalid_request_error"
        assert "fixer" in err["message"]
    assert engine.calls == []


async def test_aligner_over_http_reports_both_stages(aligner_client):
    client, engine = aligner_client
    r = await client.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    a = choice["alignment"]
    assert a["strategy"] == "aligner" and a["corrector"] == "fixer"
    assert a["kl_bound"] is None and a["kl_estimate"] is None and NO_KL_WARNING in a["warnings"]
    assert a["generated_tokens"] == a["draft_tokens"] + a["correction_tokens"]
    assert [c["tokens"] for c in a["candidates"]] == [a["draft_tokens"], a["correction_tokens"]]
    assert a["candidates"][1]["text"] == choice["message"]["content"]
    assert r.json()["usage"]["completion_tokens"] == a["correction_tokens"]
    assert [c[2].adapter for c in engine.calls] == [None, "fixer"]


async def test_aligner_streams_the_correction(aligner_client):
    client, _ = aligner_client
    events = []
    async with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    last = chunks[-1]["choices"][0]
    assert last["alignment"]["candidates"][1]["text"] == text and text
    assert last["finish_reason"] in ("stop", "length")


async def test_budget_counts_draft_and_correction():
    """2 generations of max_tokens per answer: a budget that fits one but not two refuses."""
    app = make_app(FakeEngine(seed=3), max_request_tokens=100)
    app.state.runtime.adapters["fixer"] = "/adapters/fixer"
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.post("/v1/chat/completions", json={**BODY, "max_tokens": 60})
        assert r.status_code == 400 and r.json()["error"]["code"] == "token_budget_exceeded"
        r = await client.post("/v1/chat/completions", json={**BODY, "max_tokens": 50})
        assert r.status_code == 200, r.text
