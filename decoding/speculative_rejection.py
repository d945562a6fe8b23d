"""Speculative rejection (Sun et al., NeurIPS 2024, arXiv 2410.20290).

The reward of a partial response predicts the reward of its completion, so start N sequences and
stop the worst early. Rounds: generate every live sequence up to the next decision point (the
first after `decision_tokens`, each later round `growth`× longer); score every partial and
finished response; keep the top round((1−α)·|pool|) (finished ones compete too, and can be
rejected); continue only the survivors; finish when no live sequence remains; return the best.

Unlike the reference code (which re-tokenises text between rounds and re-prefills everything),
survivors continue from their exact token ids, `prompt_ids + generated_ids`, so no token is lost
or changed and the engine's prefix cache reuses their KV blocks. Each round's engine requests
end at the decision point, so a rejected sequence holds no engine slot; cancellation (client
gone, scorer error) cancels the round in flight, which aborts its engine requests.

KL: the answer is one of N i.i.d. draws, so KL ≤ log N (π(y) ≤ N·p(y)); no estimator is known
for this rule, so `kl_estimate` is None. The argmax of N draws maximises the win rate, so
N/(N+1) still bounds it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .concurrency import gather_all
from .kl import bon_win_rate_bound, selection_kl_bound
from .protocols import DecodeContext, DecodeRequest, DecodeResult, Sample, Sampling, Scored, Timer
from .strategies import register


@dataclass
class _Track:
    """One of the N sequences: everything generated so far, and its latest score."""

    sample: Sample
    done: bool
    scored: Scored | None = None
    fresh: bool = False  # text changed since it was last scored


def _capped(sampling: Sampling, max_tokens: int) -> Sampling:
    return Sampling(**{**sampling.__dict__, "max_tokens": max_tokens})


def _is_done(sample: Sample, max_tokens: int) -> bool:
    # A round ends with "length" at its decision point; only the request's own budget finishes it.
    return sample.finish_reason == "stop" or len(sample.token_ids) >= max_tokens


def _extend(track: _Track, more: Sample, max_tokens: int) -> None:
    s = track.sample
    s.token_ids += more.token_ids
    s.text += more.text
    s.logprobs += more.logprobs
    s.finish_reason = more.finish_reason
    track.done = _is_done(s, max_tokens)
    track.fresh = True


@register
class SpeculativeRejection:
    name = "speculative_rejection"
    needs_objective = True
    streams_tokens = False

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        alpha = float(req.options.get("alpha", 0.5))
        round_len = int(req.options.get("decision_tokens", 16))
        growth = float(req.options.get("growth", 2.0))
        budget = req.sampling.max_tokens
        timer = Timer()
        generated = 0
        rejected: list[int] = []

        first = await ctx.generate(req.prompt_ids, req.n,
                                   _capped(req.sampling, min(round_len, budget)), timer)
        pool = [_Track(s, _is_done(s, budget), fresh=True) for s in first]
        everyone = list(pool)
        generated += sum(len(s.token_ids) for s in first)
        rounds = 1
        while True:
            await self._score(ctx, req, pool, timer)
            if all(t.done for t in pool):
                break
            keep = max(1, int((1 - alpha) * len(pool) + 0.5))  # round half up, never 0
            pool.sort(key=lambda t: t.scored.score, reverse=True)  # stable: ties keep draw order
            rejected.append(len(pool) - keep)
            for t in pool[keep:]:
                if not t.done:
                    t.sample.finish_reason = None  # stopped early: reported as unfinished
            pool = pool[:keep]
            live = [t for t in pool if not t.done]
            if not live:
                break
            round_len = max(1, math.ceil(round_len * growth))
            step = None if len(pool) == 1 else round_len  # a lone survivor needs no more decisions
            more = await self._continue(ctx, req, live, step, timer)
            for track, sample in zip(live, more):
                _extend(track, sample, budget)
                generated += len(sample.token_ids)
            rounds += 1

        best = max(pool, key=lambda t: t.scored.score)
        return DecodeResult(
            strategy=self.name, n=req.n, sample=best.sample, reward=best.scored.reward,
            cost=best.scored.cost, kl_bound=selection_kl_bound(req.n), kl_estimate=None,
            win_rate_bound=bon_win_rate_bound(req.n), generated_tokens=generated,
            scored_candidates=req.n, timer=timer,
            candidates=[t.scored for t in everyone] if req.return_candidates else None,
            extra={"rounds": rounds, "rejected": rejected},
        )

    async def _continue(self, ctx, req, live: list[_Track], step: int | None, timer):
        """Continue every live track from its exact ids, concurrently (continuous batching).
        A TaskGroup cancels the siblings if one fails, so nothing is left running."""
        budget = req.sampling.max_tokens
        t0 = time.perf_counter()
        out = await gather_all(
            ctx.generate(req.prompt_ids + t.sample.token_ids, 1,
                         _capped(req.sampling, min(step or budget, budget - len(t.sample.token_ids))),
                         Timer())  # concurrent calls: the round's wall time is what counts
            for t in live)
        timer.generate_s += time.perf_counter() - t0
        return [samples[0] for samples in out]

    async def _score(self, ctx, req, pool: list[_Track], timer) -> None:
        """Score the tracks whose text changed since their last score (finished ones once)."""
        stale = [t for t in pool if t.fresh]
        if not stale:
            return
        scored = await ctx.score_samples(req.objective, req,
                                         [t.sample for t in stale], timer)
        for track, s in zip(stale, scored):
            track.scored, track.fresh = s, False
