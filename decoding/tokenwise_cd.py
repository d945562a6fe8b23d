"""Tokenwise controlled decoding with a CD-Q value head (Mudgal et al., ICML 2024, arXiv 2310.17022).

The KL-regularised optimal next-token policy is π*(z | x, yᵗ) ∝ p(z | x, yᵗ)·exp(λ·V(x, yᵗ, z)).

Two ways to run it:

In the engine (the default, when the engine is a `TiltingEngine` that loaded the head and the
request names no `top_k`): ONE engine request per answer, streamed token by token like plain
sampling and aborted on cancellation. The engine's CD-Q logits processor (valuenet/processor.py,
runtime/cdq_plugin.py) adds λ·Q(x, yᵗ, ·) over the whole vocabulary to every step's logits, with
the head's own KV cache per request, so the engine samples from p_T(z)·exp(λ·Q)/Z exactly (p_T:
the policy after temperature, the distribution the head's targets assume; top_p, when < 1, is
applied by vLLM after the tilt). `kl_estimate` = Σₜ KL(πₜ ‖ p_T,ₜ) along the decoded path,
computed by the processor from the very logits it tilted, whose expectation over paths is the
answer's KL(π ‖ p_T); `kl_bound` = Σₜ λ·(max Q − min Q) over the tokens p_T allows (each step's
term is below it; one path's bound, as below). Neither covers top-p truncation of π.
`Sample.logprobs` are then log π of the tokens (what was sampled); `scored_candidates` is 0
(the head runs inside the engine, on the whole vocabulary at every step).

Per token (FakeEngine, engines without the processor or without this head, and requests that
set `top_k`: FUDGE's top-k rescoring is a different policy, which the processor does not
implement): at each step one engine call (max_tokens=1, top-k log-probs) gives the policy's k
most likely next tokens; the Q head gives V(x, yᵗ, z) for all k in one forward pass (`QScorer.q_values`);
the next token is drawn from softmax(log p + λ·V) over those k (FUDGE's top-k rescoring, Yang &
Klein 2021, with Q values in place of a classifier's log-probabilities), seeded by the request
seed when given. λ = 0 is top-k sampling from the policy.

Accounting: `kl_estimate` = Σₜ KL(π̃ₜ ‖ p̃ₜ) along the decoded path, where p̃ₜ is the policy's
top-k distribution renormalised and π̃ₜ its tilt. It does not cover the policy mass outside the
top k, the temperature / top-p processing (p̃ is already processed), or an expectation over
paths (it is one path's sum). The draw never leaves the top k, so against the processed policy
itself the path's KL is kl_estimate + Σₜ −log(top-k mass), reported as `kl_outside_top_k`.
`kl_bound` = Σₜ λ·(max V − min V) bounds each step's term of
that same sum, since log π̃/p̃ = λ·V − log E_p̃ e^{λV} ≤ λ·(max V − min V). Both numbers are
one path's: they bound and estimate the KL terms met along this answer, not the expectation
KL(π‖p) over all answers (no bound on V over unseen prefixes is known); `kl_estimate` is
clamped to [0, kl_bound], which moves it by rounding error only.
`scored_candidates` counts the Q values (k per step). `generated_tokens` counts one engine
token per step: the engine samples a token we discard (a step costs one decode pass, like
plain sampling's token).
"""

from __future__ import annotations

import contextlib
import math
import random
import time

from pydantic import Field

from .committed import Committed, capped
from .kl import within
from .protocols import (
    DecodeContext,
    DecodeRequest,
    DecodeResult,
    QScorer,
    StrategyOptions,
    Tilt,
    TiltingEngine,
    Timer,
)
from .strategies import register

DEFAULT_TOP_K = 10  # the per-token mode's k when the request names none


def tilt(logps: list[float], values: list[float], lam: float) -> tuple[list[float], float]:
    """(π̃, KL(π̃ ‖ p̃)) for π̃ ∝ p̃·exp(λ·V) and p̃ = softmax(logps) (the renormalised top-k)."""
    base = _log_softmax(logps)
    tilted = _log_softmax([lp + lam * v for lp, v in zip(base, values)])
    probs = [math.exp(t) for t in tilted]
    kl = math.fsum(p * (t - b) for p, t, b in zip(probs, tilted, base) if p > 0)
    return probs, max(0.0, kl)


def _log_softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    log_z = top + math.log(math.fsum(math.exp(x - top) for x in xs))
    return [x - log_z for x in xs]


