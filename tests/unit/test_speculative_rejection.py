import asyncio
import threading
from concurrent.futures import Executor, Future

import pytest
from fakes import Exploding, FakeEngine, FakeFudgeHead, WordReward

from decoding.context import DecodeContext
from decoding.kl import selection_kl_bound
from decoding.request import DecodeRequest, Objective
from decoding.speculative_rejection import decision_points
from decoding.strategies import STRATEGIES
from decoding.types import SampleDelta, Sampling

SPR = STRATEGIES["speculative_rejection"]
PROMPT = [101, 102, 103]


class Inline(Executor):
    """Runs scorers on the event loop's thread: the interleaving of tracks and decisions is then
    the same in every run (the tests that need a real thread say so)."""

    def submit(self, fn, *args, **kwargs):
        f: Future = Future()
        f.set_result(fn(*args, **kwargs))
        return f


def request(n, alpha, decision, growth=2.0, max_tokens=64, objective=None, seed=None, **kw):
    return DecodeRequest(PROMPT, "p", Sampling(max_tokens=max_tokens, seed=seed), n=n,
                         objective=objective or Objective(WordReward()), return_candidates=True,
                         options=SPR.Options(alpha=alpha, decision_tokens=decision, growth=growth),
                         **kw)


def check_accounting(engine, res, n):
    """What holds for every run: N engine requests for the whole budget, never resubmitted;
    every token any track produced is counted and listed; nothing left running."""
    assert len(engine.calls) == n and engine.started == n
    assert all(p == PROMPT and k == 1 for p, k, _ in engine.calls)
    assert res.generated_tokens == sum(len(c.sample.token_ids) for c in res.candidates)
    assert [len(c.sample.token_ids) for c in res.candidates] == \
        [s["tokens"] for s in engine.sequences]
    assert engine.active == 0 and all(s["end"] is not None for s in engine.sequences)
    for c in res.candidates:
        assert c.sample.text == engine.decode(c.sample.token_ids)
    assert res.sample.text == engine.decode(res.sample.token_ids)


def test_decision_points_grow():
    assert list(decision_points(4, 2.0, 64)) == [4, 12, 28, 60]
    assert list(decision_points(16, 2.0, 64)) == [16, 48]
    assert list(decision_points(100, 2.0, 64)) == []
    assert list(decision_points(3, 1.0, 10)) == [3, 6, 9]


@pytest.mark.parametrize("n,alpha,decision,rejected,at_least,rounds", [
    # 16 → 8 at token 4 → 4 at 12 → 2 at 28 → 1 at 60; the lone survivor runs to 64
    (16, 0.5, 4, [8, 4, 2, 1], 8 * 4 + 4 * 12 + 2 * 28 + 1 * 60 + 64, 5),
    # 8 → 2 at token 8 → 1 (never 0) at 24
    (8, 0.75, 8, [6, 1], 6 * 8 + 1 * 24 + 64, 3),
    # α = 0 keeps everyone: exactly best-of-n's compute
    (4, 0.0, 16, [0, 0], 4 * 64, 3),
    # first decision point beyond the budget: plain best-of-n
    (4, 0.5, 100, [], 4 * 64, 1),
])
async def test_decisions_and_survivor_counts(n, alpha, decision, rejected, at_least, rounds):
    engine = FakeEngine(full_length=True)
    res = await SPR.run(request(n, alpha, decision), DecodeContext(engine, Inline()))
    assert res.extra["rounds"] == rounds and res.extra["rejected"] == rejected
    check_accounting(engine, res, n)
    # scorer work: every partial answer at every decision point, then the survivors whole
    sizes = [n - sum(rejected[:i]) for i in range(len(rejected))]
    points = list(decision_points(decision, 2.0, 64))[:len(rejected)]
    survivors = n - sum(rejected)
    assert res.extra["scorer_calls"] == sum(sizes) + survivors
    assert res.extra["scored_tokens"] == sum(s * p for s, p in zip(sizes, points)) \
        + 64 * survivors
    assert res.scored_candidates == n and res.extra["chosen_rejected"] is False
    # Rejected tracks ran at least to their decision point and were stopped before the end.
    assert at_least <= res.generated_tokens < n * 64 or sum(rejected) == 0
    # each rejected track was aborted, unless it reached its end while its decision was scored
    for c, seq in zip(res.candidates, engine.sequences):
        assert (seq["end"] == "cancelled") == (c.sample.finish_reason is None
                                               and len(c.sample.token_ids) < 64)
    assert sum(c.sample.finish_reason is None for c in res.candidates) == sum(rejected)
    assert len(res.sample.token_ids) == 64 and res.sample.finish_reason == "length"
    assert res.kl_bound == pytest.approx(selection_kl_bound(n)) and res.kl_estimate is None
    assert res.win_rate_bound == pytest.approx(n / (n + 1))


