"""blockwise_cd and tokenwise_cd (Mudgal et al. 2024) against the fakes: block choice, tilt,
KL accounting, stopping, streaming of committed text, aborts, and the HTTP edge."""

import asyncio
import json
import math
import time
from collections import Counter

import httpx
import pytest
from fakes import EOS, WORDS, FakeEngine, FakeFudgeHead, FakeQHead, WordReward, make_app

from decoding.context import DecodeContext
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.tokenwise_cd import tilt
from decoding.types import Sample, Sampling

BLOCKWISE, TOKENWISE = STRATEGIES["blockwise_cd"], STRATEGIES["tokenwise_cd"]
PROMPT = [101, 102, 103]


class Recording(FakeEngine):
    """Keeps every call's candidates, to check which block was chosen."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.outputs: list[list[Sample]] = []

    async def generate(self, prompt_ids, n, sampling):
        out = await super().generate(prompt_ids, n, sampling)
        self.outputs.append([Sample(list(s.token_ids), s.text, list(s.logprobs), s.finish_reason)
                             for s in out])
        return out


def blockwise(k=4, block=8, max_tokens=20, value=None, stop=(), emit=None, seed=None):
    return DecodeRequest(PROMPT, "p", Sampling(max_tokens=max_tokens, stop=stop, seed=seed), n=k,
                         objective=Objective(WordReward()), options=BLOCKWISE.Options(block_tokens=block),
                         value=value, emit=emit)


def tokenwise(q, top_k=3, lam=1.0, max_tokens=1, seed=0, stop=(), emit=None, objective=None):
    return DecodeRequest(PROMPT, "p", Sampling(max_tokens=max_tokens, stop=stop), n=1,
                         objective=objective, seed=seed, value=q,
                         options=TOKENWISE.Options(top_k=top_k, lambda_=lam), emit=emit)


# ------------------------------------------------------------------------------ blockwise


async def test_blockwise_appends_the_highest_value_block_each_time():
    engine, head = Recording(full_length=True, seed=3), FakeFudgeHead(tok=0)
    res = await BLOCKWISE.run(blockwise(k=4, block=8, max_tokens=20, value=head),
                              DecodeContext(engine))
    assert [s.max_tokens for _, _, s in engine.calls] == [8, 8, 4]
    accepted: list[int] = []
    seen = iter(head.seen)
    for (prompt_ids, n, _), cands in zip(engine.calls, engine.outputs):
        # each block continues the exact accepted ids; n = K candidates in one call
        assert prompt_ids == PROMPT + accepted and n == 4
        partials = [next(seen) for _ in cands]
        # the value head saw the exact ids prefix + block (never re-tokenised text)
        assert partials == [accepted + c.token_ids for c in cands]
        values = [p.count(0) for p in partials]
        accepted += cands[values.index(max(values))].token_ids
    assert res.sample.token_ids == accepted and res.sample.finish_reason == "length"
    assert res.sample.text == engine.decode(accepted)
    assert res.extra["blocks"] == 3 and res.generated_tokens == 4 * 20
    assert res.scored_candidates == 12
    assert res.kl_bound == pytest.approx(3 * (math.log(4) - 3 / 4))
    assert 0 <= res.kl_estimate <= res.kl_bound + 1e-9
    assert res.reward == res.sample.text.split().count("good")  # the objective's, on the answer


async def test_blockwise_aligns_its_cuts_to_the_engines_kv_blocks():
    engine = Recording(full_length=True, seed=1)
    engine.block_size = 32  # a paged-KV engine: only whole 32-token blocks are prefix-cached
    prompt = list(range(200, 240))  # 40 prompt tokens
    req = DecodeRequest(prompt, "p", Sampling(max_tokens=64), n=4,
                        objective=Objective(WordReward()), options=BLOCKWISE.Options(block_tokens=16))
    res = await BLOCKWISE.run(req, DecodeContext(engine))
    # first block lengthened to 25 (never shortened: still ≤ ⌈64 / 16⌉ blocks), then M
    assert [s.max_tokens for _, _, s in engine.calls] == [25, 16, 16, 7]
    lengths = [len(p) for p, _, _ in engine.calls]
    # resubmitted prefixes 1 past a KV-block boundary every other block (gcd(16, 32) = 16):
    # the children recompute 1 token there instead of up to 32
    assert [n % 32 for n in lengths[1:]] == [1, 17, 1]
    assert res.extra["blocks"] == 4 and len(res.sample.token_ids) == 64
    assert res.kl_bound == pytest.approx(4 * (math.log(4) - 3 / 4))


class Counting(WordReward):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def score(self, prompt, responses):
        self.calls += 1
        return super().score(prompt, responses)


async def test_blockwise_reuses_the_last_blocks_reward_as_the_answers():
    reward = Counting()
    req = DecodeRequest(PROMPT, "p", Sampling(max_tokens=20), n=4,
                        objective=Objective(reward), options=BLOCKWISE.Options(block_tokens=8))
    res = await BLOCKWISE.run(req, DecodeContext(FakeEngine(full_length=True, seed=3)))
    assert res.extra["blocks"] == 3 and reward.calls == 3  # no fourth call for the answer
    assert res.reward == res.sample.text.split().count("good")
    # with a separate value, the objective scores the answer once more
    head = FakeFudgeHead(tok=0)
    req.value, reward.calls = head, 0
    res = await BLOCKWISE.run(req, DecodeContext(FakeEngine(full_length=True, seed=3)))
    assert reward.calls == 1 and res.reward == res.sample.text.split().count("good")


async def test_blockwise_defaults_to_the_reward_on_partial_text():
    engine = Recording(full_length=True, seed=8)
    res = await BLOCKWISE.run(blockwise(k=3, block=5, max_tokens=10), DecodeContext(engine))
    prefix = ""
    for cands in engine.outputs:
        scores = [(prefix + c.text).split().count("good") for c in cands]
        prefix += cands[scores.index(max(scores))].text
    assert res.sample.text == prefix and res.extra["value"] == "good_count"


class Scripted(FakeEngine):
    """Returns `blocks[i]` (a list of (ids, finish) per candidate) on the i-th call."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = blocks

    async def generate(self, prompt_ids, n, sampling):
        await super().generate(prompt_ids, n, sampling)
        return [Sample(list(ids), self.decode(ids), [-1.0] * len(ids), fin)
                for ids, fin in self.blocks[len(self.calls) - 1]]


