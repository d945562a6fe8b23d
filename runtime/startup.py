"""Start-up and teardown of a `Runtime`: resolves the model, starts the vLLM engine, loads the
scorers. The server (`alignserve serve`) and every offline tool (rollouts, eval, benchmarks)
start the engine this one way, so their numbers are comparable."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from decoding.context import DecodeContext
from decoding.protocols import Engine, Scorer

from . import engine as vllm_engine  # vllm itself is imported inside its functions
from .batching import BatchingContext, ScoreBatcher
from .engine_args import engine_kwargs
from .model_prep import EMBEDDED_MODEL_NAME, prepare_embedded_model
from .protocols import Runtime
from .remote_scorer import connect_remote_scorers
from .scorers import ScorerRegistry, default_factories, engine_heads, load_value_heads
from .settings import DEFAULT_MODEL, ConfigError, EngineSettings

log = logging.getLogger(__name__)


def resolve_model(model: str, home: Path | None = None) -> str:
    """What the engine (or `from_pretrained`) loads for a `model` setting: 'embedded' → the
    prepared SmolLM2 folder under `home` (default: EngineSettings' home, i.e. ALIGNSERVE_HOME);
    an existing folder → its absolute path; anything else a Hugging Face id. A path-like name
    that does not exist raises ConfigError (it is no hub id either)."""
    if model == DEFAULT_MODEL:
        home = EngineSettings().home if home is None else home
        return str(prepare_embedded_model(Path(home).expanduser()))
    local = Path(model).expanduser()
    if local.exists():
        return str(local.resolve())
    if model.startswith(("/", ".", "~")):
        raise ConfigError("model", f"no such folder: {local}")
    return model


def model_and_name(settings: EngineSettings) -> tuple[str, str]:
    """(path or HF id for the engine, name served on /v1/models)."""
    path = resolve_model(settings.model, settings.home)
    if settings.served_model_name:
        return path, settings.served_model_name
    if settings.model == DEFAULT_MODEL:
        return path, EMBEDDED_MODEL_NAME
    return path, Path(path).name if Path(settings.model).expanduser().exists() else settings.model


def build_runtime(settings: EngineSettings) -> Runtime:
    """The engine, the scorers and the strategies' context of `settings`. Must run inside the
    event loop (AsyncLLM binds to the running loop); the caller closes it (`open_runtime`)."""
    model, name = model_and_name(settings)
    try:
        extra = engine_kwargs(settings, vllm_engine.engine_arg_names())
    except ValueError as exc:
        raise ConfigError("engine_args", str(exc)) from None
    # Value heads first: a bad checkpoint path fails in seconds, not after the engine start-up.
    try:
        value_heads = load_value_heads(settings.value_head_paths())
    except ValueError as exc:
        raise ConfigError("value_heads", str(exc)) from None
    try:  # and the remote reward model servers answer, before the engine start-up too
        key = settings.remote_scorer_api_key
        remote = connect_remote_scorers(settings.remote_scorer_urls(),
                                        settings.remote_scorer_timeout_s,
                                        settings.remote_scorer_retries,
                                        key.get_secret_value() if key else None,
                                        breaker=settings.remote_scorer_breaker())
    except ValueError as exc:
        raise ConfigError("remote_scorers", str(exc)) from None
    # CD-Q heads also tilt inside the engine (tokenwise_cd); every head must share the
    # policy's tokenizer, since heads read the policy's token ids (refused here, in one line).
    try:
        tilt_heads = engine_heads(value_heads, model)
    except ValueError as exc:
        raise ConfigError("value_heads", str(exc)) from None
    log.info("starting engine for %s (%s)", name, model)
    engine = vllm_engine.VllmEngine(
        model, dtype=settings.dtype, max_model_len=settings.max_model_len,
        kv_cache_gib=settings.kv_cache_gib, gpu_memory_utilization=settings.gpu_memory_utilization,
        seed=settings.engine_seed, served_model_name=name, enable_lora=settings.enable_lora,
        max_lora_rank=settings.max_lora_rank, max_loras=settings.max_loras,
        block_size=settings.block_size, engine_args=extra,
        tilt_heads=tilt_heads,
    )
    executor = ThreadPoolExecutor(settings.scorer_threads, thread_name_prefix="scorer")
    scorers = ScorerRegistry(default_factories(settings.length_target), executor)
    separate: list[Scorer] = [*value_heads, *remote]  # separate models: outlive policy swaps
    for head in separate:
        scorers.register(head)
    rt = Runtime(engine=engine, scorers=scorers, ctx=decode_context(engine, executor, settings),
                 model_name=name)
    try:  # the default reward and cost now, so the first request does not pay for them
        for warm in (settings.default_reward, "profanity"):
            scorers.load_now(warm)
    except BaseException:
        rt.close()
        raise
    return rt


def decode_context(engine: Engine, executor: Executor, settings: EngineSettings) -> DecodeContext:
    """The strategies' context: scoring batched across requests unless the window is 0."""
    if settings.scorer_batch_window_ms <= 0:
        return BatchingContext(engine, executor)  # no batching; scores still checked finite
    batcher = ScoreBatcher(executor, settings.scorer_batch_window_ms / 1000,
                           settings.scorer_max_batch)
    return BatchingContext(engine, executor, batcher=batcher)


@contextlib.asynccontextmanager
async def open_runtime(settings: EngineSettings) -> AsyncIterator[Runtime]:
    """`build_runtime` inside the running event loop, closed (engine and scorer threads
    stopped) however the block ends. Whatever creates an engine must sit under an
    `if __name__ == "__main__":` guard: vLLM spawns worker processes."""
    rt = build_runtime(settings)
    try:
        yield rt
    finally:
        rt.close()