async def test_rejected_streams_are_cancelled_at_their_decision_point():
    engine = FakeEngine(full_length=True, seed=5)
    res = await SPR.run(request(8, 0.5, 4), DecodeContext(engine, Inline()))
    check_accounting(engine, res, 8)
    cancelled = [s for s in engine.sequences if s["end"] == "cancelled"]
    assert len(cancelled) == 7 and all(s["tokens"] < 64 for s in cancelled)
    # every engine request asked for the whole budget once: survivors are never resubmitted
    assert all(sampling.max_tokens == 64 for _, _, sampling in engine.calls)
    rejected = [c for c in res.candidates if c.sample.finish_reason is None]
    assert len(rejected) == 7
    # the winner is the best of the survivors, judged on its whole answer
    assert res.reward == WordReward().score("p", [res.sample.text])[0]


async def test_survivors_keep_decoding_while_a_decision_is_scored():
    """A real scorer thread: at the first decision point (token 4) the scorer waits until every
    track has decoded 7 tokens, which only happens if nobody is paused while it scores. The
    rejected tracks are cancelled holding those 7 tokens: all of them are counted."""
    engine = FakeEngine(full_length=True, seed=3)
    ran_on, released = threading.Event(), asyncio.Event()
    held, aborted = [], []

    async def hold_at_seven(rec):
        if rec["tokens"] == 7 and not released.is_set():
            held.append(rec)
            if len(held) == 8:
                ran_on.set()
            try:
                await released.wait()
            except asyncio.CancelledError:
                aborted.append(rec)
                if len(aborted) == 4:  # the first decision's rejections are done
                    released.set()
                raise

    class WaitingReward(WordReward):
        calls = 0

        def score(self, prompt, responses):
            self.calls += 1
            if self.calls == 1:
                assert [len(r.split()) for r in responses] == [4] * 8  # exact prefixes
                assert ran_on.wait(30), "tracks were paused while the decision was scored"
            return super().score(prompt, responses)

    engine.before_token = hold_at_seven
    res = await SPR.run(request(8, 0.5, 4, objective=Objective(WaitingReward())),
                        DecodeContext(engine))
    assert res.extra["rejected"] == [4, 2, 1]
    assert [s["tokens"] for s in aborted] == [7] * 4 and len(held) == 8
    check_accounting(engine, res, 8)
    assert res.generated_tokens >= 4 * 7 + 2 * 12 + 1 * 28 + 64


async def test_seeded_runs_are_reproducible_and_track_seeds_disjoint():
    async def run(seed):
        engine = FakeEngine(full_length=True)
        res = await SPR.run(request(8, 0.5, 4, seed=seed), DecodeContext(engine))  # threads
        check_accounting(engine, res, 8)
        return engine, res

    (e1, a), (e2, b) = await run(11), await run(11)
    assert a.sample.token_ids == b.sample.token_ids and a.sample.text == b.sample.text
    assert a.reward == b.reward and a.extra == b.extra
    # a decision judges exact prefixes, so timing never changes which tracks survive
    assert [c.sample.finish_reason for c in a.candidates] == \
        [c.sample.finish_reason for c in b.candidates]
    seeds = [s["seed"] for s in e1.sequences]
    assert seeds == [s["seed"] for s in e2.sequences]
    # track i is child i of one seeded n = 8 call: best-of-8 with seed 11 draws these very seeds
    bon = FakeEngine(full_length=True)
    await bon.generate([1, 2], 8, Sampling(max_tokens=4, seed=11))
    assert sorted(seeds) == bon.child_seeds == list(range(11, 19))
    other, _ = await run(19)  # the next choice's range (choice_seed spaces them by n)
    assert not {s["seed"] for s in other.sequences} & set(seeds)
    unseeded, _ = await run(None)
    assert all(s["seed"] is None for s in unseeded.sequences)


class ScriptedEngine(FakeEngine):
    """Tracks 0 and 1: one 'bad' token and stop. Tracks 2 and 3: 'good' × budget."""

    async def stream_sequence(self, prompt_ids, sampling):
        index = len(self.calls)
        self.calls.append((list(prompt_ids), 1, sampling))
        self.active += 1
        try:
            if index < 2:
                yield SampleDelta(0, [1], " bad", [-1.0], "stop")
                return
            for k in range(sampling.max_tokens):
                await asyncio.sleep(0)
                last = k == sampling.max_tokens - 1
                yield SampleDelta(0, [0], " good", [-1.0], "length" if last else None)
        finally:
            self.active -= 1