async def test_blockwise_stops_at_eos_and_counts_every_candidate():
    engine = Scripted([[([0, 1], "length"), ([1, 1], "length")],
                       [([0, EOS], "stop"), ([1], "stop")]])
    res = await BLOCKWISE.run(blockwise(k=2, block=2, max_tokens=50), DecodeContext(engine))
    assert res.sample.token_ids == [0, 1, 0, EOS] and res.sample.text == " good bad good"
    assert res.sample.finish_reason == "stop" and res.extra["blocks"] == 2
    assert res.generated_tokens == 2 + 2 + 2 + 1 and len(engine.calls) == 2


async def test_blockwise_stop_string_spanning_two_blocks_truncates_the_answer():
    pieces = []
    engine = Scripted([[([2, 0], "length")], [([4, 5], "length")], [([0, 0], "length")]])
    res = await BLOCKWISE.run(blockwise(k=1, block=2, max_tokens=50, stop=("good great",),
                                        emit=pieces.append), DecodeContext(engine))
    assert res.sample.text == " nice " and res.sample.finish_reason == "stop"
    assert res.extra["blocks"] == 2 and len(engine.calls) == 2
    # nothing streamed had to be taken back: the held-back tail was never sent
    assert "".join(pieces) == res.sample.text


async def test_blockwise_emits_each_accepted_block_once_chosen():
    pieces: list[str] = []
    engine = Recording(full_length=True, seed=1)

    async def watch():  # a piece is emitted before the next block's engine call starts
        while len(engine.calls) < 3:
            await asyncio.sleep(0)
        return len(pieces)

    watcher = asyncio.create_task(watch())
    res = await BLOCKWISE.run(blockwise(k=2, block=4, max_tokens=12, emit=pieces.append),
                              DecodeContext(engine))
    assert await watcher >= 2
    assert len(pieces) == res.extra["blocks"] == 3 and "".join(pieces) == res.sample.text


