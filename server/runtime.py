"""Builds the process's `Runtime`: resolves the model, starts the vLLM engine, loads scorers."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from decoding.protocols import DecodeContext

from .batching import BatchingContext, ScoreBatcher
from .engine_args import engine_kwargs
from .model_prep import EMBEDDED_MODEL_NAME, prepare_embedded_model
from .remote_scorer import connect_remote_scorers
from .scorers import ScorerRegistry, default_factories, engine_heads, load_value_heads
from .serving import Runtime
from .settings import DEFAULT_MODEL, ConfigError, Settings

log = logging.getLogger(__name__)


def resolve_model(settings: Settings) -> tuple[str, str]:
    """(path or HF id for the engine, name served on /v1/models)."""
    if settings.model == DEFAULT_MODEL:
        path = prepare_embedded_model(settings.home)
        return str(path), settings.served_model_name or EMBEDDED_MODEL_NAME
    local = Path(settings.model).expanduser()
    if not local.exists() and settings.model.startswith(("/", ".", "~")):
        raise ConfigError("model", f"no such folder: {local}")  # not a hub id either
    name = settings.served_model_name or (local.name if local.exists() else settings.model)
    return (str(local) if local.exists() else settings.model), name


def build_runtime(settings: Settings) -> Runtime:
    from .engine import VllmEngine, engine_arg_names  # the only vllm import

    model, name = resolve_model(settings)
    try:
        extra = engine_kwargs(settings, engine_arg_names())
    except ValueError as exc:
        raise ConfigError("engine_args", str(exc)) from None
    # Value heads first: a bad checkpoint path fails in seconds, not after the engine start-up.
    try:
        value_heads = load_value_heads(settings.value_head_paths())
    except ValueError as exc:
        raise ConfigError("value_heads", str(exc)) from None
    try:  # and the remote reward model servers answer, before the engine start-up too
        remote = connect_remote_scorers(settings.remote_scorer_urls(),
                                        settings.remote_scorer_timeout_s,
                                        settings.remote_scorer_retries)
    except ValueError as exc:
        raise ConfigError("remote_scorers", str(exc)) from None
    # CD-Q heads also tilt inside the engine (tokenwise_cd); every head must share the
    # policy's tokenizer, since heads read the policy's token ids (refused here, in one line).
    try:
        tilt_heads = engine_heads(value_heads, model)
    except ValueError as exc:
        raise ConfigError("value_heads", str(exc)) from None
    log.info("starting engine for %s (%s)", name, model)
    engine = VllmEngine(
        model, dtype=settings.dtype, max_model_len=settings.max_model_len,
        kv_cache_gib=settings.kv_cache_gib, gpu_memory_utilization=settings.gpu_memory_utilization,
        seed=settings.engine_seed, served_model_name=name, enable_lora=settings.enable_lora,
        max_lora_rank=settings.max_lora_rank, max_loras=settings.max_loras,
        block_size=settings.block_size, engine_args=extra,
        tilt_heads=tilt_heads,
    )
    executor = ThreadPoolExecutor(settings.scorer_threads, thread_name_prefix="scorer")
    scorers = ScorerRegistry(default_factories(settings.length_target), executor)
    for head in [*value_heads, *remote]:  # separate models: they outlive policy hot-swaps
        scorers.register(head)
    # Load the default reward and cost now, so the first request does not pay for it.
    for warm in (settings.default_reward, "profanity"):
        scorers.load_now(warm)
    return Runtime(engine=engine, scorers=scorers, ctx=decode_context(engine, executor, settings),
                   model_name=name)


def decode_context(engine, executor, settings: Settings) -> DecodeContext:
    """The strategies' context: scoring batched across requests unless the window is 0."""
    if settings.scorer_batch_window_ms <= 0:
        return DecodeContext(engine, executor)
    batcher = ScoreBatcher(executor, settings.scorer_batch_window_ms / 1000,
                           settings.scorer_max_batch)
    return BatchingContext(engine, executor, batcher=batcher)
