"""Request fields → `decoding.Sampling`: defaults like vLLM's, and every field honoured or refused.

Three jobs, all at the edge (before any engine work):

1. Refuse what is not honoured, with a 400 naming the field: fields that a strategy cannot
   honour (`UNSUPPORTED`, from each strategy's `Traits.refuses`). Tool calling (no tool
   parser) and fields outside the schema are refused by the schema itself (protocol.py,
   `extra="forbid"`).
2. Resolve defaults the way vLLM does: a field the request omits takes the model's
   generation_config value (`engine.sampling_defaults`), else the neutral value; an omitted
   `max_tokens` is what is left of the context after the longest prompt, capped by a setting.
3. Validate token ids (logit_bias, stop_token_ids) against the vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from decoding.strategies import STRATEGIES

from .errors import APIError
from .protocol import CHAT_REFUSED

# vLLM's neutral values (what "off" means for each control).
NEUTRAL: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                           "repetition_penalty": 1.0, "presence_penalty": 0.0,
                           "frequency_penalty": 0.0}

# field -> {strategy: why it cannot honour it}, gathered from the strategies' own
# `Traits.refuses` (decoding/strategies.py says why the resuming strategies refuse theirs).
UNSUPPORTED: dict[str, dict[str, str]] = {}
for _name, _strategy in STRATEGIES.items():
    for _field, _why in _strategy.traits.refuses.items():
        UNSUPPORTED.setdefault(_field, {})[_name] = _why


def _given(req, name: str) -> bool:
    """Whether a field is set to something other than its neutral value."""
    value = getattr(req, name, None)
    if name == "response_format":
        return value is not None and value.type != "text"
    if name == "min_tokens":
        return bool(value)
    if name == "ignore_eos":
        return bool(value)
    if name == "top_logprobs":
        return bool(top_logprobs(req))
    if name == "stop_token_ids":
        return bool(value)
    if name == "tools":
        return bool(value) and getattr(req, "tool_choice", None) != "none"
    return value not in (None, NEUTRAL.get(name))


def check_fields(req, strategy: str) -> None:
    """400 for anything the server would otherwise ignore (see the module docstring)."""
    for name, why in CHAT_REFUSED.items():
        if getattr(req, name, None) is not None:
            raise APIError(400, f"{name}: {why}", param=name, code="unsupported_field")
    so = req.stream_options
    if so is not None and so.continuous_usage_stats and not so.include_usage:
        raise APIError(400, "stream_options.continuous_usage_stats needs include_usage: true",
                       param="stream_options.continuous_usage_stats", code="invalid_value")
    for name, refused in UNSUPPORTED.items():
        if strategy in refused and _given(req, name):
            raise APIError(400, f"{name} is not supported with alignment strategy "
                           f"{strategy!r}: {refused[strategy]}", param=name,
                           code="unsupported_for_strategy")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != req.n:
        raise APIError(400, "best_of is not supported (vLLM removed it too); use "
                       "alignment: {strategy: best_of_n, n: ...}", param="best_of",
                       code="unsupported_field")
    if getattr(req, "suffix", None):
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_field")
    rf = req.response_format
    if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
        raise APIError(400, "response_format json_schema needs a json_schema object",
                       param="response_format", code="invalid_value")
    if getattr(req, "top_logprobs", None) and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs",
                       code="invalid_value")


def top_logprobs(req) -> int:
    """k alternatives per position the answer must report (chat: top_logprobs; completions:
    logprobs is k)."""
    if isinstance(req.logprobs, bool):  # chat
        return (req.top_logprobs or 0) if req.logprobs else 0
    return req.logprobs or 0


def wants_logprobs(req) -> bool:
    return req.logprobs is True or (not isinstance(req.logprobs, bool)
                                    and req.logprobs is not None)


def sampling_fields(req, model_defaults: Mapping[str, Any], vocab: int) -> dict[str, Any]:
    """The `Sampling` keyword arguments of a request, omitted controls resolved against the
    model's generation_config defaults, then vLLM's neutral values."""
    out = resolve_defaults(req, model_defaults)
    bias = []
    for key, value in (req.logit_bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            tok = -1
        if not 0 <= tok < vocab:
            raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab})",
                           param="logit_bias", code="invalid_value")
        if not -100.0 <= value <= 100.0:
            raise APIError(400, "logit_bias values lie in [-100, 100]", param="logit_bias",
                           code="invalid_value")
        bias.append((tok, float(value)))
    stop_ids = tuple(req.stop_token_ids or ())
    if any(not 0 <= t < vocab for t in stop_ids):
        raise APIError(400, f"stop_token_ids must lie in [0, {vocab})", param="stop_token_ids",
                       code="invalid_value")
    out.update(logit_bias=tuple(bias), stop_token_ids=stop_ids, min_tokens=req.min_tokens,
               ignore_eos=req.ignore_eos, structured=structured(req),
               top_logprobs=top_logprobs(req))
    return out


def resolve_defaults(req, model_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """request value → generation_config value → neutral value, for every control in NEUTRAL."""
    out = {}
    for name, neutral in NEUTRAL.items():
        value = getattr(req, name, None)
        if value is None:
            value = model_defaults.get(name, neutral)
        out[name] = type(neutral)(value)
    out["top_k"] = max(out["top_k"], 0)  # vLLM reads -1 and 0 alike: no cut
    return out


def structured(req) -> tuple[str, str] | None:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return ("json_object", "")
    return ("json_schema", json.dumps(rf.json_schema.schema_))


def default_max_tokens(longest_prompt: int, max_model_len: int, cap: int,
                       model_default: int | None = None, budget: int | None = None) -> int:
    """max_tokens for a request that omits it, as vLLM chooses it: what the context leaves
    after the longest prompt; here also capped by the server's setting, the generation_config's
    max_new_tokens and what the per-request token budget leaves per answer (`budget`: tokens
    per answer-token, i.e. max_request_tokens // (prompts × n × alignment.n)). At least 1:
    a prompt that fills the context is refused by the length check, not here."""
    left = max_model_len - longest_prompt
    caps = [left, cap] + [c for c in (model_default, budget) if c is not None]
    return max(1, min(caps))
