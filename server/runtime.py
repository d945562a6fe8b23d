"""Builds the process's `Runtime`: resolves the model, starts the vLLM engine, loads scorers."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from decoding.protocols import DecodeContext

from .model_prep import EMBEDDED_MODEL_NAME, prepare_embedded_model
from .scorers import ScorerRegistry, default_factories, engine_heads, load_value_heads
from .serving import Runtime
from .settings import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)


def resolve_model(settings: Settings) -> tuple[str, str]:
    """(path or HF id for the engine, name served on /v1/models)."""
    if settings.model == DEFAULT_MODEL:
        path = prepare_embedded_model(settings.home)
        return str(path), settings.served_model_name or EMBEDDED_MODEL_NAME
    local = Path(settings.model).expanduser()
    name = settings.served_model_name or (local.name if local.exists() else settings.model)
    return (str(local) if local.exists() else settings.model), name


def build_runtime(settings: Settings) -> Runtime:
    from .engine import VllmEngine  # the only vllm import, kept out of unit-test paths

    model, name = resolve_model(settings)
    # Value heads first: a bad checkpoint path fails in seconds, not after the engine start-up.
    value_heads = load_value_heads(settings.value_head_paths())
    # CD-Q heads also tilt inside the engine (tokenwise_cd); every head must share the
    # policy's tokenizer, since heads read the policy's token ids (refused here, in one line).
    tilt_heads = engine_heads(value_heads, model)
    log.info("starting engine for %s (%s)", name, model)
    engine = VllmEngine(
        model, dtype=settings.dtype, max_model_len=settings.max_model_len,
        kv_cache_gib=settings.kv_cache_gib, gpu_memory_utilization=settings.gpu_memory_utilization,
        seed=settings.engine_seed, served_model_name=name, enable_lora=settings.enable_lora,
        max_lora_rank=settings.max_lora_rank, max_loras=settings.max_loras,
        tilt_heads=tilt_heads,
    )
    executor = ThreadPoolExecutor(settings.scorer_threads, thread_name_prefix="scorer")
    scorers = ScorerRegistry(default_factories(settings.length_target), executor)
    for head in value_heads:  # separate models: they outlive policy hot-swaps
        scorers.register(head)
    # Load the default reward and cost now, so the first request does not pay for it.
    for warm in (settings.default_reward, "profanity"):
        scorers.load_now(warm)
    return Runtime(engine=engine, scorers=scorers, ctx=DecodeContext(engine, executor),
                   model_name=name)
