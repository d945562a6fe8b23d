"""Cross-request scorer batching (runtime/batching.py) with fake scorers: no engine, no models."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from fakes import FakeEngine, WordReward

from decoding.context import DecodeContext
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.types import Sample, Sampling
from runtime.batching import BatchingContext, ScoreBatcher, score_pairs

WINDOW = 0.05  # every call below is submitted in one loop iteration, long before it ends


class PairRecorder:
    """A text scorer with `score_pairs`: score = len(prompt) + len(response); records calls."""

    name = "recorder"

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.calls: list[list[tuple[str, str]]] = []
        self.gate, self.fail = gate, fail

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return self.score_pairs([(prompt, r) for r in responses])

    def score_pairs(self, pairs):
        self.calls.append(list(pairs))
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        if self.fail:
            raise RuntimeError("reward model down")
        return [float(len(p) + len(r)) for p, r in pairs]


class PerPrompt:
    """A text scorer without `score_pairs` (the fallback path)."""

    name = "per_prompt"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def score(self, prompt, responses):
        self.calls.append((prompt, list(responses)))
        return [float(len(prompt) * 100 + len(r)) for r in responses]


class TokenRecorder:
    """A token scorer (a value head's shape): score = sum(prompt) + sum(response)."""

    name = "value:fake"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, prompt, responses):
        raise AssertionError("a token scorer is scored on ids")

    def score_ids(self, prompt_ids, responses):
        return self.score_ids_pairs([(prompt_ids, r) for r in responses])

    def score_ids_pairs(self, pairs):
        self.calls.append(len(pairs))
        return [float(sum(p) + sum(r)) for p, r in pairs]


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True)


def request(prompt: str, ids=(1, 2)) -> DecodeRequest:
    return DecodeRequest(prompt_ids=list(ids), prompt_text=prompt, sampling=Sampling(max_tokens=4))


def samples(texts, ids=None) -> list[Sample]:
    ids = ids or [[i] for i in range(len(texts))]
    return [Sample(list(i), t, [], "stop") for t, i in zip(texts, ids)]


async def test_concurrent_calls_in_the_window_become_one_call_in_caller_order(executor):
    scorer = PairRecorder()
    ctx = BatchingContext(FakeEngine(), executor, batcher=ScoreBatcher(executor, WINDOW, 64))
    jobs = [(f"prompt{'!' * i}", [f"r{'x' * j}" for j in range(i + 1)]) for i in range(5)]
    results = await asyncio.gather(*(ctx.score(scorer, request(p), samples(rs)) for p, rs in jobs))
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 15
    for (p, rs), got in zip(jobs, results):
        assert got == [float(len(p) + len(r)) for r in rs]
    assert ctx.batcher.batches == 1 and ctx.batcher.pairs == 15


async def test_scorers_without_pairs_are_called_once_per_prompt(executor):
    scorer = PerPrompt()
    batcher = ScoreBatcher(executor, WINDOW, 64)
    a, b = await asyncio.gather(batcher.score(scorer, False, [("ab", "x"), ("ab", "yy")]),
                                batcher.score(scorer, False, [("c", "zzz")]))
    assert a == [201.0, 202.0] and b == [103.0]
    assert scorer.calls == [("ab", ["x", "yy"]), ("c", ["zzz"])]
    assert score_pairs(scorer, False, []) == []


async def test_token_scorers_batch_on_ids(executor):
    scorer = TokenRecorder()
    ctx = BatchingContext(FakeEngine(), executor, batcher=ScoreBatcher(executor, WINDOW, 64))
    a, b = await asyncio.gather(
        ctx.score(scorer, request("p", ids=(1, 2)), samples(["", ""], [[3], [4, 5]])),
        ctx.score(scorer, request("q", ids=(10,)), samples([""], [[7]])))
    assert a == [6.0, 12.0] and b == [17.0]
    assert scorer.calls == [3]


async def test_a_full_batch_starts_without_waiting_for_the_window(executor):
    scorer = PairRecorder()
    batcher = ScoreBatcher(executor, 3600.0, max_batch=4)  # the window would never end in time
    results = await asyncio.wait_for(asyncio.gather(
        *(batcher.score(scorer, False, [("p", "a"), ("p", "b")]) for _ in range(4))), 30)
    assert results == [[2.0, 2.0]] * 4
    assert [len(c) for c in scorer.calls] == [4, 4]  # capped at max_batch pairs