async def test_finished_sequences_compete_and_can_be_rejected():
    engine = ScriptedEngine()
    res = await SPR.run(request(4, 0.5, 4, max_tokens=16), DecodeContext(engine, Inline()))
    assert res.extra["rejected"] == [2, 1]  # both finished 'bad' answers went first
    assert res.sample.text.split() == ["good"] * 16 and res.reward == 16
    assert res.sample.finish_reason == "length"
    bad = res.candidates[:2]
    # rejected after they had finished: whole, with their finish reason and exact reward
    assert all(c.sample.finish_reason == "stop" and c.reward == 0 for c in bad)
    assert res.extra["chosen_rejected"] is False
    assert engine.active == 0 and len(engine.calls) == 4


async def test_a_finished_answer_rejected_by_the_value_can_still_win():
    """Sun et al.'s reference keeps every finished trajectory for the final choice: the value
    (count of 'good' ids) rejects the two finished 'bad' answers at token 4, but the objective
    (count of 'bad') prefers them to every survivor, so one of them is the answer."""
    engine = ScriptedEngine()
    res = await SPR.run(request(4, 0.5, 4, max_tokens=16, value=FakeFudgeHead(tok=0),
                                objective=Objective(WordReward("bad", "bad_count"))),
                        DecodeContext(engine, Inline()))
    assert res.extra["rejected"] == [2, 1]
    assert res.sample.text == " bad" and res.reward == 1 and res.sample.finish_reason == "stop"
    assert res.extra["chosen_rejected"] is True
    assert res.candidates[0].sample is res.sample  # the first of the two equal finished ones
    # value at 4: 1 + 1 + 4 + 4 tokens; value at 12: 2 × 12; objective at the end: the two
    # finished answers and the survivor, whole (1 + 1 + 16)
    assert res.extra["scorer_calls"] == 4 + 2 + 3
    assert res.extra["scored_tokens"] == 10 + 24 + 18


async def test_value_judges_partials_and_the_objective_the_answer():
    head = FakeFudgeHead(tok=0)  # V = count of 'good' ids: it sees token ids, never text
    objective = Objective(WordReward("bad", "bad_count"))
    engine = FakeEngine(full_length=True, seed=2)
    res = await SPR.run(request(8, 0.5, 4, max_tokens=8, objective=objective, value=head,
                                seed=4), DecodeContext(engine, Inline()))
    assert res.extra["rounds"] == 2 and res.extra["rejected"] == [4]
    assert res.extra["value"] == "value:fudge"
    assert res.extra["scorer_calls"] == 8 + 4  # 8 partials by value, 4 survivors by objective
    assert head.seen and all(len(ids) == 4 for ids in head.seen)  # exact 4-token prefixes
    by_value = sorted(range(8), key=lambda i: -head.seen[i].count(0))[:4]
    survivors = [i for i, c in enumerate(res.candidates) if c.sample.finish_reason is not None]
    assert survivors == sorted(by_value)
    bad = [res.candidates[i].sample.text.split().count("bad") for i in survivors]
    assert res.reward == max(bad)  # the answer: the objective's best survivor
    assert all(c.reward is None for c in res.candidates if c.sample.finish_reason is None)
    check_accounting(engine, res, 8)


async def test_scorer_error_leaves_nothing_running():
    engine = FakeEngine(full_length=True)
    with pytest.raises(RuntimeError, match="scorer failed"):
        await SPR.run(request(8, 0.5, 4, objective=Objective(Exploding())),
                      DecodeContext(engine, Inline()))
    assert engine.active == 0 and engine.cancelled == 8


async def test_cancel_mid_flight_aborts_every_track():
    engine = FakeEngine(full_length=True)
    all_held, never = asyncio.Event(), asyncio.Event()
    held = []

    async def hold(rec):
        if rec["tokens"] == 2:
            held.append(rec)
            if len(held) == 8:
                all_held.set()
            await never.wait()

    engine.before_token = hold
    task = asyncio.create_task(SPR.run(request(8, 0.5, 4), DecodeContext(engine)))
    await all_held.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.cancelled == 8 and engine.active == 0


