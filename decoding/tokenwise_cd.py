"""Tokenwise controlled decoding with a CD-Q value head (Mudgal et al., ICML 2024, arXiv 2310.17022).

The KL-regularised optimal next-token policy is π*(z | x, yᵗ) ∝ p(z | x, yᵗ)·exp(λ·V(x, yᵗ, z)).

Two ways to run it:

In the engine (the default, when the engine is a `TiltingEngine` that loaded the head and the
request names no `top_k`): ONE engine request per answer, streamed token by token like plain
sampling and aborted on cancellation. The engine's CD-Q logits processor (heads/processor.py,
runtime/cdq_plugin.py) adds λ·Q(x, yᵗ, ·) over the whole vocabulary to every step's logits, with
the head's own KV cache per request, so the engine samples from p_T(z)·exp(λ·Q)/Z (p_T: the
policy after temperature, the distribution the head's targets assume; with penalties or
truncation set, after those too, and zero outside p's truncated support). The processor reports,
per step, KL(πₜ ‖ p_T,ₜ) computed from the very logits it tilted and λ·(max Q − min Q).
`Sample.logprobs` are then log π of the tokens (what was sampled); `scored_candidates` is 0 (the
head runs inside the engine, on the whole vocabulary at every step).

Per token (FakeEngine, engines without the processor or without this head, and requests that
set `top_k`: FUDGE's top-k rescoring is a different policy, which the processor does not
implement): at each step one engine call (max_tokens=1, top-k log-probs) gives the policy's k
most likely next tokens; the Q head gives V(x, yᵗ, z) for all k in one forward pass (`QScorer.q_values`);
the next token is drawn from π̃ ∝ p̃·exp(λ·V) over those k (FUDGE's top-k rescoring, Yang &
Klein 2021, with Q values in place of a classifier's log-probabilities; p̃ = p renormalised on
the top k), seeded by the request seed when given. λ = 0 is top-k sampling from the policy.

Accounting (both modes), against p = the processed policy the engine reports log-probs of:

- `kl_estimate` = Σₜ KL(πₜ ‖ pₜ) along the decoded path. By the chain rule its expectation
  over paths is the answer's KL(π ‖ p) (a Rao-Blackwellised one-path estimate). In the per-token
  mode πₜ = π̃ₜ lives on the top k, so KL(π̃ₜ ‖ pₜ) = KL(π̃ₜ ‖ p̃ₜ) − log mₜ (mₜ: the top k's
  mass under p): the mass outside the top k counts; `kl_outside_top_k` = Σₜ −log mₜ is that
  part. A step where the engine reported no alternatives is the engine's own draw from p (KL 0).
  None when the engine reported no per-step KL (in-engine) — never a silent 0.
- `kl_bound` bounds KL(π ‖ p) itself, for the law sampled, when the head certifies a range
  for its values (`value_range` = (lo, hi): its outputs are clipped to the training targets'
  range, heads/scorer.py). With R = hi − lo every step's tilt has KL ≤ c = min(λR, λ²R²/8)
  (decoding/kl.py: Hoeffding's lemma), whatever the prefix. The answer's length T is a stopping
  time (EOS, stop strings, the budget), and the chain rule gives
  KL(π ‖ p) = E_π[Σ_{t<T} KLₜ] ≤ c·E_π[T] ≤ c·max_tokens. The realised length L of this answer
  would NOT do: c·L bounds only this path's sum of per-step KLs, while E_π[T], which the KL
  needs, may exceed L (a short answer does not make the policy's other answers short). Per
  token, each step adds at most log(V/k) for the mass outside the top k (the k largest of V
  probabilities hold at least k/V of the mass; V = the head's vocabulary, the policy's):
  kl_bound = max_tokens·(c + log(V/k)). Without a certified range (or V): None.
- `kl_path_bound` = Σₜ [λ·(max Q − min Q over the tokens allowed) − log mₜ] along this path:
  it bounds this path's terms of `kl_estimate` (log π/p = λQ − log E_p e^{λQ} ≤ λ·spread), not
  KL(π‖p); it is what `kl_bound` reported before a certified bound existed.
- In the engine, p is the processed policy p_proc (after the request's penalties,
  temperature, min_p, top_k and top_p): the processor applies those to p before the tilt and
  vLLM's own copies are off (runtime/engine.py, heads/processor.py), so the law sampled is
  p_proc·exp(λ·Q) on p_proc's support and the KL is that of the row sampled.

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
from .context import DecodeContext
from .kl import tilt_step_kl_bound, within
from .protocols import QScorer, TiltingEngine
from .request import DecodeRequest, DecodeResult, StrategyOptions, Timer
from .strategies import Traits, register, resuming
from .types import Tilt

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
    traits = Traits(
        needs_objective=False,  # guided by the Q head; the reward is reported when one is named
        streams="text",  # each drawn token is final: `emit` streams it
        needs_sampling=True,  # it draws from softmax(log p + λ·Q): greedy (T = 0) is refused
        value_protocol=QScorer,  # needs V(x, yᵗ, z) for every candidate z at once
        value_required=True,
        refuses={**resuming("it draws every token in its own engine call"),
                 "ignore_eos": "it ends the answer on EOS itself",
                 "stop_token_ids": "it draws tokens itself from the top-k"})

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        q = req.value
        if not isinstance(q, QScorer):  # the server checks this at the edge (a 400)
            raise ValueError("tokenwise_cd needs a CD-Q value head (a QScorer)")
        opts = self.Options.of(req)
        top_k, lam = opts.top_k, opts.lambda_
        if top_k is None and q.name in getattr(ctx.engine, "tilt_heads", ()):
            result = await self._in_engine(req, ctx, q, lam)
        else:
            result = await self._per_token(req, ctx, q, int(top_k or DEFAULT_TOP_K), lam)
        if req.objective is not None:
            (final,) = await ctx.score_samples(req.objective, req, [result.sample], result.timer)
            result.reward, result.cost = final.reward, final.cost
        return result

    async def _in_engine(self, req: DecodeRequest, ctx: DecodeContext, q: QScorer, lam: float
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
                                                         Tilt(q.name, lam))) as deltas:
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
        bound = certified_kl_bound(q, lam, req.sampling.max_tokens)
        estimate = path = None
        warnings = []
        if step_kl is None or step_bound is None or min(len(step_kl), len(step_bound)) < steps:
            warnings.append(f"tokenwise_cd: the engine reported the KL of "
                            f"{len(step_kl or ())} of {steps} tilted steps, so kl_estimate is "
                            "null")
        else:
            path = math.fsum(step_bound[:steps])
            estimate = within(math.fsum(step_kl[:steps]), path if bound is None else bound)
        trace = ({"token_kl": list(step_kl[:steps])}
                 if req.return_candidates and step_kl is not None else {})
        return DecodeResult(
            strategy=self.name, n=1, sample=answer.sample(), kl_bound=bound,
            kl_estimate=estimate, generated_tokens=steps, scored_candidates=0, timer=timer,
            extra={"steps": steps, "top_k": None, "lambda": lam, "value": q.name,
                   "kl_path_bound": path, "kl_outside_top_k": 0.0, "in_engine": True,
                   **trace},
            warnings=warnings,
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
        kl_estimate = path = outside = 0.0
        token_kl: list[float] = []  # the trace (return_candidates): KL of every step
        pushes: list[dict] = []  # and the tilt's strongest pushes at the first steps
        while not answer.done:
            (s,) = await ctx.generate(req.prompt_ids + answer.ids, 1, step_sampling, timer)
            steps += 1
            top = s.top_logprobs[0] if s.top_logprobs else {}
            if not top:  # no alternatives reported: the engine's own draw from p (KL 0)
                if not s.logprobs:
                    raise RuntimeError("the engine reported neither the top-k log-probs nor "
                                       "the sampled token's: tokenwise_cd cannot tilt")
                answer.append(s.token_ids[:1], s.logprobs[:1], None)
                continue
            tokens = sorted(top, key=top.__getitem__, reverse=True)
            logps = [top[t] for t in tokens]
            values = await ctx.q_values(q, req, answer.ids, tokens, timer)
            scored += len(tokens)
            probs, kl = tilt(logps, values, lam)
            # KL against p, not the renormalised top k: −log(top-k mass) per step
            out = -math.log(min(1.0, math.fsum(math.exp(lp) for lp in logps)))
            kl_estimate += kl + out
            outside += out
            if req.return_candidates:
                token_kl.append(kl + out)
                if len(pushes) < TRACE_STEPS:
                    pushes.append(_pushes(steps - 1, tokens, logps, probs, values, lam))
            path += lam * (max(values) - min(values)) + out
            z = rng.choices(range(len(tokens)), weights=probs)[0]
            # the policy's (processed) log-prob of z, not the renormalised one: same meaning
            # as every other Sample.logprobs
            answer.append([tokens[z]], [logps[z]], None)

        vocab = getattr(q, "vocab_size", None)
        bound = certified_kl_bound(q, lam, req.sampling.max_tokens,
                                   max(0.0, math.log(vocab / k)) if vocab else None)
        return DecodeResult(
            strategy=self.name, n=1, sample=answer.sample(), kl_bound=bound,
            kl_estimate=within(kl_estimate, path if bound is None else bound),
            generated_tokens=steps, scored_candidates=scored, timer=timer,
            extra={"steps": steps, "top_k": k, "lambda": lam, "value": q.name,
                   "kl_path_bound": path, "kl_outside_top_k": outside, "in_engine": False,
                   **({"token_kl": token_kl, "pushes": pushes} if req.return_candidates
                      else {})},
        )


TRACE_STEPS = 16  # steps whose strongest pushes the trace shows (the answer's first ones)


def _pushes(step: int, tokens: list[int], logps: list[float], probs: list[float],
            values: list[float], lam: float, top: int = 3) -> dict:
    """One step of the trace: the `top` tokens the tilt favours most (by λ·Q), each with its
    probability under p and under the tilted policy it was drawn from."""
    order = sorted(range(len(tokens)), key=lambda i: -lam * values[i])[:top]
    return {"step": step, "tokens": [{"token_id": tokens[i], "p": math.exp(logps[i]),
                                       "tilted": probs[i], "push": lam * values[i]}
                                      for i in order]}


def certified_kl_bound(q: QScorer, lam: float, max_tokens: int, per_step_extra: float | None = 0.0
                       ) -> float | None:
    """max_tokens·(min(λR, λ²R²/8) + extra), R the width of the range the head certifies for
    its values (`value_range`, optional on a QScorer); None without one (module docstring)."""
    span = getattr(q, "value_range", None)
    if span is None or per_step_extra is None:
        return None
    lo, hi = span
    return max_tokens * (tilt_step_kl_bound(lam, max(0.0, hi - lo)) + per_step_extra)
