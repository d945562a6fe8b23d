"""Speculative rejection (Sun et al., NeurIPS 2024, arXiv 2410.20290).

The reward of a partial response predicts the reward of its completion, so start N sequences and
stop the worst early. Decision points lie at `decision_tokens` generated tokens, then each later
one a `growth`× longer stretch further (d, d + ⌈g·d⌉, ...). At each, score every live partial
answer and every finished one, keep the top round((1−α)·|pool|) (finished ones compete too, and
can be rejected; never fewer than one), and stop the rest; after the last decision (or once one
track is left) the survivors run to their end and the best finished answer is returned.

Engine mechanics (what makes the saved tokens save wall time on a paged-KV engine): each of the
N tracks is ONE engine request (n = 1, `Engine.stream_sequence`) for the whole answer, streamed
as it decodes. A rejected track is aborted at once (its KV blocks are freed and the batch
shrinks); survivors are never paused, resubmitted or re-prefilled, and keep decoding while a
decision point is being scored. The reference code instead ends every round at the decision
point, re-tokenises the text and re-prefills every survivor, and each round waits for its
slowest sequence.

Exactness: a decision at point p judges each track on its first p token ids exactly (text =
the engine's decoding of that whole id list, never a concatenation of per-delta text), however
far the track has run meanwhile; a track that finished within p tokens is judged whole. So the
answer depends only on the tracks' seeds (track i: `derive_seed(seed, "track", i)`, pairwise
disjoint) and not on timing: a seeded request is reproducible. Tokens a rejected track decoded
between its decision point and its abort are real compute: they count in `generated_tokens`
and stay in its candidate entry (whose reward is the one it was rejected on, that of its
first p tokens). Rejected candidates report `finish_reason` None, even one that had finished.

`value` (optional, as blockwise CD has): partial answers (and the finished ones they compete
with) are judged by a value scorer instead of the objective — the SpR paper's suggested next
step; the final choice among the survivors is still by the request's objective
(reward − cost_weight·cost).

KL: the answer is one of N i.i.d. draws, so KL ≤ log N (π(y) ≤ N·p(y)); no estimator is known
for this rule, so `kl_estimate` is None. The argmax of N draws maximises the win rate, so
N/(N+1) still bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import Field

from .committed import capped
from .kl import bon_win_rate_bound, selection_kl_bound
from .protocols import (
    DecodeContext,
    DecodeRequest,
    DecodeResult,
    Sample,
    Scored,
    Scorer,
    StrategyOptions,
    Timer,
)
from .seeds import derive_seed
from .strategies import register

_REPLACEMENT = "\ufffd"  # a cut through a multi-byte character decodes to this


@dataclass
class _Track:
    """One of the N sequences: what it has produced so far, fed by its engine stream."""

    index: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)  # when top_logprobs is asked
    finish_reason: str | None = None
    done: bool = False  # its stream ended (finished, or aborted after rejection)
    rejected: bool = False
    wait_for: float = math.inf  # the coordinator waits until len(ids) ≥ wait_for, or done
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    scored: Scored | None = None  # the objective's latest verdict (None: never judged by it)
    final: dict[str, Scored | float] = field(default_factory=dict)  # verdicts on the whole answer
    task: asyncio.Task | None = None

    def poke(self) -> None:
        if self.done or self.finish_reason is not None or len(self.ids) >= self.wait_for:
            self.reached.set()

    def finished_by(self, p: float) -> bool:
        """Finished within p tokens. Known from the last delta (which carries the finish
        reason), not from the stream's end, so no decision depends on timing."""
        return (self.finish_reason is not None or self.done) and len(self.ids) <= p


def decision_points(first: int, growth: float, budget: int) -> Iterator[int]:
    """d, d + ⌈g·d⌉, d + ⌈g·d⌉ + ⌈g·⌈g·d⌉⌉, ... below the token budget (at the budget
    every track has finished anyway)."""
    point, stretch = first, first
    while point < budget:
        yield point
        stretch = max(1, math.ceil(stretch * growth))
        point += stretch