async def test_one_failing_track_cancels_its_siblings():
    engine = FakeEngine(full_length=True)

    async def fail_third(rec):
        if rec["tokens"] == 2 and rec is engine.sequences[2]:
            raise RuntimeError("engine error")

    engine.before_token = fail_third
    with pytest.raises(RuntimeError, match="engine error"):
        await SPR.run(request(8, 0.5, 4), DecodeContext(engine, Inline()))
    assert engine.active == 0
    assert [s["end"] for s in engine.sequences].count("cancelled") == 7  # all its siblings


async def test_value_option_over_http(client, engine):
    req = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
           "alignment": {"strategy": "speculative_rejection", "n": 4, "alpha": 0.5,
                         "decision_tokens": 4, "value": "bad_count", "return_candidates": True}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    a = r.json()["choices"][0]["alignment"]
    assert a["value"] == "bad_count" and a["rejected"][0] == 2
    # rejected unfinished: no reward (judged by the value only); every finished answer, the
    # rejected ones included, has its reward (it was eligible for the final choice)
    rejected = [c for c in a["candidates"] if c["finish_reason"] is None]
    assert rejected and all(c["reward"] is None for c in rejected)
    assert all(c["reward"] is not None for c in a["candidates"] if c["finish_reason"])
    assert a["scorer_calls"] >= 4 + 2 and a["scored_tokens"] > 0
    assert engine.active == 0 and len(engine.calls) == 4


def test_memory_schedule_follows_the_pool():
    """Sun et al.'s memory-driven rule: the survivors decode until they hold the tokens the
    pool held, so the length grows ×|pool|/|kept| (×2 at α = ½: 16, 32, 64, ...)."""
    from decoding.speculative_rejection import memory_points

    assert list(memory_points(16, 0.5, 32, 256)) == [16, 32, 64, 128]
    assert list(memory_points(16, 0.75, 8, 1000)) == [16, 64, 128]  # 8 → 2 → 1 (never 0)
    assert list(memory_points(16, 0.0, 8, 256)) == [16]  # nothing rejected: no later point
    assert list(memory_points(300, 0.5, 8, 256)) == []


async def test_memory_schedule_runs_its_points():
    engine = FakeEngine(full_length=True)
    opts = SPR.Options(alpha=0.5, decision_tokens=8, schedule="memory")
    req = DecodeRequest(PROMPT, "p", Sampling(max_tokens=64), n=8,
                        objective=Objective(WordReward()), return_candidates=True, options=opts)
    res = await SPR.run(req, DecodeContext(engine, Inline()))
    assert res.extra["rejected"] == [4, 2, 1]  # at 8, 16 and 32 tokens
    check_accounting(engine, res, 8)
    assert res.extra["scored_tokens"] == 8 * 8 + 4 * 16 + 2 * 32 + 64


def test_growth_is_refused_with_the_memory_schedule():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="growth applies"):
        SPR.Options(schedule="memory", growth=3.0)
    assert SPR.Options(schedule="memory").growth == 2.0  # the default is not "given"
    assert SPR.Options().schedule == "memory"  # the default (bench/results/spr_sweep.md)
    assert SPR.Options(growth=3.0).schedule == "growth"  # a growth factor implies its schedule


def test_first_decision_is_derived_from_the_budget_and_n():
    """Unset decision_tokens: D decisions bring N to about 4 survivors, the memory schedule's
    last at half the answer (decoding/speculative_rejection.py `first_decision`)."""
    from decoding.speculative_rejection import first_decision, memory_points

    assert [first_decision(t, 32, 0.5) for t in (64, 128, 256)] == [8, 16, 32]
    assert list(memory_points(first_decision(64, 32, 0.5), 0.5, 32, 64)) == [8, 16, 32]
    assert first_decision(256, 64, 0.5) == 16  # one more decision: 16, 32, 64, 128
    assert first_decision(64, 32, 0.75) == 8  # ×4 stretches: 8, 32
    assert first_decision(64, 64, 0.5) == first_decision(64, 512, 0.5) == 8  # never before 8
    assert first_decision(8000, 32, 0.5) == 32  # max_tokens omitted: the context's remainder
    assert first_decision(64, 4, 0.5) == 32 and first_decision(64, 8, 0.0) == 32


async def test_unset_decision_tokens_use_the_derived_point():
    engine = FakeEngine(full_length=True)
    res = await SPR.run(request(8, 0.5, None, max_tokens=64), DecodeContext(engine, Inline()))
    assert res.extra["decision_points"][0]["tokens"] == 32  # N = 8: one decision, at half
    check_accounting(engine, res, 8)