# ------------------------------------------------------------------------------ tokenwise

LOGP = {0: math.log(0.5), 1: math.log(0.3), 2: math.log(0.15), 3: math.log(0.05)}
Q = {0: 0.0, 1: 1.0, 2: 2.0, 3: 5.0}


def expected(lam, k=3):
    top = sorted(LOGP, key=LOGP.get, reverse=True)[:k]
    w = [math.exp(LOGP[t] + lam * Q[t]) for t in top]
    return {t: x / sum(w) for t, x in zip(top, w)}


@pytest.mark.parametrize("lam", [0.0, 1.5])
async def test_tokenwise_samples_the_renormalised_tilt(lam):
    engine = FakeEngine()
    engine.next_logprobs = dict(LOGP)
    q, runs = FakeQHead(Q), 3000
    counts = Counter()
    for seed in range(runs):
        res = await TOKENWISE.run(tokenwise(q, top_k=3, lam=lam, seed=seed), DecodeContext(engine))
        counts[res.sample.token_ids[0]] += 1
    target = expected(lam)  # λ = 0: the policy's top-3 renormalised, token 3 never drawn
    assert set(counts) <= set(target)
    for t, p in target.items():
        assert abs(counts[t] / runs - p) < 4 * math.sqrt(p * (1 - p) / runs), (t, counts)
    # one engine call per step, max_tokens 1, asking for the top 3 log-probs
    assert all(n == 1 and s.max_tokens == 1 and s.top_logprobs == 3 for _, n, s in engine.calls)
    assert q.calls[0] == (PROMPT, [], [0, 1, 2])  # one Q call with all k candidates


async def test_tokenwise_kl_sum_matches_a_hand_computation():
    engine = FakeEngine()
    engine.next_logprobs = dict(LOGP)
    res = await TOKENWISE.run(tokenwise(FakeQHead(Q), top_k=3, lam=1.5, max_tokens=5, seed=4),
                              DecodeContext(engine))
    base = {t: p / 0.95 for t, p in zip([0, 1, 2], [0.5, 0.3, 0.15])}
    tilted = expected(1.5)
    step_kl = sum(tilted[t] * math.log(tilted[t] / base[t]) for t in base)
    # against p itself: the renormalised top-3 tilt's KL plus −log(top-3 mass) per step
    assert res.kl_estimate == pytest.approx(5 * (step_kl - math.log(0.95)))
    assert res.kl_estimate == pytest.approx(5 * sum(
        tilted[t] * math.log(tilted[t] / math.exp(LOGP[t])) for t in base))
    assert res.extra["kl_outside_top_k"] == pytest.approx(-5 * math.log(0.95))
    # FakeQHead certifies no range for its values: no bound on KL(π‖p), only the path's
    assert res.kl_bound is None
    assert res.extra["kl_path_bound"] == pytest.approx(5 * (1.5 * 2.0 - math.log(0.95)))
    assert res.generated_tokens == res.extra["steps"] == 5 and res.scored_candidates == 15
    assert res.sample.finish_reason == "length" and len(res.sample.token_ids) == 5
    # Sample.logprobs keep the policy's own log-probs, not the renormalised ones
    assert res.sample.logprobs == [LOGP[t] for t in res.sample.token_ids]
    zero = await TOKENWISE.run(tokenwise(FakeQHead(Q), lam=0.0, max_tokens=5),
                               DecodeContext(engine))
    # λ = 0 is top-k sampling: its KL against p is the outside mass alone
    assert zero.kl_estimate == pytest.approx(-5 * math.log(0.95))
    assert zero.extra["kl_path_bound"] == pytest.approx(zero.kl_estimate)