@register
class SpeculativeRejection:
    class Options(StrategyOptions):
        alpha: float = Field(0.5, ge=0.0, lt=1.0, description="Share of the pool rejected "
                             "per round.")
        decision_tokens: int = Field(16, ge=1, description="Tokens before the first decision "
                                     "point.")
        growth: float = Field(2.0, ge=1.0, le=16.0, description="Each later round's length "
                              "multiplier.")

    name = "speculative_rejection"
    needs_objective = True
    streams_tokens = False
    streams_text = False
    value_protocol = Scorer  # `alignment.value`: any scorer (value head or text scorer)
    value_required = False
    needs_sampling = False
    adapter_option = None
    generations_per_answer = 1

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        assert req.objective is not None
        timer = Timer()
        tracks = [_Track(i) for i in range(req.n)]
        t0 = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as tg:
                for t in tracks:
                    sampling = capped(req.sampling, seed=derive_seed(req.sampling.seed, "track",
                                                                     t.index))
                    t.task = tg.create_task(self._follow(ctx, req, t, sampling))
                pool, rejected = await self._decide(ctx, req, tracks, timer)
                await self._reach(pool, math.inf)
                timer.generate_s += time.perf_counter() - t0  # overlaps score_s: both ran at once
                finals = await self._judge(ctx, req, pool, math.inf, None, timer)
        except ExceptionGroup as group:  # a track's engine error or a scorer error: raise it
            raise group.exceptions[0] from group
        # The TaskGroup has waited for every aborted track: their token counts are final.
        best = pool[max(range(len(pool)), key=finals.__getitem__)]  # first of equal scores
        chosen = best.final["objective"]
        assert isinstance(chosen, Scored)  # survivors' answers are judged by the objective
        return DecodeResult(
            strategy=self.name, n=req.n, sample=chosen.sample, reward=chosen.reward,
            cost=chosen.cost, kl_bound=selection_kl_bound(req.n), kl_estimate=None,
            win_rate_bound=bon_win_rate_bound(req.n),
            generated_tokens=sum(len(t.ids) for t in tracks), scored_candidates=req.n,
            timer=timer,
            candidates=[self._candidate(ctx, req, t) for t in tracks]
            if req.return_candidates else None,
            extra={"rounds": len(rejected) + 1, "rejected": rejected,
                   **({"value": req.value.name} if req.value is not None else {})},
        )

    async def _follow(self, ctx: DecodeContext, req: DecodeRequest, track: _Track,
                      sampling) -> None:
        """Feed `track` from its own engine stream until it ends. Cancelled on rejection:
        the cancellation reaches the engine call, which aborts the request."""
        stream = ctx.engine.stream_sequence(req.prompt_ids, sampling)
        try:
            async with contextlib.aclosing(stream):
                async for d in stream:
                    track.ids += d.token_ids
                    track.logprobs += d.logprobs
                    track.top += d.top_logprobs or ()
                    track.finish_reason = d.finish_reason or track.finish_reason
                    track.poke()
        finally:
            track.done = True
            track.poke()

    async def _decide(self, ctx: DecodeContext, req: DecodeRequest, tracks: list[_Track],
                      timer: Timer) -> tuple[list[_Track], list[int]]:
        """Run the decision points; returns the survivors and how many each point rejected."""
        opts = self.Options.of(req)
        alpha = opts.alpha
        pool, rejected = list(tracks), []
        points = decision_points(opts.decision_tokens, opts.growth, req.sampling.max_tokens)
        for p in points:
            if len(pool) == 1 or all(t.finished_by(p) for t in pool):
                break  # nothing left to decide
            await self._reach(pool, p)
            # Survivors keep decoding while this point is scored (the engine is not paused).
            scores = await self._judge(ctx, req, pool, p, req.value, timer)
            keep = max(1, int((1 - alpha) * len(pool) + 0.5))  # round half up, never 0
            order = sorted(range(len(pool)), key=lambda i: -scores[i])  # stable: ties keep order
            for i in order[keep:]:
                pool[i].rejected = True
                task = pool[i].task
                if task is not None:
                    task.cancel()  # aborts its engine request now (no-op if it ended)
            rejected.append(len(pool) - keep)
            pool = [t for t in pool if not t.rejected]
        return pool, rejected

    @staticmethod
    async def _reach(tracks: list[_Track], p: float) -> None:
        """Wait until every track has produced p tokens or ended (math.inf: ended)."""
        for t in tracks:
            t.wait_for = p
            t.reached.clear()
            t.poke()
        for t in tracks:
            await t.reached.wait()

    async def _judge(self, ctx: DecodeContext, req: DecodeRequest, pool: list[_Track], p: float,
                     value: Scorer | None, timer: Timer) -> list[float]:
        """One selection score per track of `pool`, each on its state at point p: its first p
        ids, or the whole answer if it finished within p. Scored by `value` when given, else
        by the objective; verdicts on whole answers are kept (each is judged once per kind)."""
        kind = "objective" if value is None else "value"
        views = [self._view(ctx, req, t, p) for t in pool]
        verdicts: dict[int, Scored | float] = {
            i: t.final[kind] for i, t in enumerate(pool) if views[i].finished and kind in t.final}
        todo = [i for i in range(len(pool)) if i not in verdicts]
        if todo:
            samples = [views[i] for i in todo]
            if value is None:
                assert req.objective is not None  # the server requires one (needs_objective)
                fresh: list = await ctx.score_samples(req.objective, req, samples, timer)
            else:
                s0 = time.perf_counter()
                fresh = await ctx.score(value, req, samples)
                timer.score_s += time.perf_counter() - s0
            for i, verdict in zip(todo, fresh):
                verdicts[i] = verdict
                if value is None:
                    pool[i].scored = verdict
                if views[i].finished:
                    pool[i].final[kind] = verdict
        return [v.score if isinstance(v, Scored) else float(v)
                for v in (verdicts[i] for i in range(len(pool)))]

    @staticmethod
    def _view(ctx: DecodeContext, req: DecodeRequest, t: _Track, p: float) -> Sample:
        """The track as a decision at point p sees it: its whole answer if it finished within
        p tokens, else its first p ids (text: the decoding of exactly those ids)."""
        if t.finished_by(p):
            return Sample(list(t.ids), _text(ctx, req, t.ids), list(t.logprobs),
                          t.finish_reason or "length", list(t.top) if t.top else None)
        ids = t.ids[: int(p)]
        return Sample(ids, ctx.engine.decode(ids).rstrip(_REPLACEMENT), t.logprobs[: len(ids)],
                      None)

    @staticmethod
    def _candidate(ctx: DecodeContext, req: DecodeRequest, t: _Track) -> Scored:
        """A candidate as reported: every token it generated; a rejected one unfinished, with
        the scores it was rejected on (None when partial answers were judged by `value`)."""
        if not t.rejected:
            final = t.final["objective"]
            assert isinstance(final, Scored)
            return final
        sample = Sample(list(t.ids), _text(ctx, req, t.ids), list(t.logprobs), None)
        s = t.scored
        # never scored by the objective (judged by `value`): no reward, and a score below all
        return Scored(sample, s.reward if s else None, s.cost if s else None,
                      s.score if s else -math.inf)


def _text(ctx: DecodeContext, req: DecodeRequest, ids: list[int]) -> str:
    """The text of a whole answer: the decoding of all its ids, cut at the first stop string
    (the engine stops on it but keeps the ids that produced it)."""
    text = ctx.engine.decode(ids)
    hits = [i for i in (text.find(s) for s in req.sampling.stop) if i >= 0]
    return text[: min(hits)] if hits else text