async def test_calls_arriving_while_the_scorer_is_busy_form_the_next_batch(executor):
    gate = threading.Event()
    scorer = PairRecorder(gate)
    batcher = ScoreBatcher(executor, WINDOW, 64, concurrency=1)
    first = asyncio.ensure_future(batcher.score(scorer, False, [("p", "a")]))
    while not scorer.calls:  # the first batch is running (blocked on the gate)
        await asyncio.sleep(0.001)
    later = [asyncio.ensure_future(batcher.score(scorer, False, [("p", "b" * i)]))
             for i in range(1, 4)]
    await asyncio.sleep(2 * WINDOW)  # their window ends while the scorer is still busy
    assert len(scorer.calls) == 1
    gate.set()
    assert await first == [2.0]
    assert [await f for f in later] == [[2.0], [3.0], [4.0]]
    assert [len(c) for c in scorer.calls] == [1, 3]


async def test_up_to_concurrency_batches_run_at_once(executor):
    gate = threading.Event()
    scorer = PairRecorder(gate)
    batcher = ScoreBatcher(executor, WINDOW, 64)  # default: one batch per scorer thread (2)
    first = asyncio.ensure_future(batcher.score(scorer, False, [("p", "a")]))
    while len(scorer.calls) < 1:  # the first batch runs (blocked on the gate)
        await asyncio.sleep(0.001)
    second = asyncio.ensure_future(batcher.score(scorer, False, [("p", "bb")]))
    while len(scorer.calls) < 2:  # starts on the idle thread after its window, not after `first`
        await asyncio.sleep(0.001)
    third = [asyncio.ensure_future(batcher.score(scorer, False, [("p", "c" * i)]))
             for i in range(3, 5)]
    await asyncio.sleep(2 * WINDOW)  # their window ends while both threads are busy
    assert len(scorer.calls) == 2
    gate.set()
    assert [await first, await second] == [[2.0], [3.0]]
    assert [await f for f in third] == [[4.0], [5.0]]
    assert [len(c) for c in scorer.calls] == [1, 1, 2]


async def test_an_error_reaches_every_caller_of_the_batch(executor):
    scorer = PairRecorder(fail=True)
    batcher = ScoreBatcher(executor, WINDOW, 64)
    results = await asyncio.wait_for(asyncio.gather(
        *(batcher.score(scorer, False, [("p", str(i))]) for i in range(3)),
        return_exceptions=True), 30)
    assert all(isinstance(r, RuntimeError) and "reward model down" in str(r) for r in results)
    assert len(scorer.calls) == 1
    scorer.fail = False  # the batcher is still usable afterwards
    assert await batcher.score(scorer, False, [("p", "ok")]) == [3.0]


async def test_a_caller_cancelled_before_its_batch_runs_is_dropped(executor):
    scorer = PairRecorder()
    batcher = ScoreBatcher(executor, WINDOW, 64)
    tasks = [asyncio.ensure_future(batcher.score(scorer, False, [("p", "x" * i)]))
             for i in range(1, 4)]
    await asyncio.sleep(0)  # all three are queued
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert done[0] == [2.0] and done[2] == [4.0]
    assert scorer.calls == [[("p", "x"), ("p", "xxx")]]


async def test_a_caller_cancelled_while_its_batch_runs_leaves_the_others_intact(executor):
    gate = threading.Event()
    scorer = PairRecorder(gate)
    batcher = ScoreBatcher(executor, WINDOW, 64)
    tasks = [asyncio.ensure_future(batcher.score(scorer, False, [("p", "x" * i)]))
             for i in range(1, 4)]
    while not scorer.calls:
        await asyncio.sleep(0.001)
    tasks[0].cancel()
    gate.set()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    assert done[1:] == [[3.0], [4.0]]
    assert await batcher.score(scorer, False, [("p", "y")]) == [2.0]  # still serving


async def test_best_of_n_through_the_batching_context_matches_the_plain_one(executor):
    reward = WordReward()
    reqs = [DecodeRequest(prompt_ids=[1, 2, i], prompt_text=f"p{i}",
                          sampling=Sampling(max_tokens=8), n=4, objective=Objective(reward))
            for i in range(8)]
    plain_ctx = DecodeContext(FakeEngine(seed=3), executor)
    plain = [await STRATEGIES["best_of_n"].run(r, plain_ctx) for r in reqs]
    batcher = ScoreBatcher(executor, WINDOW, 64)
    ctx = BatchingContext(FakeEngine(seed=3), executor, batcher=batcher)
    batched = [await STRATEGIES["best_of_n"].run(r, ctx) for r in reqs]  # same sample order
    assert [r.reward for r in batched] == [r.reward for r in plain]
    assert [r.sample.text for r in batched] == [r.sample.text for r in plain]
    concurrent = await asyncio.gather(*(STRATEGIES["best_of_n"].run(r, ctx) for r in reqs))
    assert all(r.reward == reward.score("", [r.sample.text])[0] for r in concurrent)
    assert batcher.batches < len(reqs) * 2  # 8 sequential + fewer than 8 concurrent