@register
class TokenwiseCD:
    class Options(StrategyOptions):
        # vLLM returns at most `max_logprobs` (20 by default) alternatives per position.
        top_k: int | None = Field(
            None, ge=1, le=20, description="Unset, the whole vocabulary is tilted inside the "
            "engine (one engine request per answer); k, FUDGE-style rescoring of the policy's "
            "top k with one engine round trip per token (the default, 10, where the engine "
            "cannot tilt).")
        lambda_: float = Field(1.0, ge=0.0, le=1e4, allow_inf_nan=False, alias="lambda",
                               description="λ in p(z)·exp(λ·V(x, yᵗ, z)).")

    name = "tokenwise_cd"
    needs_objective = False  # guided by the Q head; the reward is reported when one is named
    streams_tokens = False
    streams_text = True  # each drawn token is final: `emit` streams it
    value_protocol = QScorer  # needs V(x, yᵗ, z) for every candidate z at once
    value_required = True
    needs_sampling = True  # it draws from softmax(log p + λ·Q): greedy (T = 0) is refused
    adapter_option = None
    generations_per_answer = 1

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        q = req.value
        if not isinstance(q, QScorer):  # the server checks this at the edge (a 400)
            raise ValueError("tokenwise_cd needs a CD-Q value head (a QScorer)")
        opts = self.Options.of(req)
        top_k, lam = opts.top_k, opts.lambda_
        if top_k is None and q.name in getattr(ctx.engine, "tilt_heads", ()):
            result = await self._in_engine(req, ctx, q.name, lam)
        else:
            result = await self._per_token(req, ctx, q, int(top_k or DEFAULT_TOP_K), lam)
        if req.objective is not None:
            (final,) = await ctx.score_samples(req.objective, req, [result.sample], result.timer)
            result.reward, result.cost = final.reward, final.cost
        return result

    async def _in_engine(self, req: DecodeRequest, ctx: DecodeContext, head: str, lam: float
                         ) -> DecodeResult:
        """One tilted engine request, streamed into `Committed` (module docstring)."""
        engine: TiltingEngine = ctx.engine  # type: ignore[assignment]
        answer = Committed(req, engine)
        timer = Timer()
        step_kl: list[float] | None = None
        step_bound: list[float] | None = None
        t0 = time.perf_counter()
        try:
            async with contextlib.aclosing(engine.tilted(req.prompt_ids, req.sampling,
                                                         Tilt(head, lam))) as deltas:
                async for d in deltas:
                    if d.step_kl is not None:
                        step_kl, step_bound = d.step_kl, d.step_kl_bound
                    # The engine applies the same stop strings, EOS and budget: it finishes
                    # with the answer; anything after (never seen) is drained, not kept.
                    if not answer.done and (d.token_ids or d.finish_reason):
                        answer.append(d.token_ids, d.logprobs, d.finish_reason)
        finally:
            timer.generate_s += time.perf_counter() - t0
        steps = len(answer.ids)
        if step_kl is None or step_bound is None or len(step_kl) < steps:
            raise RuntimeError(f"the engine reported KL for {len(step_kl or ())} of {steps} "
                               "tilted steps")
        bound = math.fsum(step_bound[:steps])
        return DecodeResult(
            strategy=self.name, n=1, sample=answer.sample(), kl_bound=bound,
            kl_estimate=within(math.fsum(step_kl[:steps]), bound), generated_tokens=steps,
            scored_candidates=0, timer=timer,
            extra={"steps": steps, "top_k": None, "lambda": lam, "value": head,
                   "kl_outside_top_k": 0.0, "in_engine": True},
        )

    async def _per_token(self, req: DecodeRequest, ctx: DecodeContext, q: QScorer, k: int,
                         lam: float) -> DecodeResult:
        """One engine call and one head call per token, over the policy's top k."""
        rng = random.Random(req.seed)
        # Stop strings are matched on the whole answer by `Committed`; the engine's own draw
        # (seed) is discarded, so neither is passed on.
        step_sampling = capped(req.sampling, max_tokens=1, stop=(), seed=None, top_logprobs=k)
        answer = Committed(req, ctx.engine)
        timer = Timer()
        steps = scored = 0
        kl_estimate = kl_bound = outside = 0.0
        while not answer.done:
            (s,) = await ctx.generate(req.prompt_ids + answer.ids, 1, step_sampling, timer)
            top = s.top_logprobs[0] if s.top_logprobs else {}
            if not top:  # no alternatives reported: the engine's own draw is all there is
                top = {s.token_ids[0]: s.logprobs[0]}
            tokens = sorted(top, key=top.__getitem__, reverse=True)
            logps = [top[t] for t in tokens]
            values = await ctx.q_values(q, req, answer.ids, tokens, timer)
            scored += len(tokens)
            probs, kl = tilt(logps, values, lam)
            kl_estimate += kl
            outside -= math.log(min(1.0, math.fsum(math.exp(lp) for lp in logps)))
            kl_bound += lam * (max(values) - min(values))
            z = rng.choices(range(len(tokens)), weights=probs)[0]
            steps += 1
            # the policy's (processed) log-prob of z, not the renormalised one: same meaning
            # as every other Sample.logprobs
            answer.append([tokens[z]], [logps[z]], None)

        return DecodeResult(
            strategy=self.name, n=1, sample=answer.sample(), kl_bound=kl_bound,
            kl_estimate=within(kl_estimate, kl_bound), generated_tokens=steps,
            scored_candidates=scored, timer=timer,
            extra={"steps": steps, "top_k": k, "lambda": lam, "value": q.name,
                   "kl_outside_top_k": outside, "in_engine": False},
        )
