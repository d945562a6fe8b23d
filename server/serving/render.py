"""Rendering: OpenAI response bodies, SSE chunks, usage, logprobs and `alignment` accounting.

Pure functions of a `ResolvedRequest` and its `Answer`s (no engine, no metrics, no I/O), so
the non-streaming and the streaming paths report the same numbers the same way.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from decoding.request import DecodeResult
from decoding.types import Sample

from ..errors import APIError, error_json
from ..logprobs import TokenText, chat_logprobs, completion_logprobs
from ..protocol import (
    AlignmentInfo,
    Candidate,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Latency,
    Usage,
)
from .data import Answer, ResolvedRequest

KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see traffic
DONE = "data: [DONE]\n\n"


# ---------------------------------------------------------------- pieces of every answer


def echoed(rr: ResolvedRequest, a: Answer) -> str:
    """completions `echo`: the prompt's text before the answer."""
    return a.prompt.echo if rr.echo else ""


def logprobs(rr: ResolvedRequest, text: TokenText, sample: Sample, offset: int = 0,
             start: int = 0) -> ChatLogprobs | CompletionLogprobs | None:
    """OpenAI `logprobs` of `sample`'s tokens from `start` on (None unless requested);
    `offset`: completions' text offset of the first of them."""
    if not rr.logprobs:
        return None
    k, ids = rr.sampling.top_logprobs, sample.token_ids[start:]
    top = sample.top_logprobs[start:] if sample.top_logprobs else None
    lps = sample.logprobs[start:]
    if rr.kind == "chat":
        return chat_logprobs(text, ids, lps, top, k)
    return completion_logprobs(text, ids, lps, top, k, offset)


def answer_message(rr: ResolvedRequest, a: Answer) -> tuple[str | None, list[dict], str]:
    """(content, tool_calls, finish_reason) of a chat answer: with tools, the chosen text
    parsed into tool calls (server/tools.py)."""
    if rr.tools is None:
        return a.result.sample.text, [], a.finish_reason
    return rr.tools.message(a.result.sample.text, a.finish_reason)


