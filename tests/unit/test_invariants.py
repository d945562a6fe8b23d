"""Property-based invariants of every strategy, with the fake engine (hypothesis).

For random n, N, α, K, M, max_tokens, stop strings, seeds and temperatures, every answer must be
what its accounting says: the chosen answer is one of the candidates, kl_estimate ≤ kl_bound,
generated_tokens counts every candidate's tokens, the text is the decoding of the returned ids
(cut at the first stop string, as the engine cuts it), the engine calls of one request draw
from pairwise disjoint seeds, and the same seed gives the same answer.
"""

from __future__ import annotations

import asyncio

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoding.protocols import DecodeContext, DecodeRequest, Objective, Sampling
from decoding.strategies import STRATEGIES
from tests.unit.fakes import FakeEngine, FakeFudgeHead, WordReward, make_app

FAST = settings(max_examples=100, deadline=None, derandomize=True,  # the same cases every run
                suppress_health_check=[HealthCheck.function_scoped_fixture])
STOPS = st.lists(st.sampled_from(["good", "d b", " nice ok", "meh"]), max_size=2, unique=True)


def cut_at_stop(text: str, stops) -> str:
    hits = [text.find(s) for s in stops if s in text]
    return text[:min(hits)] if hits else text


def request(strategy: str, n: int, max_tokens: int, stop, seed, temperature, options=None,
            value=None) -> DecodeRequest:
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, stop=tuple(stop),
                        seed=seed)
    return DecodeRequest(prompt_ids=[1, 2], prompt_text="hi", sampling=sampling, n=n,
                         objective=Objective(WordReward(), WordReward("bad", "bad_count"), 0.5),
                         return_candidates=True, seed=seed, value=value,
                         options=STRATEGIES[strategy].Options.model_validate(options or {}))


def run(strategy: str, req: DecodeRequest, engine: FakeEngine):
    return asyncio.run(STRATEGIES[strategy].run(req, DecodeContext(engine)))


def check_answer(res, req: DecodeRequest, engine: FakeEngine) -> None:
    s = res.sample
    assert s.text == cut_at_stop(engine.decode(s.token_ids), req.sampling.stop)
    assert len(s.logprobs) == len(s.token_ids) <= req.sampling.max_tokens
    # the ids end at the token that completes a stop string: nothing after it is returned
    before_last = engine.decode(s.token_ids[:-1])
    assert cut_at_stop(before_last, req.sampling.stop) == before_last
    if res.kl_estimate is not None:
        assert 0 <= res.kl_estimate <= res.kl_bound
    assert res.generated_tokens >= len(s.token_ids)


def check_seeds_disjoint(engine: FakeEngine) -> None:
    assert len(engine.child_seeds) == len(set(engine.child_seeds))


@FAST
@given(strategy=st.sampled_from(["best_of_n", "soft_best_of_n"]), n=st.integers(1, 6),
       max_tokens=st.integers(1, 12), stop=STOPS, seed=st.integers(0, 2**40),
       temperature=st.floats(0.2, 2.0))
def test_selection_among_iid_candidates(strategy, n, max_tokens, stop, seed, temperature):
    req = request(strategy, n, max_tokens, stop, seed, temperature)
    engine = FakeEngine()
    res = run(strategy, req, engine)
    check_answer(res, req, engine)
    assert any(c.sample is res.sample for c in res.candidates)  # chosen ∈ candidates
    assert len(res.candidates) == n
    assert res.generated_tokens == sum(len(c.sample.token_ids) for c in res.candidates)
    assert res.generated_tokens == engine.generated_tokens
    check_seeds_disjoint(engine)
    again = run(strategy, req, FakeEngine(seed=99))  # another engine state, the same seed
    assert again.sample.token_ids == res.sample.token_ids


@FAST
@given(k=st.integers(1, 5), block=st.integers(1, 6), max_tokens=st.integers(1, 20), stop=STOPS,
       seed=st.integers(0, 2**40), temperature=st.floats(0.2, 2.0), head=st.booleans())
