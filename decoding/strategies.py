"""Strategy registry: plain sampling, best-of-n and soft best-of-n.

A strategy turns one `DecodeRequest` into one `DecodeResult` using only the `Engine` and the
scorers of the request's `Objective`. New strategies register themselves in `STRATEGIES`;
the server looks names up there and never branches on them.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

from .kl import bon_kl_bound, bon_kl_estimate, bon_win_rate_bound, selection_kl_bound
from .protocols import DecodeContext, DecodeRequest, DecodeResult, Scored, Timer


class Strategy(Protocol):
    """Optional attributes, read with their defaults by the server (`getattr`):
    - `streams_text` (False): the strategy commits text before it finishes and calls
      `req.emit(piece)` with each committed piece, which the server streams at once;
    - `value_protocol` (None): the `Scorer` protocol that `alignment.value` must satisfy
      (None: the strategy takes no value);
    - `value_required` (False): `alignment.value` must be given;
    - `needs_sampling` (False): the strategy samples from the policy itself even at n = 1,
      so temperature 0 (greedy) is refused. Selection strategies (`needs_objective`) refuse it
      only when they draw more than one candidate;
    - `adapter_option` (None): the name of an option that must name a registered LoRA
      adapter (aligner: `corrector`); the server refuses unknown names with a 400;
    - `generations_per_answer` (1): worst-case engine generations of max_tokens per answer
      for a strategy without an objective (aligner: draft + correction = 2), for the budget.
    """

    name: str
    needs_objective: bool  # the request must name a reward scorer
    streams_tokens: bool  # the answer is one plain engine sample: the server may stream its tokens

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult: ...


STRATEGIES: dict[str, Strategy] = {}


def register(cls: type) -> type:
    strategy = cls()
    STRATEGIES[strategy.name] = strategy
    return cls


async def sample_and_score(
    req: DecodeRequest, ctx: DecodeContext, timer: Timer
) -> list[Scored]:
    """n i.i.d. samples from the policy, each scored by the request's objective."""
    assert req.objective is not None
    samples = await ctx.generate(req.prompt_ids, req.n, req.sampling, timer)
    return await ctx.score_samples(req.objective, req, samples, timer)


def _result(
    strategy: str, req: DecodeRequest, pool: list[Scored], chosen: Scored, timer: Timer
) -> DecodeResult:
    return DecodeResult(
        strategy=strategy,
        n=req.n,
        sample=chosen.sample,
        reward=chosen.reward,
        cost=chosen.cost,
        generated_tokens=sum(len(s.sample.token_ids) for s in pool),
        scored_candidates=len(pool),
        timer=timer,
        candidates=pool if req.return_candidates else None,
    )


@register
class NoAlignment:
    """Plain sampling: one draw from the policy (scored when the request names a reward)."""

    name = "none"
    needs_objective = False
    streams_tokens = True

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        timer = Timer()
        (sample,) = await ctx.generate(req.prompt_ids, 1, req.sampling, timer)
        result = DecodeResult(
            strategy=self.name, n=1, sample=sample, generated_tokens=len(sample.token_ids),
            timer=timer, win_rate_bound=0.5,
        )
        if req.objective is not None:
            (scored,) = await ctx.score_samples(req.objective, req, [sample], timer)
            result.reward, result.cost, result.scored_candidates = scored.reward, scored.cost, 1
        return result


@register
class BestOfN:
    """Return the highest-scoring of n i.i.d. samples (Beirami et al. 2024)."""

    name = "best_of_n"
    needs_objective = True
    streams_tokens = False

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        timer = Timer()
        pool = await sample_and_score(req, ctx, timer)
        chosen = max(pool, key=lambda s: s.score)  # first of equal scores: ties stay i.i.d.-fair
        result = _result(self.name, req, pool, chosen, timer)
        result.kl_bound = bon_kl_bound(req.n)
        result.kl_estimate = bon_kl_estimate(req.n, min(0.0, chosen.sample.logprob))
        result.win_rate_bound = bon_win_rate_bound(req.n)
        return result


@register
class SoftBestOfN:
    """Draw candidate i with probability softmax(score_i / λ) (λ = `temperature`).

    As n grows this tends to the KL-regularised optimum p·exp(r/λ). It returns one of n i.i.d.
    draws, so KL ≤ log n; Beirami's estimator is specific to the argmax rule, so `kl_estimate`
    is None. The argmax maximises the win rate among rules over n draws, so n/(n+1) still bounds it.
    """

    name = "soft_best_of_n"
    needs_objective = True
    streams_tokens = False

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        timer = Timer()
        pool = await sample_and_score(req, ctx, timer)
        weights = soft_weights([s.score for s in pool], req.temperature)
        chosen = random.Random(req.seed).choices(pool, weights=weights)[0]
        result = _result(self.name, req, pool, chosen, timer)
        result.kl_bound = selection_kl_bound(req.n)
        result.kl_estimate = None
        result.win_rate_bound = bon_win_rate_bound(req.n)
        return result


def soft_weights(scores: list[float], temperature: float) -> list[float]:
    """softmax(scores / temperature), stable for any scale."""
    if temperature <= 0:
        raise ValueError("soft best-of-n temperature must be > 0")
    top = max(scores)
    w = [math.exp((s - top) / temperature) for s in scores]
    total = math.fsum(w)
    return [x / total for x in w]