def whole_delta(rr: ResolvedRequest, a: Answer) -> dict:
    """A stream's delta carrying a whole chosen answer: its text, or its tool calls (each with
    its index, as OpenAI's streamed tool-call deltas)."""
    content, calls, _ = answer_message(rr, a) if rr.kind == "chat" else (
        a.result.sample.text, [], "")
    if not calls:
        return {"content": content}
    return {"content": content, "tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}


def usage(rr: ResolvedRequest, answers: list[Answer]) -> Usage:
    prompt = sum(len(p.ids) for p in rr.prompts)
    completion = sum(len(a.result.sample.token_ids) for a in answers)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def alignment_info(rr: ResolvedRequest, r: DecodeResult, total_s: float) -> AlignmentInfo | None:
    """One answer's `alignment` accounting (None for a request without `alignment`)."""
    if rr.alignment is None:
        return None
    candidates = None
    if r.candidates is not None:
        trace = _trace(rr, r)
        full = bool(rr.alignment and rr.alignment.return_candidates)  # else: `trace` alone
        candidates = [Candidate(**trace[i], text=c.sample.text, reward=c.reward, cost=c.cost,
                                tokens=len(c.sample.token_ids), logprob=c.sample.logprob,
                                finish_reason=c.sample.finish_reason,
                                token_ids=c.sample.token_ids if full else None,
                                logprobs=c.sample.logprobs if rr.logprobs and full else None,
                                tool_calls=(rr.tools.message(c.sample.text, "")[1]
                                            if rr.tools else None))
                      for i, c in enumerate(r.candidates)]
    return AlignmentInfo(
        strategy=r.strategy, n=r.n, reward=r.reward, cost=r.cost, kl_bound=r.kl_bound,
        kl_estimate=r.kl_estimate, win_rate_bound=r.win_rate_bound,
        generated_tokens=r.generated_tokens, scored_candidates=r.scored_candidates,
        latency=Latency(generate_s=r.timer.generate_s, score_s=r.timer.score_s,
                        total_s=total_s),
        cost_weight=rr.objective.cost_weight if rr.objective and rr.objective.cost else None,
        candidates=candidates, warnings=[*rr.warnings, *r.warnings] or None,
        constraint=rr.constraint,
        **{k: v for k, v in r.extra.items() if k not in _PER_CANDIDATE})


# strategy extras reported per candidate (`_trace`), not as fields of the alignment block
_PER_CANDIDATE = {"selection_probabilities"}


def _trace(rr: ResolvedRequest, r: DecodeResult) -> list[dict]:
    """Per candidate: its objective (reward − cost_weight·cost), rank by it (1: best; ties share
    the better rank) and whether it is the answer (the strategy's `chosen_index`, else the
    candidate whose sample the answer is)."""
    weight = rr.objective.cost_weight if rr.objective is not None else 0.0
    objectives = [None if c.reward is None else
                  c.reward - (weight * c.cost if c.cost is not None else 0.0)
                  for c in r.candidates or ()]
    chosen = r.extra.get("chosen_index")
    probabilities = r.extra.get("selection_probabilities") or [None] * len(objectives)
    out = []
    for i, (c, o) in enumerate(zip(r.candidates or (), objectives)):
        rank = None if o is None else 1 + sum(x is not None and x > o for x in objectives)
        is_chosen = i == chosen if chosen is not None else c.sample is r.sample
        out.append({"objective": o, "rank": rank, "chosen": is_chosen,
                    "selection_probability": probabilities[i]})
    return out


def aggregate(infos: list[AlignmentInfo | None]) -> AlignmentInfo | None:
    """Top-level `alignment`: the answer's own for one choice; with several, choice 0's fields
    with generated_tokens, scored_candidates and latency totalled over all choices."""
    if not infos or infos[0] is None:
        return None
    if len(infos) == 1:
        return infos[0]
    top = infos[0].model_copy(deep=True)
    top.generated_tokens = sum(i.generated_tokens for i in infos if i)
    top.scored_candidates = sum(i.scored_candidates for i in infos if i)
    top.latency.generate_s = sum(i.latency.generate_s for i in infos if i)
    top.latency.score_s = sum(i.latency.score_s for i in infos if i)
    top.candidates = None
    return top


# ---------------------------------------------------------------- non-streaming bodies


def chat_response(rr: ResolvedRequest, answers: list[Answer], total_s: float, model: str,
                  text: TokenText) -> ChatCompletionResponse:
    infos = [alignment_info(rr, a.result, total_s) for a in answers]
    choices = []
    for a, info in zip(answers, infos):
        content, calls, finish = answer_message(rr, a)
        choices.append(ChatChoice(index=a.index, message=ChatMessageOut(content=content,
                                                                        tool_calls=calls),
                                  logprobs=logprobs(rr, text, a.result.sample),
                                  finish_reason=finish, alignment=info))
    return ChatCompletionResponse(id=f"chatcmpl-{rr.request_id}", model=model, choices=choices,
                                  usage=usage(rr, answers), alignment=aggregate(infos))


def completion_response(rr: ResolvedRequest, answers: list[Answer], total_s: float, model: str,
                        text: TokenText) -> CompletionResponse:
    infos = [alignment_info(rr, a.result, total_s) for a in answers]
    choices = [CompletionChoice(index=a.index, text=echoed(rr, a) + a.result.sample.text,
                                logprobs=logprobs(rr, text, a.result.sample, len(echoed(rr, a))),
                                finish_reason=a.finish_reason, alignment=info)
               for a, info in zip(answers, infos)]
    return CompletionResponse(id=f"cmpl-{rr.request_id}", model=model, choices=choices,
                              usage=usage(rr, answers), alignment=aggregate(infos))


# ---------------------------------------------------------------- SSE chunks


@dataclass(frozen=True)
class ChunkHead:
    """What every chunk of one stream repeats."""

    id: str
    object: str
    model: str
    chat: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    continuous_usage: bool = False  # usage so far in every chunk (vLLM's continuous_usage_stats)
    prompt_tokens: int = 0

    @classmethod
    def of(cls, rr: ResolvedRequest, model: str) -> ChunkHead:
        chat = rr.kind == "chat"
        return cls(id=f"{'chatcmpl' if chat else 'cmpl'}-{rr.request_id}",
                   object="chat.completion.chunk" if chat else "text_completion",
                   model=model, chat=chat, include_usage=rr.include_usage,
                   continuous_usage=rr.continuous_usage,
                   prompt_tokens=sum(len(p.ids) for p in rr.prompts))


def _envelope(head: ChunkHead, choices: list[dict]) -> dict:
    env: dict[str, Any] = {"id": head.id, "object": head.object, "created": head.created,
                           "model": head.model, "choices": choices}
    if head.include_usage:
        env["usage"] = None
    return env


def chunk(head: ChunkHead, index: int, delta: dict, finish_reason: str | None = None,
          alignment: AlignmentInfo | None = None, lps: BaseModel | None = None,
          completion_tokens: int = 0) -> str:
    """One choice's SSE event: chat's `delta`, or completions' `text`; with continuous usage,
    the usage so far (`completion_tokens`: the stream's tokens sent up to this chunk)."""
    dumped = lps.model_dump() if lps is not None else None
    if head.chat:
        choice: dict = {"index": index, "delta": delta, "logprobs": dumped,
                        "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": delta.get("content", ""), "logprobs": dumped,
                  "finish_reason": finish_reason}
    env = _envelope(head, [choice])
    if head.continuous_usage:
        env["usage"] = {"prompt_tokens": head.prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": head.prompt_tokens + completion_tokens}
    if alignment is not None:
        choice["alignment"] = alignment.model_dump()
        env["alignment"] = choice["alignment"]
    return _event(env)


def opening_deltas(rr: ResolvedRequest) -> list[tuple[int, dict]]:
    """(choice index, delta) sent at once, before any engine work: chat's role, completions'
    echoed prompt."""
    if rr.kind == "chat":
        return [(i, {"role": "assistant", "content": ""}) for i in range(rr.answers)]
    if rr.echo:
        return [(i, {"content": rr.prompts[i // rr.choices].echo}) for i in range(rr.answers)]
    return []


def usage_chunk(head: ChunkHead, u: Usage) -> str:
    env = _envelope(head, [])
    env["usage"] = u.model_dump()
    return _event(env)


def error_event(err: APIError) -> str:
    """An error after the headers went out, as an SSE event."""
    return _event(error_json(err))


def _event(obj: Any) -> str:
    return f"data: {strict_dumps(obj)}\n\n"


# ---------------------------------------------------------------- strict JSON out


def finite(obj: Any) -> Any:
    """`obj` (JSON-able: dicts, lists, scalars) with every NaN and ±inf replaced by None.
    JSON has no such numbers: Python's json writes the non-JSON literals `NaN`/`Infinity`
    that strict parsers refuse, and with allow_nan=False it raises after all the compute.
    null is what pydantic's own JSON mode writes for them (`ser_json_inf_nan='null'`)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def strict_dumps(obj: Any) -> str:
    """Compact, strict JSON (RFC 8259): non-finite floats become null, never `NaN`."""
    return json.dumps(finite(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class StrictJSONResponse(JSONResponse):
    """The app's default response class (server/app.py): bodies as `strict_dumps` writes
    them, so a non-finite number (a -inf log-prob, a score) is null, not a 500."""

    def render(self, content: Any) -> bytes:
        return strict_dumps(content).encode("utf-8")
