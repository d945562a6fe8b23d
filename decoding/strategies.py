"""Strategy registry: plain sampling, best-of-n and soft best-of-n.

A strategy turns one `DecodeRequest` into one `DecodeResult` using only the `Engine` and the
scorers of the request's `Objective`. New strategies register themselves in `STRATEGIES`;
the server looks names up there and never branches on them.

How to add a strategy (one module; nothing else to edit):

1. Write a class with the attributes of the `Strategy` protocol below (its facts in one
   frozen `Traits`, refusals of OpenAI fields included), and an `Options` model: a subclass
   of `StrategyOptions` whose fields are the strategy's own request options, each with
   bounds and a description (they appear in the OpenAPI schema, flat inside `alignment`):

       class Options(StrategyOptions):
           block_tokens: int = Field(16, ge=1, le=1024, description="Tokens per block.")

2. In `run`, read them typed: `opts = self.Options.of(req)` (defaults when none were given).
3. Decorate the class with `@register` and import its module in decoding/__init__.py, so
   that `STRATEGIES` holds it. The server builds `alignment` as a union discriminated on
   `strategy` from this registry (server/protocol.py), so a request naming another
   strategy's option is a 400 naming the field. OpenAI fields the strategy cannot honour
   are its `Traits.refuses` (each refused with a 400 naming the field and why).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from pydantic import AliasChoices, Field

from .calibration import win_rate
from .context import DecodeContext
from .kl import (
    bon_kl_bound,
    bon_kl_estimate,
    bon_win_rate_bound,
    sample_log_prob,
    selection_kl_bound,
)
from .request import DecodeRequest, DecodeResult, Scored, StrategyOptions, Timer
from .scorer_work import scorer_work

# OpenAI fields a strategy that continues the answer in new engine requests cannot honour.
# vLLM's per-request state restarts at every continuation: a grammar (response_format, and a
# tool call, which is one grammar over the whole answer) would start a new JSON document,
# min_tokens would count from the continuation, presence/frequency penalties would forget the
# accepted tokens, and the top alternatives of earlier pieces are not kept. Speculative
# rejection is not such a strategy: each track is ONE engine request for the whole answer.
RESUMING_FIELDS = ("response_format", "min_tokens", "presence_penalty", "frequency_penalty",
                   "top_logprobs", "tools")


def resuming(why: str) -> dict[str, str]:
    """`Traits.refuses` of a strategy that continues the answer in new engine requests."""
    return dict.fromkeys(RESUMING_FIELDS, why)


@dataclass(frozen=True)
class Traits:
    """What the server reads of a strategy, in one object; the server never branches on names.
    The first three have no default: every strategy says them explicitly."""

    needs_objective: bool  # the request must name a reward scorer (default: the server's)
    # How the answer reaches a streaming client while it is made: "tokens" = one plain engine
    # sample whose deltas are relayed (`req.on_delta`, only without an objective); "text" =
    # the strategy commits text before it finishes (`req.emit(piece)`); "answer" = whole, at
    # the end.
    streams: Literal["tokens", "text", "answer"]
    # It samples from the policy itself even at n = 1, so temperature 0 (greedy) is refused.
    # Selection strategies (`needs_objective`) refuse it only when they draw several candidates.
    needs_sampling: bool
    # The `Scorer` protocol `alignment.value` must satisfy (None: the strategy takes no value).
    value_protocol: type | None = None
    value_required: bool = False  # `alignment.value` must be given
    # The name of an option that must name a registered LoRA adapter (aligner: `corrector`);
    # the server refuses unknown names with a 400.
    adapter_option: str | None = None
    # Worst-case engine generations of max_tokens per answer for a strategy without an
    # objective (aligner: draft + correction = 2), for the token budget.
    generations_per_answer: int = 1
    # The strategy scores its i.i.d. candidates (values) in one call and compares them only
    # within it, so pool-relative scorers (`ensemble:`, `calibrated:`: runtime/ensemble.py,
    # `relative = True`) mean what they say.
    relative_scores_ok: bool = False
    relative_values_ok: bool = False
    # OpenAI request field -> why the strategy cannot honour it (a 400 naming the field).
    refuses: Mapping[str, str] = field(default_factory=dict)


class Strategy(Protocol):
    """What the server reads of a strategy."""

    name: str
    Options: ClassVar[type[StrategyOptions]]  # its `alignment` fields (module docstring)
    traits: Traits

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
    traits = Traits(needs_objective=False, streams="tokens", needs_sampling=False)

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
    traits = Traits(needs_objective=True, streams="answer", needs_sampling=False,
                    relative_scores_ok=True)

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
    traits = Traits(needs_objective=True, streams="answer", needs_sampling=False,
                    relative_scores_ok=True)

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

