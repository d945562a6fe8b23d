"""Aligner: draft with the policy, then rewrite the draft with a small corrector.

Ji et al., "Aligner: Efficient Alignment by Learning to Correct", arXiv 2402.02416 (NeurIPS
2024). A corrector μ_φ(y_c | x, y_o) is a conditional seq2seq model trained on (question x,
original answer y_o, corrected answer y_c) triples; at inference it is stacked after any
upstream model: y_o ~ policy(· | x), then y_c ~ μ_φ(· | x, y_o). The upstream model is never
touched, so one corrector serves every policy (the paper's "model-agnostic, plug-and-play").

Here the corrector is a LoRA adapter of the served model (registered through /admin/policies),
so both stages run on the same engine: the draft with the request's own policy (or the adapter
named by `model`), the correction with `Sampling.adapter = corrector`.

Prompt format. The corrector sees the reference Aligner template, read from public code that
drives the released PKU-Alignment Aligner checkpoints (several independent users quote the same
string; the PKU-Alignment/aligner training code itself was not in the searchable index):

    BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more
    helpful and harmless: {question} | {answer} ASSISTANT:

(one line), followed by the correction. `finetune/aligner.py` trains with the same template,
so a corrector trained there and served here see identical prompts. `question` is what the
scorers see as the prompt (the last user message, or the raw completion prompt).

Accounting (honest, see docs/aligner.md):
- `kl_bound` and `kl_estimate` are null, with a warning. The answer is not a reweighting of the
  policy's draws: the corrector writes new text, whose probability under the policy can be
  anything (zero included), so neither best-of-n's log n bound nor any other bound on
  KL(π_aligner ‖ p) holds in general. We do not claim one.
- `generated_tokens` counts both stages (draft + correction); `extra` splits them and the
  wall time of each stage (`draft_generate_s`, `correct_generate_s`: the latency the
  correction adds).
- With a reward named (`alignment.reward`), the draft and the correction are scored in one
  call: `reward`/`cost` are the correction's, `draft_reward`/`draft_cost` the draft's.
- `return_candidates`: [draft, correction], in that order.
- The answer's token log-probabilities (OpenAI `logprobs`) are the corrector's.

Streaming (`streams_text`): the draft is not shown; the correction streams as the engine
produces it (its leading whitespace, which follows "ASSISTANT:", is dropped).

Drafts come from plain sampling (one policy sample). Composing with a selection strategy for
the draft (best-of-n, then correct) is not offered: it would need the draft strategy's
objective, budget and greedy checks at the edge; see docs/aligner.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from typing import Protocol

from pydantic import Field

from .context import DecodeContext
from .errors import EngineRejected
from .request import DecodeRequest, DecodeResult, Scored, StrategyOptions, Timer
from .strategies import Traits, register
from .types import Sample, Sampling

TEMPLATE = ("BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make "
            "it more helpful and harmless: {question} | {answer} ASSISTANT:")

NO_KL_WARNING = ("aligner: kl_bound and kl_estimate are null: the corrector rewrites the draft, "
                 "so the answer is not a selection among policy samples and no bound on its "
                 "KL to the policy holds in general")


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def corrector_prompt(question: str, answer: str) -> str:
    """The Aligner template filled in (the text the corrector continues)."""
    return TEMPLATE.format(question=question.strip(), answer=answer.strip())


def encode_prompt(tokenizer: _Tokenizer, question: str, answer: str) -> list[int]:
    """Token ids of the corrector prompt, exactly as `finetune/aligner.py` builds them."""
    return list(tokenizer.encode(corrector_prompt(question, answer), add_special_tokens=True))


@register
class Aligner:
    """Draft (plain policy sample), then one corrector generation conditioned on it."""

    class Options(StrategyOptions):
        corrector: str | None = Field(
            None, min_length=1, max_length=256,
            description="aligner: the registered LoRA adapter that rewrites the policy's draft "
            "(required; an unknown name is a 400 on alignment.corrector).")

    name = "aligner"
    traits = Traits(
        needs_objective=False,  # a reward is optional: when named, draft and correction are scored
        streams="text",
        needs_sampling=False,  # the draft is one policy sample: greedy is allowed
        adapter_option="corrector",  # the option naming a registered LoRA adapter
        generations_per_answer=2,  # draft + correction, each up to max_tokens (the token budget)
        refuses={"tools": "its corrector rewrites the draft as free text"})

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        """Needs an engine that also has `tokenizer.encode` (the vLLM engine and the unit
        tests' FakeEngine do): the corrector prompt is built from the draft's text."""
        corrector = self.Options.of(req).corrector
        if not corrector:
            raise EngineRejected("aligner needs alignment.corrector (a LoRA adapter name)",
                                 param="alignment.corrector")
        timer = Timer()
        (draft,) = await ctx.generate(req.prompt_ids, 1, req.sampling, timer)
        draft_s = timer.generate_s
        tokenizer: _Tokenizer | None = getattr(ctx.engine, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("the aligner strategy needs an engine with a tokenizer")
        ids = encode_prompt(tokenizer, req.prompt_text, draft.text)
        sampling = _corrector_sampling(req.sampling, corrector, len(ids),
                                       getattr(ctx.engine, "max_model_len", None))
        t0 = time.perf_counter()
        try:
            corrected = await _stream_correction(ctx, ids, sampling, req.emit)
        finally:
            timer.generate_s += time.perf_counter() - t0
        result = DecodeResult(
            strategy=self.name, n=1, sample=corrected, kl_bound=None, kl_estimate=None,
            win_rate_bound=None, timer=timer, warnings=[NO_KL_WARNING],
            generated_tokens=len(draft.token_ids) + len(corrected.token_ids),
            extra={"corrector": corrector, "draft_tokens": len(draft.token_ids),
                   "correction_tokens": len(corrected.token_ids),
                   "draft_generate_s": draft_s, "correct_generate_s": timer.generate_s - draft_s})
        pool = [Scored(draft, None, None, 0.0), Scored(corrected, None, None, 0.0)]
        if req.objective is not None:
            pool = await ctx.score_samples(req.objective, req, [draft, corrected], timer)
            result.reward, result.cost = pool[1].reward, pool[1].cost
            result.scored_candidates = 2
            result.extra.update(draft_reward=pool[0].reward, draft_cost=pool[0].cost)
        if req.return_candidates:  # the trace: the draft and its correction
            result.candidates = pool
            result.extra["draft"] = draft.text
        return result


def _corrector_sampling(sampling: Sampling, corrector: str, prompt_len: int,
                        max_model_len: int | None) -> Sampling:
    """The request's sampling with the corrector's adapter; max_tokens clipped to what the
    context leaves after question + draft (the edge checked the prompt alone)."""
    max_tokens = sampling.max_tokens
    if max_model_len is not None:
        room = max_model_len - prompt_len
        if room < 1:
            raise EngineRejected(f"the corrector prompt (question + draft, {prompt_len} tokens) "
                                 f"fills the model's context length {max_model_len}; lower "
                                 "max_tokens", param="max_tokens")
        max_tokens = min(max_tokens, room)
    return dataclasses.replace(sampling, adapter=corrector, max_tokens=max_tokens,
                               min_tokens=min(sampling.min_tokens, max_tokens))


async def _stream_correction(ctx: DecodeContext, ids: Sequence[int], sampling: Sampling,
                             emit) -> Sample:
    """One corrector sequence, relayed to `emit` piece by piece as it decodes. Leading
    whitespace is held back (the template ends in "ASSISTANT:"), so the streamed pieces and
    the returned text are the same string. Cancelling aborts the engine request (aclosing)."""
    out = Sample([], "", [], None)
    top: list[dict[int, float]] = []
    async with contextlib.aclosing(ctx.engine.stream_sequence(ids, sampling)) as deltas:
        async for d in deltas:
            out.token_ids += d.token_ids
            out.logprobs += d.logprobs
            if d.top_logprobs is not None:
                top += d.top_logprobs
            out.finish_reason = d.finish_reason
            piece = d.text if out.text else d.text.lstrip()
            if piece:
                out.text += piece
                if emit is not None:
                    emit(piece)
    out.top_logprobs = top or None
    return out
