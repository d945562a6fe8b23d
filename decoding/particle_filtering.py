"""Particle filtering: "sample, don't search" (Puri et al. 2025, "A Probabilistic Inference
Approach to Inference-Time Scaling of LLMs using Particle-Based Monte Carlo Methods",
arXiv 2502.01618, §3 and its Algorithm 1; its_hub's `ParticleFiltering`).

K = `n` particles (partial answers) are extended block by block: every block, each unfinished
particle draws M = `block_tokens` more tokens from p(·|prompt + its ids). Particles that share
their ids (copies made by resampling) are continued by ONE engine call with n = copies on the
exact ids `prompt_ids + ids`, so the engine's prefix cache shares the prefix, and their children
are i.i.d.; the calls of one block run concurrently. The first block is aligned to the KV block
size like blockwise CD's (decoding/blockwise_cd.py, `aligned_first_block`).

Weights (the paper's state-space model). After every block, every particle (finished ones too,
so that all n are scored in one call and a pool-relative value compares like with like) is
scored by the value V of its partial answer — `DecodeRequest.value` (a value head `value:NAME`,
a text scorer or an ensemble) or by default the request's reward, minus cost_weight·cost when
the request names a cost — and its log-weight grows by V/T (T = `resampling_temperature`):
each block's value is one observation of the partial answer's quality, so the particle set
targets p(y)·Πₜ exp(Vₜ(y≤ₜ)/T) (Puri et al. §3.1, the PRM score as the emission of every step).
its_hub resamples after every step with weights softmax(logit(PRM score)): that is this rule
with `ess_threshold` = 1, T = 1 and V = the logit of a probability-valued PRM.

Resampling (adaptive, Doucet & Johansen 2009, §3.5). When the effective sample size
ESS = 1/Σ wᵢ² of the normalised weights falls below `ess_threshold`·n and some particle is still
unfinished, the particles are resampled **systematically** (Kitagawa 1996; one uniform u from
the request's `seed`, `derive_seed(seed, "resample", block)`, positions (u + i)/n): particle i is
copied ⌊n·wᵢ⌋ or ⌈n·wᵢ⌉ times, n·wᵢ in expectation — unbiased like its_hub's multinomial draw,
with less variance (Douc, Cappé & Moulines 2005). Weights then reset to uniform. Finished
particles stay in the set, are resampled like the others and keep their text (its_hub
convention). No resampling after the last block: the answer is chosen from the final weights.

The answer. `selection: "sample"` (default) draws one particle from the final weights with the
request's seed: the particle approximation of the target, as the paper's inference framing
intends ("sample, don't search"), so T keeps its meaning up to the answer; `"argmax"` returns
the heaviest particle (its_hub's default `SelectionMethod.ARGMAX`, first of equal weights).

Accounting. Let B(y) be the number of blocks of answer y and M_t the particles equal to y's
first t blocks after block t. A particle's block t + 1 is drawn from p(·|its prefix), and after
resampling every prefix is a copy of one already there, so P(some particle = y≤ₜ₊₁) ≤
n·P(M_t ≠ ∅)·p(y_{t+1}|y≤ₜ): π(y) ≤ n^{B(y)}·p(y) whatever the weights, resampling schedule
and final pick, hence KL(π‖p) ≤ log n · E_π[B] ≤ log n · ⌈max_tokens/M⌉ (`kl_bound`, the same
shape as blockwise CD's per-block bound with log n in place of log K − (K−1)/K). With
`ess_threshold` = 0 nothing is ever resampled, the particles are n i.i.d. answers and the rule
returns one of them: KL ≤ log n and win rate ≤ n/(n+1). What does NOT hold: (1 + resamplings)·log n
with the resamplings this answer happened to see (the schedule depends on the weights, so that
path value is no bound); no estimator like Beirami's applies (`kl_estimate` null); with
resampling, the answer is not one of n i.i.d. draws, so n/(n+1) does not bound its win rate
(`win_rate_bound` null) and no calibrated win-rate estimate is reported.

Streaming. The answer is one of the final particles, so the longest common text prefix of all
particles is final; it is streamed (through `emit`) as it grows — held back at an unfinished
character and at a tail that could begin a stop string, as decoding/committed.py does — and the
rest of the chosen answer when it is chosen. It grows when resampling collapses the particles
onto fewer ancestors; with diverse particles the answer arrives at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from .blockwise_cd import aligned_first_block
from .committed import _REPLACEMENT, Committed, _stop_prefix_len, capped
from .context import DecodeContext
from .kl import bon_win_rate_bound, selection_kl_bound
from .protocols import Scorer
from .request import DecodeRequest, DecodeResult, Objective, Scored, StrategyOptions, Timer
from .scorer_work import ScorerWork, objective_scorers
from .seeds import derive_seed
from .strategies import Traits, register, resuming
from .types import Sample


def normalised(log_weights: Sequence[float]) -> list[float]:
    """exp(log wᵢ)/Σ exp(log wⱼ), stable for any scale."""
    top = max(log_weights)
    w = [math.exp(x - top) for x in log_weights]
    total = math.fsum(w)
    return [x / total for x in w]


def effective_sample_size(weights: Sequence[float]) -> float:
    """ESS = (Σwᵢ)²/Σwᵢ² (Kong, Liu & Wong 1994): n for uniform weights, 1 for one-hot."""
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return total * total / math.fsum(w * w for w in weights)


def systematic_resample(weights: Sequence[float], u: float) -> list[int]:
    """Parent index of each of n new particles: position (u + i)/n, i < n, falls in parent j's
    slice of the cumulative normalised weights (u ∈ [0, 1)). Parent j gets ⌊n·wⱼ⌋ or ⌈n·wⱼ⌉
    copies, n·wⱼ in expectation over u ~ U[0, 1) (Kitagawa 1996)."""
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u}")
    n, total = len(weights), math.fsum(weights)
    cum, acc = [], 0.0
    for w in weights:
        acc += w / total
        cum.append(acc)
    cum[-1] = 1.0  # rounding must not leave the last position beyond the last slice
    out, j = [], 0
    for i in range(n):
        pos = (u + i) / n
        while pos >= cum[j]:
            j += 1
        out.append(j)
    return out


@dataclass
class _Particle:
    answer: Committed
    log_weight: float = 0.0
    last: Scored | None = None  # the value's verdict on the whole partial answer, last block

    def copy(self) -> _Particle:
        a = Committed(self.answer.req, self.answer.engine)
        a.ids, a.logprobs = list(self.answer.ids), list(self.answer.logprobs)
        a.text, a.finish_reason = self.answer.text, self.answer.finish_reason
        return _Particle(a, self.log_weight, self.last)


@register
class ParticleFiltering:
    class Options(StrategyOptions):
        block_tokens: int = Field(16, ge=1, le=1024, description="Tokens per block.")
        resampling_temperature: float = Field(
            1.0, gt=0.0, le=1e6, description="T: each block multiplies a particle's weight "
            "by exp(value/T).")
        ess_threshold: float = Field(
            0.5, ge=0.0, le=1.0, description="Resample when the effective sample size falls "
            "below this fraction of n (0: never, the n particles stay i.i.d.; 1: after every "
            "block whose weights are not uniform).")
        selection: Literal["sample", "argmax"] = Field(
            "sample", description="The answer: drawn from the final weights, or the heaviest "
            "particle.")

    name = "particle_filtering"
    traits = Traits(
        needs_objective=True,  # the default value, and the reward/cost of the final answer
        streams="text",  # the particles' common prefix is final: `emit` streams it
        needs_sampling=False,
        value_protocol=Scorer,  # any scorer: a value head (token ids) or a text scorer
        # every block scores all n particles in one call, but log-weights add up values of
        # different calls, and the final reward is one answer's: pool-relative scorers are
        # refused (relative_values_ok and relative_scores_ok stay False)
        refuses={**resuming("it continues its particles block by block"),
                 "ignore_eos": "it ends the answer on EOS itself"})

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        assert req.objective is not None
        opts = self.Options.of(req)
        value = req.value or req.objective.reward
        selection = Objective(value, req.objective.cost, req.objective.cost_weight)
        k, timer, work = req.n, Timer(), ScorerWork()
        quiet = dataclasses.replace(req, emit=None)  # particles never stream on their own
        particles = [_Particle(Committed(quiet, ctx.engine)) for _ in range(k)]
        stream = _Stream(req)
        first = aligned_first_block(len(req.prompt_ids), opts.block_tokens,
                                    getattr(ctx.engine, "block_size", None))
        blocks = generated = 0
        ess_trace: list[float] = []
        resampled_after: list[int] = []
        while not all(p.answer.done for p in particles):
            live = [p for p in particles if not p.answer.done]
            m = min([first if blocks == 0 else opts.block_tokens,
                     *(p.answer.budget_left for p in live)])
            generated += await _extend(ctx, req, live, m, blocks, timer)
            partials = [p.answer.sample() for p in particles]
            verdicts = await ctx.score_samples(selection, req, partials, timer)
            work.add(partials, objective_scorers(selection))
            for p, v in zip(particles, verdicts):
                if math.isnan(v.score):
                    raise RuntimeError(f"value {value.name} returned NaN")
                p.log_weight += v.score / opts.resampling_temperature
                p.last = v
            blocks += 1
            ess = effective_sample_size(normalised([p.log_weight for p in particles]))
            ess_trace.append(round(ess, 6))
            if ess < opts.ess_threshold * k and not all(p.answer.done for p in particles):
                u = random.Random(derive_seed(req.seed, "resample", blocks)).random()
                parents = systematic_resample(normalised([p.log_weight for p in particles]), u)
                particles = [particles[j].copy() for j in parents]
                for p in particles:
                    p.log_weight = 0.0
                resampled_after.append(blocks)
            stream.advance(particles)

        weights = normalised([p.log_weight for p in particles])
        if opts.selection == "sample":
            chosen = random.Random(derive_seed(req.seed, "select")).choices(
                range(k), weights=weights)[0]
        else:
            chosen = max(range(k), key=lambda i: weights[i])  # first of equal weights
        answer = particles[chosen].answer.sample()
        stream.finish(answer.text)
        never_resamples = opts.ess_threshold == 0
        max_blocks = math.ceil(req.sampling.max_tokens / opts.block_tokens)
        result = DecodeResult(
            strategy=self.name, n=k, sample=answer,
            kl_bound=selection_kl_bound(k) * (1 if never_resamples else max_blocks),
            kl_estimate=None, win_rate_bound=bon_win_rate_bound(k) if never_resamples else None,
            generated_tokens=generated, scored_candidates=k * blocks, timer=timer,
            extra={"blocks": blocks, "block_tokens": opts.block_tokens,
                   "first_block_tokens": first, "value": value.name,
                   "resampling_temperature": opts.resampling_temperature,
                   "ess_threshold": opts.ess_threshold, "resampling": "systematic",
                   "selection": opts.selection, "ess": ess_trace,
                   "resampled_after_blocks": resampled_after,
                   "final_weights": [round(w, 6) for w in weights], "chosen_index": chosen})
        finals = await self._final_scores(ctx, req, value, particles, chosen, timer, work)
        result.reward, result.cost = finals[chosen].reward, finals[chosen].cost
        if req.return_candidates:
            result.candidates = finals
        result.extra.update(work.fields())
        return result

    async def _final_scores(self, ctx: DecodeContext, req: DecodeRequest, value: Scorer,
                            particles: list[_Particle], chosen: int, timer: Timer,
                            work: ScorerWork) -> list[Scored]:
        """The objective's verdict on the final particles: the last block's when the value is
        the reward (it judged these very texts, cost included); otherwise the chosen answer is
        scored (and every particle, only when the request asks for the candidates)."""
        assert req.objective is not None
        lasts = [p.last for p in particles if p.last is not None]
        if value is req.objective.reward and len(lasts) == len(particles):
            return lasts
        if req.return_candidates:
            samples = [p.answer.sample() for p in particles]
            work.add(samples, objective_scorers(req.objective))
            return await ctx.score_samples(req.objective, req, samples, timer)
        sample = particles[chosen].answer.sample()
        work.add([sample], objective_scorers(req.objective))
        (final,) = await ctx.score_samples(req.objective, req, [sample], timer)
        return [final if i == chosen else _unscored(p) for i, p in enumerate(particles)]


def _unscored(p: _Particle) -> Scored:
    return Scored(p.answer.sample(), None, None, math.nan)


async def _extend(ctx: DecodeContext, req: DecodeRequest, live: list[_Particle], m: int,
                  block: int, timer: Timer) -> int:
    """One block more for every live particle: one engine call per distinct prefix, n = the
    particles sharing it, all calls concurrent; returns the tokens generated."""
    groups: dict[tuple[int, ...], list[_Particle]] = {}
    for p in live:
        groups.setdefault(tuple(p.answer.ids), []).append(p)
    scratch = Timer()  # the calls overlap: the block's wall time is counted once, below

    async def one(g: int, prefix: tuple[int, ...], n: int) -> list[Sample]:
        sampling = capped(req.sampling, max_tokens=m,
                          seed=derive_seed(req.sampling.seed, "block", block, g))
        return await ctx.generate(req.prompt_ids + list(prefix), n, sampling, scratch)

    t0 = time.perf_counter()
    try:  # a TaskGroup cancels the other calls (aborting them) when one fails
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(g, prefix, len(members)))
                     for g, (prefix, members) in enumerate(groups.items())]
    finally:
        timer.generate_s += time.perf_counter() - t0
    generated = 0
    for task, members in zip(tasks, groups.values()):
        for p, s in zip(members, task.result()):
            p.answer.append(s.token_ids, s.logprobs, s.finish_reason)
            generated += len(s.token_ids)
    return generated


class _Stream:
    """Streams what every particle agrees on: their common text prefix is final."""

    def __init__(self, req: DecodeRequest) -> None:
        self.emit, self.stops, self.emitted = req.emit, req.sampling.stop, ""

    def advance(self, particles: Sequence[_Particle]) -> None:
        if self.emit is None:
            return
        common = os.path.commonprefix([p.answer.text for p in particles])
        if not all(p.answer.done for p in particles):
            common = common.rstrip(_REPLACEMENT)  # an unfinished character: wait for its bytes
            # a stop string that begins here and ends in a later block would cut the text
            common = common[: len(common) - _stop_prefix_len(common, self.stops)]
        self._send(common)

    def finish(self, text: str) -> None:
        if self.emit is not None:
            self._send(text)

    def _send(self, stable: str) -> None:
        assert self.emit is not None
        if len(stable) > len(self.emitted) and stable.startswith(self.emitted):
            self.emit(stable[len(self.emitted):])
            self.emitted = stable
