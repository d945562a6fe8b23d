"""VllmEngine's streaming calls over a stand-in for vLLM's output stream: every call builds its
deltas in one place, and closing a stream early closes the engine request's generator at once
(its abort runs now, not when the garbage collector gets to it)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from decoding.types import Sampling, Tilt  # noqa: E402
from runtime import engine as engine_mod  # noqa: E402
from runtime.engine import VllmEngine  # noqa: E402


def fake_engine(steps: int, log: list[str]) -> VllmEngine:
    eng = object.__new__(VllmEngine)
    eng.tilt_heads = frozenset({"value:q"})
    eng._tilt_dir = "unused"
    eng.model_path = eng._weights = "/models/base"  # the base policy is loaded
    eng._params = lambda n, sampling, kind: SimpleNamespace(n=n, extra_args=None)

    async def run(prompt_ids, params, adapter=None):
        log.append("start")
        try:
            for k in range(steps):
                last = k == steps - 1
                yield SimpleNamespace(outputs=[SimpleNamespace(
                    index=0, token_ids=[k], text=f" w{k}", logprobs=None,
                    finish_reason="length" if last else None)])
        finally:
            log.append("closed")

    eng._run = run
    return eng


async def collect(gen, stop_after: int | None = None) -> list:
    out = []
    async for d in gen:
        out.append(d)
        if stop_after is not None and len(out) == stop_after:
            await gen.aclose()
            break
    return out


@pytest.mark.parametrize("call", ["stream", "stream_sequence"])
def test_stream_yields_one_delta_per_engine_output(call):
    log: list[str] = []
    eng = fake_engine(3, log)
    deltas = asyncio.run(collect(getattr(eng, call)([1, 2], Sampling(max_tokens=3))))
    assert [(d.index, d.token_ids, d.text, d.finish_reason) for d in deltas] == [
        (0, [0], " w0", None), (0, [1], " w1", None), (0, [2], " w2", "length")]
    assert log == ["start", "closed"]


@pytest.mark.parametrize("call", ["stream", "stream_sequence", "tilted"])
def test_closing_early_closes_the_engine_request_now(call, monkeypatch):
    monkeypatch.setattr(engine_mod, "drop_steps", lambda folder, key: None)
    log: list[str] = []
    eng = fake_engine(5, log)
    args = ([1], Sampling(max_tokens=5)) + ((Tilt("value:q", 1.0),) if call == "tilted" else ())

    async def first_then_close():
        gen = getattr(eng, call)(*args)
        got = await collect(gen, stop_after=1)
        return got, list(log)  # what had run by the time aclose() returned

    got, seen = asyncio.run(first_then_close())
    assert len(got) == 1 and seen == ["start", "closed"]


def test_tilted_attaches_the_step_records_to_the_finishing_delta(monkeypatch):
    monkeypatch.setattr(engine_mod, "read_steps", lambda folder, key: ([0.1, 0.2], [1.0, 1.0]))
    monkeypatch.setattr(engine_mod, "drop_steps", lambda folder, key: None)
    eng = fake_engine(2, [])
    deltas = asyncio.run(collect(eng.tilted([1], Sampling(max_tokens=2, top_logprobs=2),
                                            Tilt("value:q", 1.0))))
    assert [(d.step_kl, d.step_kl_bound, d.top_logprobs) for d in deltas] == [
        (None, None, None), ([0.1, 0.2], [1.0, 1.0], None)]


def test_a_tilt_may_read_the_policys_logits_only_on_the_bare_base_weights(monkeypatch):
    """`policy_logits` (heads/incremental.py reads h back from the logits): only while the base
    checkpoint is loaded, and without an adapter or a logit_bias on the request."""
    monkeypatch.setattr(engine_mod, "drop_steps", lambda folder, key: None)
    eng = fake_engine(1, [])
    inner, marks = eng._run, []

    async def run(prompt_ids, params, adapter=None):
        marks.append(params.extra_args["cdq"].get("policy_logits", False))
        async for out in inner(prompt_ids, params, adapter):
            yield out

    eng._run = run
    cases = [(Sampling(max_tokens=1), "/models/base"),
             (Sampling(max_tokens=1, adapter="tuned-lora"), "/models/base"),
             (Sampling(max_tokens=1, logit_bias=((5, 2.0),)), "/models/base"),
             (Sampling(max_tokens=1), "/models/safedpo"),  # a swapped-in checkpoint
             (Sampling(max_tokens=1), None)]  # a reload that failed
    for sampling, weights in cases:
        eng._weights = weights
        asyncio.run(collect(eng.tilted([1], sampling, Tilt("value:q", 1.0))))
    assert marks == [True, False, False, False, False]