def test_blockwise_accounting(k, block, max_tokens, stop, seed, temperature, head):
    req = request("blockwise_cd", k, max_tokens, stop, seed, temperature,
                  {"block_tokens": block}, FakeFudgeHead() if head else None)
    engine = FakeEngine()
    res = run("blockwise_cd", req, engine)
    check_answer(res, req, engine)
    assert res.generated_tokens == engine.generated_tokens  # all K candidates of every block
    assert res.extra["blocks"] <= -(-max_tokens // block)
    check_seeds_disjoint(engine)
    again = run("blockwise_cd", request("blockwise_cd", k, max_tokens, stop, seed, temperature,
                                        {"block_tokens": block},
                                        FakeFudgeHead() if head else None), FakeEngine(seed=5))
    assert again.sample.token_ids == res.sample.token_ids


@FAST
@given(n=st.integers(1, 8), alpha=st.floats(0.0, 0.9), decision=st.integers(1, 6),
       growth=st.floats(1.0, 3.0), max_tokens=st.integers(1, 16), stop=STOPS,
       seed=st.integers(0, 2**40), temperature=st.floats(0.2, 2.0))
def test_speculative_rejection_accounting(n, alpha, decision, growth, max_tokens, stop, seed,
                                          temperature):
    options = {"alpha": alpha, "decision_tokens": decision, "growth": growth}
    req = request("speculative_rejection", n, max_tokens, stop, seed, temperature, options)
    engine = FakeEngine()
    res = run("speculative_rejection", req, engine)
    check_answer(res, req, engine)
    assert any(c.sample is res.sample for c in res.candidates) and len(res.candidates) == n
    # every candidate's tokens, and those generated after a decision point before the abort
    assert res.generated_tokens >= sum(len(c.sample.token_ids) for c in res.candidates)
    assert res.generated_tokens == engine.generated_tokens  # aborted tracks' tokens included
    assert res.kl_estimate is None
    check_seeds_disjoint(engine)
    again = run("speculative_rejection",
                request("speculative_rejection", n, max_tokens, stop, seed, temperature, options),
                FakeEngine(seed=3))
    assert again.sample.token_ids == res.sample.token_ids


@settings(max_examples=15, deadline=None, derandomize=True)
@given(choices=st.integers(1, 3), n=st.integers(1, 4), seed=st.integers(0, 2**40),
       strategy=st.sampled_from(["none", "best_of_n", "blockwise_cd"]))
def test_api_usage_and_choice_seeds(choices, n, seed, strategy):
    """Through the app: usage counts the returned ids, and the choices of one seeded request
    draw from disjoint seeds (choice c of best-of-n starts at seed + c·n)."""
    engine = FakeEngine()
    body = {"prompt": "hi", "max_tokens": 6, "n": choices, "seed": seed,
            "alignment": {"strategy": strategy, "n": n, "return_candidates": True,
                          # an option of blockwise_cd only: another strategy refuses it
                          **({"block_tokens": 3} if strategy == "blockwise_cd" else {})}}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)),
                                     base_url="http://t") as c:
            return await c.post("/v1/completions", json=body)

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    doc = r.json()
    returned = 0
    for ch in doc["choices"]:
        a = ch["alignment"]
        if a["candidates"]:
            chosen = [c for c in a["candidates"] if c["text"] == ch["text"]]
            assert chosen, "the chosen answer is one of the candidates"
            returned += chosen[0]["tokens"]
        else:
            returned += len(engine.tokenizer.encode(ch["text"]))
        if a["kl_estimate"] is not None:
            assert 0 <= a["kl_estimate"] <= a["kl_bound"]
    assert doc["usage"]["completion_tokens"] == returned
    check_seeds_disjoint(engine)


class Scripted(FakeEngine):
    """Returns the given blocks (word lists) in order, K copies each."""

    def __init__(self, blocks: list[list[str]]) -> None:
        super().__init__()
        self.blocks = [[self.tokenizer.vocab[w] for w in b] for b in blocks]

    async def generate(self, prompt_ids, n, sampling):
        from decoding.protocols import Sample

        ids = self.blocks.pop(0)
        self.generated_tokens += n * len(ids)
        return [Sample(list(ids), self.decode(ids), [-0.5] * len(ids),
                       "length" if len(ids) == sampling.max_tokens else "stop")
                for _ in range(n)]


def test_a_stop_string_across_two_blocks_ends_the_ids_where_it_completes():
    engine = Scripted([["ok", "nice", "good"], ["bad", "ok", "fine"]])
    req = request("blockwise_cd", 2, 6, ["d b"], None, 1.0, {"block_tokens": 3})
    res = run("blockwise_cd", req, engine)
    good, bad = engine.tokenizer.vocab["good"], engine.tokenizer.vocab["bad"]
    ok, nice = engine.tokenizer.vocab["ok"], engine.tokenizer.vocab["nice"]
    assert res.sample.text == " ok nice goo" and res.sample.finish_reason == "stop"
    assert res.sample.token_ids == [ok, nice, good, bad]
    assert res.sample.logprobs == [-0.5] * 4  # ε covers the returned tokens only
    assert res.kl_estimate <= res.kl_bound
