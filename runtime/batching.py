"""Scoring batched across requests: score calls that arrive close together become one call.

Every strategy scores through `DecodeContext.score` (one prompt, many responses). Under load,
many requests score at nearly the same moment — 16 best-of-8 requests each want 8 responses
scored — and a scorer called once per request pays its fixed cost (a forward pass, padding, a
thread hop) 16 times. `ScoreBatcher` collects the calls for one scorer that arrive within
`window_s` of the first (or until `max_batch` pairs are waiting, or while that scorer already
runs `concurrency` batches), runs them as one call over (prompt, response) pairs in the
scorer threads, and hands each caller its own slice of the results, in order.

Up to `concurrency` batches of one scorer run at once (default: the scorer threads), so a
burst that arrives while one batch runs goes to the idle thread instead of waiting for it:
with one batch at a time, a CPU text scorer (no per-call cost to amortise) made every caller
wait for the whole batch on one thread while the other idled (bench/results/scorer_batching.md).

Scorers opt in with `decoding.protocols.PairScorer.score_pairs` (text) or
`TokenPairScorer.score_ids_pairs` (token ids, value heads); others are called once per distinct
prompt of the batch (`score_pairs` below), which is what they did before.

Failure and cancellation: an exception from the scorer reaches every caller of that batch; a
caller cancelled before its batch starts is dropped from it, one cancelled while it runs just
never reads its slice: the other callers are unaffected.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, cast

from decoding.context import DecodeContext
from decoding.protocols import QScorer, Scorer, TokenScorer
from decoding.request import DecodeRequest, Timer
from decoding.types import Sample


def score_pairs(scorer: Scorer, token: bool, pairs: Sequence[tuple[Any, Any]]) -> list[float]:
    """One score per (prompt, response) pair: the scorer's batched method when it has one,
    otherwise one `score` / `score_ids` call per run of pairs with the same prompt."""
    batched = getattr(scorer, "score_ids_pairs" if token else "score_pairs", None)
    if batched is not None:
        return [float(v) for v in batched(pairs)]
    single = cast(TokenScorer, scorer).score_ids if token else scorer.score
    out: list[float] = []
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        values = single(pairs[i][0], [r for _, r in pairs[i:j]])
        if len(values) != j - i:
            raise RuntimeError(f"scorer {scorer.name} returned {len(values)} scores for {j - i}")
        out.extend(float(v) for v in values)
        i = j
    return out


@dataclass
class _Call:
    pairs: list[tuple[Any, Any]]
    future: asyncio.Future


@dataclass
class _Queue:
    """Calls waiting for one (scorer, kind)."""

    calls: list[_Call] = field(default_factory=list)
    size: int = 0  # pairs waiting
    timer: asyncio.TimerHandle | None = None
    running: int = 0  # batches of this scorer running now
    due: bool = False  # the window has passed: flush as soon as the scorer is free


class ScoreBatcher:
    """Batches score calls per scorer (see the module docstring). One event loop only."""

    def __init__(self, executor: Executor | None, window_s: float, max_batch: int,
                 concurrency: int | None = None) -> None:
        self._executor = executor
        self._window_s = window_s
        self._max_batch = max_batch
        # None: as many batches at once as the executor has threads (a ThreadPoolExecutor's
        # worker count; 1 for anything else)
        self._concurrency: int = concurrency or int(getattr(executor, "_max_workers", 1) or 1)
        self._queues: dict[tuple[int, bool], _Queue] = {}
        self._scorers: dict[tuple[int, bool], Scorer] = {}
        self._running: set[asyncio.Task] = set()  # strong references: the loop keeps weak ones
        self.batches = 0  # underlying scorer calls made (a metric, and for tests)
        self.pairs = 0  # pairs scored in them

    async def score(self, scorer: Scorer, token: bool, pairs: Sequence[tuple[Any, Any]]
                    ) -> list[float]:
        """Scores of `pairs` (prompt, response), computed in a batch with other callers'."""
        if not pairs:
            return []
        loop = asyncio.get_running_loop()
        key = (id(scorer), token)
        queue = self._queues.setdefault(key, _Queue())
        self._scorers[key] = scorer
        call = _Call(list(pairs), loop.create_future())
        queue.calls.append(call)
        queue.size += len(call.pairs)
        if queue.size >= self._max_batch:
            queue.due = True
            self._flush(key)
        elif queue.timer is None and not queue.due:
            queue.timer = loop.call_later(self._window_s, self._window_over, key)
        return await call.future  # cancelling the caller cancels only its own future

    def _window_over(self, key) -> None:
        queue = self._queues[key]
        queue.timer = None
        queue.due = True
        self._flush(key)

    def _flush(self, key) -> None:
        queue = self._queues[key]
        if queue.running >= self._concurrency or not queue.due:
            return  # a running batch's completion flushes again
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        queue.calls = [c for c in queue.calls if not c.future.done()]  # cancelled meanwhile
        taken, size = 0, 0
        while taken < len(queue.calls) and (taken == 0 or size < self._max_batch):
            size += len(queue.calls[taken].pairs)
            taken += 1
        calls, queue.calls = queue.calls[:taken], queue.calls[taken:]
        queue.size = sum(len(c.pairs) for c in queue.calls)
        queue.due = bool(queue.calls)  # what is left over has waited its window already
        if not calls:
            return
        queue.running += 1
        task = asyncio.get_running_loop().create_task(self._run(key, calls))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, key, calls: list[_Call]) -> None:
        scorer, token = self._scorers[key], key[1]
        pairs = [p for c in calls for p in c.pairs]
        loop = asyncio.get_running_loop()
        try:
            values = await loop.run_in_executor(self._executor, score_pairs, scorer, token, pairs)
            if len(values) != len(pairs):
                raise RuntimeError(f"scorer {scorer.name} returned {len(values)} scores for "
                                   f"{len(pairs)}")
        except asyncio.CancelledError:  # the loop is shutting down: so are the callers
            for c in calls:
                c.future.cancel()
            raise
        except Exception as exc:  # every caller of the batch hears of it; none hangs
            for c in calls:
                if not c.future.done():
                    c.future.set_exception(exc)
        else:
            self.batches += 1
            self.pairs += len(pairs)
            start = 0
            for c in calls:
                if not c.future.done():
                    c.future.set_result(values[start:start + len(c.pairs)])
                start += len(c.pairs)
        finally:
            queue = self._queues[key]
            queue.running -= 1
            if queue.calls:
                # Calls that arrived while this batch ran go now if their window is over (or
                # they fill a batch), else when it ends.
                queue.due = queue.due or queue.size >= self._max_batch
                self._flush(key)


