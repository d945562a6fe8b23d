"""Blockwise controlled decoding (Mudgal et al., ICML 2024, arXiv 2310.17022, §blockwise CD).

Repeat until EOS, a stop string or max_tokens: sample K = `n` continuations of M =
`block_tokens` tokens from the accepted prefix (one engine call, n=K, on the exact ids
`prompt_ids + accepted_ids`, so the engine's prefix cache reuses the prefix's KV blocks), score
each partial answer prefix+block with the value function, append the best block.

The value is `DecodeRequest.value` (a value head `value:NAME` — a `TokenScorer` such as a
CD-FUDGE head, which then sees the exact ids — or any scorer applied to the partial text) or,
by default, the request's reward scorer. With a reward scorer this is best-of-K per block on
partial rewards, as in FUDGE's prefix rescoring (Yang & Klein 2021) but a block at a time.

Each accepted block is committed at once (`emit`): the latency to the first streamed chunk is
one block. Accounting: each block is a best-of-K draw from p(·|prefix), so KL(π‖p) ≤
Σ_blocks (log K − (K−1)/K) (Beirami et al. 2024 applied per block); `kl_estimate` sums
Beirami's per-block estimator at the chosen block's probability ε = p(block | prefix).
`generated_tokens` counts all K candidates of every block.
"""

from __future__ import annotations

import time

from .committed import Committed, capped
from .kl import bon_kl_bound, bon_kl_estimate
from .protocols import DecodeContext, DecodeRequest, DecodeResult, Sample, Scorer, Timer
from .strategies import register


def _block_seed(seed: int | None, block: int) -> int | None:
    # A fixed seed would replay the same random stream in every block; derive one per block
    # (deterministic, so a seeded request stays reproducible).
    return None if seed is None else (seed * 1_000_003 + block) % 2**63


@register
class BlockwiseCD:
    name = "blockwise_cd"
    needs_objective = True  # the default value, and the reward/cost of the final answer
    streams_tokens = False
    streams_text = True  # accepted blocks are final: `emit` streams them
    value_protocol = Scorer  # any scorer: a value head (token ids) or a text scorer

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        assert req.objective is not None
        value = req.value or req.objective.reward
        k, block_tokens = req.n, int(req.options.get("block_tokens", 16))
        answer = Committed(req, ctx.engine)
        timer = Timer()
        blocks = generated = 0
        kl_estimate = 0.0
        while not answer.done:
            m = min(block_tokens, answer.budget_left)
            sampling = capped(req.sampling, max_tokens=m, seed=_block_seed(req.sampling.seed, blocks))
            candidates = await ctx.generate(req.prompt_ids + answer.ids, k, sampling, timer)
            generated += sum(len(c.token_ids) for c in candidates)
            values = await self._values(ctx, req, value, answer, candidates, timer)
            best = max(range(k), key=values.__getitem__)  # first of equal values
            chosen = candidates[best]
            kl_estimate += bon_kl_estimate(k, min(0.0, chosen.logprob))
            blocks += 1
            answer.append(chosen.token_ids, chosen.logprobs, chosen.finish_reason)

        result = DecodeResult(
            strategy=self.name, n=k, sample=answer.sample(), kl_bound=blocks * bon_kl_bound(k),
            kl_estimate=kl_estimate, generated_tokens=generated, scored_candidates=k * blocks,
            timer=timer, extra={"blocks": blocks, "block_tokens": block_tokens,
                                "value": value.name},
        )
        (final,) = await ctx.score_samples(req.objective, req, [result.sample], timer)
        result.reward, result.cost = final.reward, final.cost
        return result

    async def _values(self, ctx: DecodeContext, req: DecodeRequest, value: Scorer,
                      answer: Committed, candidates: list[Sample], timer: Timer) -> list[float]:
        """V(x, prefix + block) for each candidate block: the scorer sees the whole partial
        answer (exact ids for a TokenScorer, the decoding of the whole id list otherwise)."""
        partials = [Sample(answer.ids + c.token_ids, answer.preview(c.token_ids), [], None)
                    for c in candidates]
        t0 = time.perf_counter()
        try:
            return await ctx.score(value, req, partials)
        finally:
            timer.score_s += time.perf_counter() - t0