class RangedQ(FakeQHead):
    """FakeQHead that certifies its values' range (as a valuenet head clipped to its training
    targets' range does) and names its vocabulary size."""

    def __init__(self, q, value_range=(0.0, 5.0), vocab_size=4):
        super().__init__(q)
        self.value_range, self.vocab_size = value_range, vocab_size


@pytest.mark.parametrize("lam", [0.1, 1.5])
async def test_tokenwise_per_token_kl_bound_is_certified_by_the_range(lam):
    """max_tokens·(min(λR, λ²R²/8) + log(V/k)): a bound on KL(π‖p) for any path and length,
    not the path's own sum (it stays the same whatever the answer drew)."""
    engine = FakeEngine()
    engine.next_logprobs = dict(LOGP)
    res = await TOKENWISE.run(tokenwise(RangedQ(Q), top_k=3, lam=lam, max_tokens=5, seed=4),
                              DecodeContext(engine))
    step = min(lam * 5.0, (lam * 5.0) ** 2 / 8) + math.log(4 / 3)
    assert res.kl_bound == pytest.approx(5 * step)
    assert 0 <= res.kl_estimate <= res.kl_bound


class TiltingToy(FakeEngine):
    """FakeEngine with `tilted`: a uniform sample of `length` tokens, and the step records an
    engine would send (`step_kl` None: an engine that sent none)."""

    tilt_heads = frozenset({"value:q"})

    def __init__(self, step_kl=0.01, length=3):
        super().__init__(full_length=True)
        self.step_kl, self.length = step_kl, length

    async def tilted(self, prompt_ids, sampling, tilt):
        from decoding.types import SampleDelta

        n = self.length
        for k in range(n):
            last = k == n - 1
            yield SampleDelta(0, [k % 8], " " + WORDS[k % 8], [math.log(1 / 8)],
                              "stop" if last else None,
                              step_kl=[self.step_kl] * n if last and self.step_kl else None,
                              step_kl_bound=[0.5] * n if last and self.step_kl else None)


async def test_tokenwise_in_engine_bound_uses_the_budget_not_the_answer_length():
    """The answer stopped after 3 of 12 tokens; KL(π‖p) = E_π[Σ_{t<T} KLₜ] needs E_π[T], which
    a short answer does not bound: the bound is max_tokens·min(λR, λ²R²/8)."""
    req = DecodeRequest(PROMPT, "p", Sampling(max_tokens=12), n=1, value=RangedQ({}, (-1, 1)),
                        options=TOKENWISE.Options(lambda_=0.5))
    res = await TOKENWISE.run(req, DecodeContext(TiltingToy()))
    assert res.extra["in_engine"] and len(res.sample.token_ids) == 3
    assert res.kl_bound == pytest.approx(12 * min(0.5 * 2, (0.5 * 2) ** 2 / 8))
    assert res.kl_estimate == pytest.approx(0.03)
    assert res.extra["kl_path_bound"] == pytest.approx(1.5)  # Σ λ·spread: not kl_bound


async def test_tokenwise_in_engine_without_step_records_reports_no_estimate():
    req = DecodeRequest(PROMPT, "p", Sampling(max_tokens=12), n=1, value=RangedQ({}, (-1, 1)),
                        options=TOKENWISE.Options(lambda_=0.5))
    res = await TOKENWISE.run(req, DecodeContext(TiltingToy(step_kl=None)))
    assert res.kl_estimate is None and res.extra["kl_path_bound"] is None
    assert res.kl_bound is not None  # the certified bound does not need the records
    assert any("kl_estimate is null" in w for w in res.warnings)


