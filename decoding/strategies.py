"""Strategy registry: plain sampling, best-of-n and soft best-of-n.

A strategy turns one `DecodeRequest` into one `DecodeResult` using only the `Engine` and the
scorers of the request's `Objective`. New strategies register themselves in `STRATEGIES`;
the server looks names up there and never branches on them.

How to add a strategy (one module; nothing else to edit):

1. Write a class with the attributes of the `Strategy` protocol below, every one given
   explicitly (the server reads them without defaults), and an `Options` model: a subclass
   of `StrategyOptions` whose fields are the strategy's own request options, each with
   bounds and a description (they appear in the OpenAPI schema, flat inside `alignment`):

       class Options(StrategyOptions):
           block_tokens: int = Field(16, ge=1, le=1024, description="Tokens per block.")

2. In `run`, read them typed: `opts = self.Options.of(req)` (defaults when none were given).
3. Decorate the class with `@register` and import its module in decoding/__init__.py, so
   that `STRATEGIES` holds it. The server builds `alignment` as a union discriminated on
   `strategy` from this registry (server/protocol.py), so a request naming another
   strategy's option is a 400 naming the field. Refusing OpenAI fields the strategy cannot
   honour is a line in server/fields.py (`UNSUPPORTED`).
"""

from __future__ import annotations

import math
import random
from typing import Any, ClassVar, Protocol

from pydantic import AliasChoices, Field

from .calibration import win_rate
from .kl import (
    bon_kl_bound,
    bon_kl_estimate,
    bon_win_rate_bound,
    sample_log_prob,
    selection_kl_bound,
)
from .protocols import DecodeContext, DecodeRequest, DecodeResult, Scored, StrategyOptions, Timer
from .scorer_work import scorer_work


class Strategy(Protocol):
    """What the server reads of a strategy; every strategy sets every attribute."""

    name: str
    Options: ClassVar[type[StrategyOptions]]  # its `alignment` fields (module docstring)
    needs_objective: bool  # the request must name a reward scorer (default: the server's)
    # The answer is one plain engine sample: with no objective the server streams its tokens
    # as the engine makes them, through `req.on_delta`.
    streams_tokens: bool
    # The strategy commits text before it finishes and calls `req.emit(piece)` with each
    # committed piece, which the server streams at once.
    streams_text: bool
    # The `Scorer` protocol `alignment.value` must satisfy (None: the strategy takes no value).
    value_protocol: type | None
    value_required: bool  # `alignment.value` must be given
    # It samples from the policy itself even at n = 1, so temperature 0 (greedy) is refused.
    # Selection strategies (`needs_objective`) refuse it only when they draw several candidates.
    needs_sampling: bool
    # The name of an option that must name a registered LoRA adapter (aligner: `corrector`);
    # the server refuses unknown names with a 400. None: no such option.
    adapter_option: str | None
    # Worst-case engine generations of max_tokens per answer for a strategy without an
    # objective (aligner: draft + correction = 2), for the token budget.
    generations_per_answer: int
    # Optional (read with getattr, default False): the strategy scores its i.i.d. candidates
    # in one call and compares scores only within it, so pool-relative scorers (`ensemble:`,
    # `calibrated:`: runtime/ensemble.py, `relative = True`) mean what they say.
    # relative_scores_ok: bool

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult: ...


STRATEGIES: dict[str, Strategy] = {}


def register(cls: type) -> type:
    strategy = cls()
    STRATEGIES[strategy.name] = strategy
    return cls


def options_for(name: str, values: dict[str, Any]) -> StrategyOptions:
    """Strategy `name`'s Options from a dict that may also hold other strategies' options
    (an evaluation sweep passes one dict to every strategy); keys it does not declare are
    dropped here, unlike in a request, where they are refused."""
    cls = STRATEGIES[name].Options
    return cls.model_validate({k: v for k, v in values.items() if k in option_keys(name)})


