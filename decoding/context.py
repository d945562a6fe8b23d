"""What a strategy may use (`DecodeContext`): the engine, and an executor that keeps scorers
off the event loop, with the time accounting and tracing hooks around each call."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from .protocols import Engine, QScorer, Scorer
from .request import DecodeRequest, Objective, Scored, Timer
from .types import Sample, SampleDelta, Sampling


@dataclass
class DecodeContext:
    """What a strategy may use: the engine, and an executor that keeps scorers off the event loop."""

    engine: Engine
    executor: Executor | None = None
    # Tracing hook (server/observability/tracing.py): a context manager around each score
    # call, given a span name and attributes; None: off.
    span: Callable[[str, dict[str, Any]], AbstractContextManager[Any]] | None = None

    def _span(self, name: str, attrs: dict[str, Any]) -> AbstractContextManager[Any]:
        return self.span(name, attrs) if self.span is not None else contextlib.nullcontext()

    async def generate(
        self, prompt_ids: Sequence[int], n: int, sampling: Sampling, timer: Timer
    ) -> list[Sample]:
        """An engine call whose wall time is added to `timer.generate_s`."""
        t0 = time.perf_counter()
        try:
            return await self.engine.generate(prompt_ids, n, sampling)
        finally:
            timer.generate_s += time.perf_counter() - t0

    async def stream(
        self, prompt_ids: Sequence[int], sampling: Sampling, timer: Timer,
        on_delta: Callable[[SampleDelta], None],
    ) -> Sample:
        """One sample, streamed: each engine delta goes to `on_delta` as it arrives, and the
        assembled sample is returned; wall time is added to `timer.generate_s`. Cancelling
        the call closes the engine stream, which aborts the request."""
        t0 = time.perf_counter()
        s = Sample([], "", [], None)
        deltas = self.engine.stream(prompt_ids, sampling)
        try:
            async for d in deltas:
                s.token_ids += d.token_ids
                s.text += d.text
                s.logprobs += d.logprobs
                if d.top_logprobs is not None:
                    s.top_logprobs = (s.top_logprobs or []) + d.top_logprobs
                s.finish_reason = d.finish_reason
                on_delta(d)
        finally:
            await deltas.aclose()
            timer.generate_s += time.perf_counter() - t0
        return s

    async def score(
        self, scorer: Scorer, req: DecodeRequest, samples: Sequence[Sample]
    ) -> list[float]:
        """One score per sample, in a worker thread: token ids for a TokenScorer, text otherwise."""
        with self._span("score", {"alignserve.scorer": scorer.name,
                                  "alignserve.candidates": len(samples)}):
            values = await self._score(scorer, req, samples)
        if len(values) != len(samples):
            raise RuntimeError(f"scorer {scorer.name} returned {len(values)} scores for {len(samples)}")
        return [float(v) for v in values]

    async def _score(
        self, scorer: Scorer, req: DecodeRequest, samples: Sequence[Sample]
    ) -> Sequence[float]:
        """The score call itself (`BatchingContext` batches it across requests)."""
        call: Callable[..., Sequence[float]]
        args: tuple[Any, ...]
        if hasattr(scorer, "score_ids"):
            call, args = scorer.score_ids, (req.prompt_ids, [list(s.token_ids) for s in samples])
        else:
            call, args = scorer.score, (req.prompt_text, [s.text for s in samples])
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, call, *args)

    async def q_values(
        self, scorer: QScorer, req: DecodeRequest, response_ids: Sequence[int],
        candidates: Sequence[int], timer: Timer,
    ) -> list[float]:
        """V(x, yᵗ, z) for each candidate z (one forward pass), in a worker thread."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            with self._span("score.q_values", {"alignserve.scorer": scorer.name,
                                               "alignserve.candidates": len(candidates)}):
                values = await loop.run_in_executor(self.executor, scorer.q_values,
                                                    req.prompt_ids, list(response_ids),
                                                    list(candidates))
        finally:
            timer.score_s += time.perf_counter() - t0
        if len(values) != len(candidates):
            raise RuntimeError(f"value head {scorer.name} returned {len(values)} values for "
                               f"{len(candidates)} candidates")
        return [float(v) for v in values]

    async def score_samples(
        self, objective: Objective, req: DecodeRequest, samples: Sequence[Sample], timer: Timer
    ) -> list[Scored]:
        """Reward and cost of every sample (both scorers run concurrently)."""
        t0 = time.perf_counter()
        jobs = [self.score(objective.reward, req, samples)]
        if objective.cost is not None:
            jobs.append(self.score(objective.cost, req, samples))
        results = await asyncio.gather(*jobs)
        timer.score_s += time.perf_counter() - t0
        rewards = results[0]
        costs = results[1] if objective.cost is not None else [None] * len(samples)
        return [
            Scored(s, r, c, r - objective.cost_weight * c if c is not None else r)
            for s, r, c in zip(samples, rewards, costs)
        ]
