"""Speculative rejection (Sun et al., NeurIPS 2024, arXiv 2410.20290).

The reward of a partial response predicts the reward of its completion, so start N sequences and
stop the worst early. At each decision point, score every live partial answer and every finished
one, keep the top round((1−α)·|pool|) (finished ones compete too, and can be rejected; never
fewer than one), and stop the rest; after the last decision (or once one track is left) the
survivors run to their end. The answer is the best, by the request's objective, among the
survivors AND every track that had finished when it was rejected: a finished answer's score is
exact, not a prediction, and the reference implementation keeps every finished trajectory for
the final choice. (A track rejected while unfinished is not eligible, even if its stream ended
before the abort arrived: that would make the answer depend on timing.)

Decision schedule (`schedule`):
- "growth": points at `decision_tokens` generated tokens, then each later one a `growth`×
  longer stretch further (d, d + ⌈g·d⌉, ...); implied when the request gives `growth`.
- "memory" (the default): the memory-driven rule of Sun et al.'s reference implementation (a decision
  comes when the batch has filled the memory the first round filled; this is our
  reconstruction of it for a paged-KV engine, not an equation of the paper). The pool holds
  |pool|·p tokens at point p; after keeping k tracks, the next decision comes when the k
  survivors hold as many: p' = ⌈p·|pool|/k⌉, i.e. ×1/(1−α) up to rounding (16, 32, 64 at
  α = ½). Pool sizes depend
  only on N and α, so the points are known in advance (`memory_points`); when a decision
  rejects nothing (α = 0, or a pool too small to round down) there is no later point.
Unset `decision_tokens` is derived from max_tokens, N and α (`first_decision`). Defaults chosen
from the sweep in bench/results/spr_sweep.md (bench/bench_spr_sweep.py).

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
answer depends only on the tracks' seeds and not on timing: a seeded request is reproducible.
Track i is seeded seed + i (`child_seed`), the seed vLLM gives child i of one n = N call, so
with the same request seed the N tracks are best-of-N's N candidates, cut where they were
rejected: SpR against best-of-N is a paired comparison. Tokens a rejected track decoded between
its decision point and its abort are real compute: they count in `generated_tokens` and stay
in its candidate entry (whose reward is the one it was rejected on, that of its first p
tokens). Rejected candidates report `finish_reason` None, except those that had
finished when rejected: they keep their finish reason and their score on the whole answer.

`value` (optional, as blockwise CD has): partial answers (and the finished ones they compete
with) are judged by a value scorer instead of the objective — the SpR paper's suggested next
step; the final choice (survivors and finished tracks) is still by the request's objective
(reward − cost_weight·cost), so a finished track judged by `value` when it was rejected is
scored by the objective at the end.

Scorer work (`scorer_calls`, `scored_tokens` in the answer's alignment info): every answer,
partial or whole, handed to a scorer, at every decision point and at the end, counted once per
scorer that read it (reward, cost, or value), and the response tokens those answers hold.
Verdicts on whole answers are reused, not recomputed, and are not counted again.
`scored_candidates` stays N (the candidates).

KL: the answer is one of N i.i.d. draws (however it was chosen among them), so KL ≤ log N
(π(y) ≤ N·p(y)); no estimator is known for this rule, so `kl_estimate` is None. The argmax
of N draws maximises the win rate, so N/(N+1) still bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from .committed import capped
from .context import DecodeContext
from .kl import bon_win_rate_bound, selection_kl_bound
from .protocols import Scorer
from .request import DecodeRequest, DecodeResult, Scored, StrategyOptions, Timer
from .scorer_work import ScorerWork, objective_scorers
from .seeds import child_seed
from .strategies import Traits, register
from .types import Sample

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
    rejected_finished: bool = False  # rejected after it had finished: still eligible at the end
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


def kept(size: int, alpha: float) -> int:
    """round((1−α)·size), half up, never 0: how many of a pool of `size` a decision keeps."""
    return max(1, int((1 - alpha) * size + 0.5))


def memory_points(first: int, alpha: float, n: int, budget: int) -> Iterator[int]:
    """The paper's memory-driven schedule (module docstring): p, then ⌈p·|pool|/k⌉ with k the
    tracks kept, below the token budget; none after a decision that rejects nothing."""
    point, size = first, n
    while point < budget:
        yield point
        keep = kept(size, alpha)
        if keep >= size:
            return
        point, size = math.ceil(point * size / keep), keep


# The derived first decision (`first_decision`): the last decision lands at LAST_DECISION_AT of
# the answer, with about SURVIVORS tracks left to finish, never before MIN_FIRST tokens (in the
# sweep every 4-token start chose worse answers than the 8-token ones, and N = 64 at 4 tokens
# fell to best-of-32's reward) nor after MAX_FIRST (a client that omits max_tokens gets the
# context's remainder as its budget; the first decision must not wait for it).
SURVIVORS, LAST_DECISION_AT, MIN_FIRST, MAX_FIRST = 4, 0.5, 8, 32


def first_decision(max_tokens: int, n: int, alpha: float) -> int:
    """Tokens before the first decision when the request names none (a reconstruction, chosen
    from bench/results/spr_sweep.md): D = ⌈log_m(N / SURVIVORS)⌉ decisions, m = 1/(1−α)
    (the memory schedule's stretch), the first at p₀ = LAST_DECISION_AT·max_tokens / m^(D−1),
    so the memory schedule's D-th point lands at LAST_DECISION_AT of the answer: N = 32, α = ½
    → p₀ = max_tokens/8 (8, 16, 32 at 64 tokens), N = 64 → max_tokens/16 (at least 8)."""
    if n <= SURVIVORS or alpha <= 0:
        return min(MAX_FIRST, max(MIN_FIRST, round(LAST_DECISION_AT * max_tokens)))
    m = 1 / (1 - alpha)
    decisions = max(1, math.ceil(math.log(n / SURVIVORS) / math.log(m) - 1e-9))
    return min(MAX_FIRST, max(MIN_FIRST, round(LAST_DECISION_AT * max_tokens
                                                / m ** (decisions - 1))))


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
        decision_tokens: int | None = Field(
            None, ge=1, description="Tokens before the first decision point (unset: derived "
            "from max_tokens, N and α by `first_decision`).")
        growth: float = Field(2.0, ge=1.0, le=16.0, description="Each later round's length "
                              "multiplier (schedule \"growth\").")
        schedule: Literal["growth", "memory"] = Field(
            "memory", description="Decision points: \"memory\" (default), the paper's "
            "memory-driven rule, the generated length ×|pool|/|kept| ≈ 1/(1−α) after each "
            "decision (8, 16, 32 at α = ½); \"growth\", each stretch `growth`× the last "
            "(implied when `growth` is given).")

        @model_validator(mode="before")
        @classmethod
        def _growth_implies_its_schedule(cls, data):
            if isinstance(data, dict) and "growth" in data and "schedule" not in data:
                return {**data, "schedule": "growth"}  # a growth factor asks for its schedule
            return data

        @model_validator(mode="after")
        def _growth_needs_its_schedule(self):
            if self.schedule != "growth" and "growth" in self.model_fields_set:
                raise ValueError("growth applies to schedule \"growth\" only; the memory "
                                 "schedule's stretches follow α")
            return self

    name = "speculative_rejection"
    traits = Traits(
        needs_objective=True, streams="answer", needs_sampling=False,
        value_protocol=Scorer)  # `alignment.value`: any scorer (value head or text scorer)

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        assert req.objective is not None
        timer = Timer()
        work = ScorerWork()
        tracks = [_Track(i) for i in range(req.n)]
        t0 = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as tg:
                for t in tracks:
                    sampling = capped(req.sampling, seed=child_seed(req.sampling.seed, t.index))
                    t.task = tg.create_task(self._follow(ctx, req, t, sampling))
                pool, rejected, trace = await self._decide(ctx, req, tracks, timer, work)
                await self._reach(pool, math.inf)
                timer.generate_s += time.perf_counter() - t0  # overlaps score_s: both ran at once
                # survivors and every track that had finished when it was rejected, in index
                # order (ties: the lowest index, as among i.i.d. draws)
                eligible = [t for t in tracks if not t.rejected or t.rejected_finished]
                finals = await self._judge(ctx, req, eligible, math.inf, None, timer, work)
        except ExceptionGroup as group:  # a track's engine error or a scorer error: raise it
            raise group.exceptions[0] from group
        # The TaskGroup has waited for every aborted track: their token counts are final.
        best = eligible[max(range(len(eligible)), key=finals.__getitem__)]  # first of equal
        chosen = best.final["objective"]
        assert isinstance(chosen, Scored)  # eligible answers are judged by the objective
        return DecodeResult(
            strategy=self.name, n=req.n, sample=chosen.sample, reward=chosen.reward,
            cost=chosen.cost, kl_bound=selection_kl_bound(req.n), kl_estimate=None,
            win_rate_bound=bon_win_rate_bound(req.n),
            generated_tokens=sum(len(t.ids) for t in tracks), scored_candidates=req.n,
            timer=timer,
            candidates=[self._candidate(ctx, req, t) for t in tracks]
            if req.return_candidates else None,
            extra={"rounds": len(rejected) + 1, "rejected": rejected,
                   "chosen_rejected": best.rejected, "chosen_index": best.index,
                   "decision_points": trace, **work.fields(),
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
                      timer: Timer, work: ScorerWork
                      ) -> tuple[list[_Track], list[int], list[dict]]:
        """Run the decision points; returns the survivors, how many each point rejected and
        the trace of each point (tokens, pool, kept, the pruned tracks' indices and every
        track's partial score), which the answer reports as `decision_points`."""
        opts = self.Options.of(req)
        alpha = opts.alpha
        pool, rejected, trace = list(tracks), [], []
        budget = req.sampling.max_tokens
        first = opts.decision_tokens or first_decision(budget, len(pool), alpha)
        points = (memory_points(first, alpha, len(pool), budget) if opts.schedule == "memory"
                  else decision_points(first, opts.growth, budget))
        for p in points:
            if len(pool) == 1 or all(t.finished_by(p) for t in pool):
                break  # nothing left to decide
            await self._reach(pool, p)
            # Survivors keep decoding while this point is scored (the engine is not paused).
            scores = await self._judge(ctx, req, pool, p, req.value, timer, work)
            keep = kept(len(pool), alpha)
            order = sorted(range(len(pool)), key=lambda i: -scores[i])  # stable: ties keep order
            for i in order[keep:]:
                pool[i].rejected = True
                pool[i].rejected_finished = pool[i].finished_by(p)
                task = pool[i].task
                if task is not None:
                    task.cancel()  # aborts its engine request now (no-op if it ended)
            rejected.append(len(pool) - keep)
            trace.append({"tokens": p, "pool": len(pool), "kept": keep,
                          "pruned": sorted(pool[i].index for i in order[keep:]),
                          "scores": [[pool[i].index, scores[i]] for i in range(len(pool))]})
            pool = [t for t in pool if not t.rejected]
        return pool, rejected, trace

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
                     value: Scorer | None, timer: Timer, work: ScorerWork) -> list[float]:
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
            work.add(samples, 1 if value is not None else objective_scorers(req.objective))
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
        """A candidate as reported: every token it generated; a survivor or a track rejected
        after it had finished, whole and scored by the objective; any other rejected one
        unfinished, with the scores it was rejected on (None when judged by `value`)."""
        if not t.rejected or t.rejected_finished:
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
