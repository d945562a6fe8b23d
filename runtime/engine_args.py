"""vLLM engine arguments from Settings: the typed fields a deployment needs (named as vLLM names
them) plus the `--engine-arg KEY=VALUE` pass-through for everything else.

Pure (no vllm import): `runtime.engine.engine_arg_names()` supplies the set of AsyncEngineArgs
fields the pass-through is validated against, so unit tests can check the rules with any set.
Values of the pass-through are JSON literals when they parse (`true`, `8`, `[1, 2]`,
`{"k": 1}`), strings otherwise (`fp8`, `/path`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

# Settings fields passed to AsyncEngineArgs under the same name (when not None).
TYPED_ENGINE_FIELDS = (
    "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend",
    "quantization", "max_num_seqs", "max_num_batched_tokens", "kv_cache_dtype",
    "enforce_eager", "trust_remote_code",
    "otlp_traces_endpoint",  # vLLM's own tracing, to the collector alignserve's spans go to
)

# AsyncEngineArgs keys alignserve sets itself: the pass-through may not override them. The value
# says which setting to use instead (or why the key is fixed).
MANAGED_KEYS = {
    "model": "--model",
    "served_model_name": "--served-model-name",
    "dtype": "--dtype",
    "max_model_len": "--max-model-len",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "seed": "--engine-seed",
    "enable_lora": "--enable-lora",
    "max_lora_rank": "--max-lora-rank",
    "max_loras": "--max-loras",
    "block_size": "--block-size",
    # KL accounting needs the log-probs of the distribution actually sampled from.
    "logprobs_mode": "nothing: alignserve needs processed_logprobs for its KL accounting",
    **{name: f"--{name.replace('_', '-')}" for name in TYPED_ENGINE_FIELDS},
}

_KEY = re.compile(r"^[a-z_][a-z0-9_]*$")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _split_top_level(spec: str) -> list[str]:
    """Split on commas outside brackets, braces and double quotes (values may be JSON)."""
    items, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(spec):
        if ch == '"' and (i == 0 or spec[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch in "[{":
            depth += 1
        elif not quoted and ch in "]}":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    return [item.strip() for item in items if item.strip()]


def parse_engine_args(spec: str) -> dict[str, Any]:
    """'a=1,b={"x": [1, 2]}' (or a JSON object) → {'a': 1, 'b': {'x': [1, 2]}}. Format errors
    raise ValueError; whether the keys exist is `check_engine_args`' business."""
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            parsed = json.loads(spec)
        except ValueError as exc:
            raise ValueError(f"not a JSON object: {exc}") from None
        items = list(parsed.items())
    else:
        items = []
        for item in _split_top_level(spec):
            key, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r}: expected KEY=VALUE")
            items.append((key.strip().replace("-", "_"), _value(text.strip())))
    args: dict[str, Any] = {}
    for key, value in items:
        if not _KEY.match(key):
            raise ValueError(f"{key!r} is not an engine argument name")
        if key in args:
            raise ValueError(f"{key!r} is given twice")
        args[key] = value
    return args


def check_engine_args(args: dict[str, Any], known: Collection[str]) -> dict[str, Any]:
    """The pass-through, once every key is an AsyncEngineArgs field that alignserve does not
    manage itself; otherwise ValueError naming the key."""
    for key in args:
        if key in MANAGED_KEYS:
            raise ValueError(f"{key!r} is set by alignserve; use {MANAGED_KEYS[key]}")
        if key not in known:
            close = sorted(k for k in known if key in k or k in key)[:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{key!r} is not a vLLM engine argument{hint}")
    return args


def engine_kwargs(settings, known: Collection[str]) -> dict[str, Any]:
    """Extra AsyncEngineArgs keyword arguments of `settings`: the typed fields that are set,
    then the validated pass-through."""
    typed = {name: getattr(settings, name) for name in TYPED_ENGINE_FIELDS
             if getattr(settings, name) is not None}
    extra = check_engine_args(parse_engine_args(settings.engine_args or ""), known)
    return {**typed, **extra}