def test_tilt_is_stable_for_extreme_values():
    probs, kl = tilt([-1e3, -1e3 - 1], [1e4, 0.0], 1e4)
    assert probs == pytest.approx([1.0, 0.0]) and kl == pytest.approx(math.log(1 + math.e ** -1))


async def test_tokenwise_stops_at_eos_and_at_stop_strings():
    engine = FakeEngine()
    engine.next_logprobs = {0: math.log(0.6), EOS: math.log(0.4)}
    q = FakeQHead({EOS: 50.0})  # the head wants the answer to end now
    res = await TOKENWISE.run(tokenwise(q, top_k=2, max_tokens=30), DecodeContext(engine))
    assert res.sample.token_ids == [EOS] and res.sample.text == ""
    assert res.sample.finish_reason == "stop"

    engine.next_logprobs = {0: 0.0}  # always "good"
    pieces: list[str] = []
    res = await TOKENWISE.run(tokenwise(FakeQHead({}), max_tokens=30, stop=("good good",),
                                        emit=pieces.append), DecodeContext(engine))
    assert res.sample.token_ids == [0, 0] and res.sample.text == " "
    assert res.sample.finish_reason == "stop" and "".join(pieces) == " "


async def test_tokenwise_emits_one_piece_per_token_and_reports_the_reward():
    engine = FakeEngine()
    engine.next_logprobs = dict(LOGP)
    pieces: list[str] = []
    res = await TOKENWISE.run(tokenwise(FakeQHead(Q), max_tokens=6, emit=pieces.append,
                                        objective=Objective(WordReward())), DecodeContext(engine))
    assert len(pieces) == 6 and "".join(pieces) == res.sample.text
    assert pieces == [" " + WORDS[t] for t in res.sample.token_ids]
    assert res.reward == res.sample.text.split().count("good")


# ------------------------------------------------------------------------------ cancellation


@pytest.mark.parametrize("make", [
    lambda: blockwise(k=4, block=4, max_tokens=16),
    lambda: tokenwise(FakeQHead(Q), max_tokens=16),
])
async def test_cancel_mid_decode_leaves_no_engine_request(make):
    engine = FakeEngine(full_length=True)
    strategy = BLOCKWISE if make().n > 1 else TOKENWISE
    task = asyncio.create_task(strategy.run(make(), DecodeContext(engine)))
    while len(engine.calls) < 2:
        await asyncio.sleep(0)
    engine.gate = asyncio.Event()  # the next engine call hangs, like a slow engine
    while engine.active < 1:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.cancelled == 1 and engine.active == 0


# ------------------------------------------------------------------------------ HTTP


def events(text: str) -> list[dict]:
    lines = [l[len("data: "):] for l in text.splitlines() if l.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(l) for l in lines[:-1]]


def app_with_heads(engine):
    app = make_app(engine)
    app.state.runtime.scorers.register(FakeQHead(Q, name="value:q"))
    app.state.runtime.scorers.register(FakeFudgeHead(name="value:fudge"))
    return app


@pytest.fixture
async def heads_client():
    engine = FakeEngine(seed=2)
    engine.next_logprobs = dict(LOGP)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app_with_heads(engine)),
                                 base_url="http://test") as c:
        yield c


async def test_streamed_blockwise_sends_one_chunk_per_block_then_alignment(heads_client):
    req = {"prompt": "hi", "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True},
           "alignment": {"strategy": "blockwise_cd", "n": 3, "block_tokens": 4,
                         "value": "value:fudge"}}
    evs = events((await heads_client.post("/v1/completions", json=req)).text)
    content = [e for e in evs if e["choices"] and e["choices"][0]["text"]]
    final = next(i for i, e in enumerate(evs) if e["choices"] and e["choices"][0]["finish_reason"])
    a = evs[final]["alignment"]
    assert a["strategy"] == "blockwise_cd" and len(content) == a["blocks"] >= 1
    assert all(evs.index(e) < final for e in content)
    text = "".join(e["choices"][0]["text"] for e in content)
    assert evs[-1]["usage"]["completion_tokens"] == len(text.split())
    # the bound covers every block the answer could have used: ⌈max_tokens / M⌉ = 3
    assert a["kl_bound"] == pytest.approx(3 * (math.log(3) - 2 / 3))
    assert a["value"] == "value:fudge" and a["reward"] == text.split().count("good")