def option_keys(name: str) -> set[str]:
    """The JSON keys strategy `name` accepts as options (field names and their aliases)."""
    keys = set()
    for field_name, f in STRATEGIES[name].Options.model_fields.items():
        keys.add(field_name)
        if f.alias:
            keys.add(f.alias)
        if isinstance(f.validation_alias, AliasChoices):
            keys.update(c for c in f.validation_alias.choices if isinstance(c, str))
        elif isinstance(f.validation_alias, str):
            keys.add(f.validation_alias)
    return keys


class NoOptions(StrategyOptions):
    """A strategy without options of its own."""


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
        # win_rate_estimate / _interval / _beaten under the objective (decoding/calibration.py)
        extra={**win_rate([s.score for s in pool],
                          next(i for i, s in enumerate(pool) if s is chosen)).fields(),
               **scorer_work(req.objective, [s.sample for s in pool])},
    )


@register
class NoAlignment:
    """Plain sampling: one draw from the policy (scored when the request names a reward)."""

    name = "none"
    Options = NoOptions
    needs_objective = False
    streams_tokens = True
    streams_text = False
    value_protocol = None
    value_required = False
    needs_sampling = False
    adapter_option = None
    generations_per_answer = 1

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        timer = Timer()
        if req.on_delta is None:
            (sample,) = await ctx.generate(req.prompt_ids, 1, req.sampling, timer)
        else:  # streamed: the server relays each delta as the engine makes it
            sample = await ctx.stream(req.prompt_ids, req.sampling, timer, req.on_delta)
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
    Options = NoOptions
    needs_objective = True
    streams_tokens = False
    streams_text = False
    value_protocol = None
    value_required = False
    needs_sampling = False
    adapter_option = None
    generations_per_answer = 1
    relative_scores_ok = True

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        timer = Timer()
        pool = await sample_and_score(req, ctx, timer)
        chosen = max(pool, key=lambda s: s.score)  # first of equal scores: ties stay i.i.d.-fair
        result = _result(self.name, req, pool, chosen, timer)
        result.kl_bound = bon_kl_bound(req.n)
        log_eps = sample_log_prob(chosen.sample.token_ids, chosen.sample.logprobs)
        result.kl_estimate = None if log_eps is None else bon_kl_estimate(req.n, log_eps)
        result.win_rate_bound = bon_win_rate_bound(req.n)
        return result


@register
class SoftBestOfN:
    """Draw candidate i with probability softmax(score_i / λ) (λ = `selection_temperature`).

    As n grows this tends to the KL-regularised optimum p·exp(r/λ). It returns one of n i.i.d.
    draws, so KL ≤ log n; Beirami's estimator is specific to the argmax rule, so `kl_estimate`
    is None. The argmax maximises the win rate among rules over n draws, so n/(n+1) still bounds it.
    """

    class Options(StrategyOptions):
        # Named `temperature` until the sampling temperature next to it made that ambiguous;
        # the old key is still accepted (deprecated alias).
        selection_temperature: float = Field(
            1.0, gt=0.0, allow_inf_nan=False,
            validation_alias=AliasChoices("selection_temperature", "temperature"),
            description="λ in softmax(score/λ). Deprecated alias: `temperature`.")

    name = "soft_best_of_n"
    needs_objective = True
    streams_tokens = False
    streams_text = False
    value_protocol = None
    value_required = False
    needs_sampling = False
    adapter_option = None
    generations_per_answer = 1
    relative_scores_ok = True

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        timer = Timer()
        pool = await sample_and_score(req, ctx, timer)
        lam = self.Options.of(req).selection_temperature
        weights = soft_weights([s.score for s in pool], lam)
        chosen = random.Random(req.seed).choices(pool, weights=weights)[0]
        result = _result(self.name, req, pool, chosen, timer)
        if req.return_candidates:  # the trace: each candidate's chance of being the answer
            total = math.fsum(weights)
            result.extra["selection_probabilities"] = [w / total for w in weights]
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