class NonFiniteScore(ValueError):
    """A scorer returned NaN or ±inf. Selection cannot use it: NaN makes `max` pick
    arbitrarily and `random.choices` raise, inf wins every comparison. The request fails with
    a clear error (server/errors.py: 502 for a remote scorer, 500 for an in-process one)."""

    def __init__(self, scorer: str, bad: int, total: int) -> None:
        super().__init__(f"scorer {scorer} returned a non-finite score ({bad} of {total})")
        self.scorer, self.bad, self.total = scorer, bad, total


def check_finite(scorer: str, values: Sequence[float]) -> list[float]:
    """`values` as floats when every one is finite, else NonFiniteScore."""
    out = [float(v) for v in values]
    bad = sum(not math.isfinite(v) for v in out)
    if bad:
        raise NonFiniteScore(scorer, bad, len(out))
    return out


@dataclass
class BatchingContext(DecodeContext):
    """`DecodeContext` whose score calls go through a `ScoreBatcher`, so the strategies in
    decoding/ batch across requests without knowing it. Without a batcher: the plain context.
    Either way every score and Q value is checked finite before a strategy sees it."""

    batcher: ScoreBatcher | None = None

    async def _score(self, scorer: Scorer, req: DecodeRequest, samples: Sequence[Sample]
                     ) -> Sequence[float]:
        return check_finite(scorer.name, await self._score_unchecked(scorer, req, samples))

    async def q_values(self, scorer: QScorer, req: DecodeRequest, response_ids: Sequence[int],
                       candidates: Sequence[int], timer: Timer) -> list[float]:
        values = await super().q_values(scorer, req, response_ids, candidates, timer)
        return check_finite(scorer.name, values)

    async def _score_unchecked(self, scorer: Scorer, req: DecodeRequest,
                               samples: Sequence[Sample]) -> Sequence[float]:
        if self.batcher is None:
            return await super()._score(scorer, req, samples)
        token = hasattr(scorer, "score_ids")
        pairs: list[tuple[Any, Any]]
        if token:
            prompt = tuple(req.prompt_ids)  # hashable and comparable: runs of equal prompts
            pairs = [(prompt, list(s.token_ids)) for s in samples]
        else:
            pairs = [(req.prompt_text, s.text) for s in samples]
        return await self.batcher.score(scorer, token, pairs)