async def test_tokenwise_over_http(heads_client):
    req = {"prompt": "hi", "max_tokens": 5, "seed": 7,
           "alignment": {"strategy": "tokenwise_cd", "top_k": 3, "lambda": 1.5,
                         "value": "value:q"}}
    body = (await heads_client.post("/v1/completions", json=req)).json()
    a = body["alignment"]
    assert a["strategy"] == "tokenwise_cd" and a["steps"] == 5 and a["lambda"] == 1.5
    assert a["reward"] is None  # no reward named: guided by the head alone
    again = (await heads_client.post("/v1/completions", json=req)).json()
    assert again["choices"][0]["text"] == body["choices"][0]["text"]  # seeded


async def test_streamed_text_arrives_before_the_answer_is_done_and_close_aborts():
    from server.protocol import CompletionRequest

    engine = FakeEngine(full_length=True)
    app = make_app(engine)
    core = app.state.serving
    prep = await core.resolve(CompletionRequest(prompt="hi", max_tokens=12, stream=True, alignment={
        "strategy": "blockwise_cd", "n": 2, "block_tokens": 4}), "completions",
        app.state.completions.prompts)
    stream = core.stream(prep, time.perf_counter())
    first = await anext(stream)
    engine.gate = asyncio.Event()  # the second block hangs in the engine
    assert json.loads(first[len("data: "):])["choices"][0]["text"].strip()
    while engine.active < 1:
        await asyncio.sleep(0)
    await stream.aclose()  # what the server does when the client goes away
    assert engine.cancelled == 1 and engine.active == 0


@pytest.mark.parametrize("alignment,fragment", [
    ({"strategy": "tokenwise_cd", "value": "good_count"}, "good_count is a text scorer"),
    ({"strategy": "tokenwise_cd", "value": "value:fudge"}, "value:fudge is a FUDGE head"),
    ({"strategy": "tokenwise_cd"}, "tokenwise_cd needs alignment.value"),
    ({"strategy": "tokenwise_cd", "value": "value:nope"}, "unknown scorer"),
    ({"strategy": "best_of_n", "value": "value:q"}, "not used by strategy"),
    ({"strategy": "tokenwise_cd", "value": "value:q", "top_k": 0}, "top_k"),
    ({"strategy": "tokenwise_cd", "value": "value:q", "top_k": 21}, "top_k"),
    ({"strategy": "tokenwise_cd", "value": "value:q", "lambda": -1}, "lambda"),
    ({"strategy": "blockwise_cd", "block_tokens": 0}, "block_tokens"),
])
async def test_bad_controlled_decoding_requests_are_400s(heads_client, alignment, fragment):
    r = await heads_client.post("/v1/completions", json={"prompt": "hi", "alignment": alignment})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] or fragment in (err.get("param") or ""), err
    assert err["type"] == "invalid_request_error"


async def test_blockwise_budget_counts_k_times_max_tokens():
    app = make_app(FakeEngine(), max_request_tokens=255)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        req = {"prompt": "hi", "max_tokens": 64,
               "alignment": {"strategy": "blockwise_cd", "n": 4, "block_tokens": 8}}
        r = await c.post("/v1/completions", json=req)
        assert r.status_code == 400 and r.json()["error"]["code"] == "token_budget_exceeded"
        assert "256" in r.json()["error"]["message"]
