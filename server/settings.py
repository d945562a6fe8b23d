"""The HTTP server's typed settings: the engine settings (runtime/settings.py) plus the HTTP ones
(bind address, limits, auth, policies, logging). Env vars (prefix ALIGNSERVE_) and `alignserve
serve` flags derive from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from decoding.dual import load_solution
from runtime.settings import (  # noqa: F401  (re-exported: the server's one settings module)
    DEFAULT_MODEL,
    ConfigError,
    EngineSettings,
    parse_remote_scorers,
    parse_value_heads,
)

from .policy.file import load_policy_file
from .presets import load_presets_file, parse_preset


class Settings(EngineSettings):
    # hide_input_in_errors: a rejected value (an API key that is too short) is never echoed.
    model_config = SettingsConfigDict(env_prefix="ALIGNSERVE_", extra="forbid",
                                      hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")

    dual: Path | None = Field(
        None,
        description="JSON written by `alignserve dual` (CAN's λ* for one reward and cost); "
        "requests with alignment.cost_weight 'auto' use its λ as the cost weight. Checked at "
        "start-up: a missing or malformed file stops the server.",
    )

    presets: dict[str, Any] | None = Field(
        None,
        description="Presets: model ids that run an alignment object (server/presets.py), as "
        "--preset NAME=JSON (repeatable) or ALIGNSERVE_PRESETS='{\"NAME\": {...}}'. Listed by "
        "/v1/models; a request for one runs its alignment. Checked at start-up.")
    presets_file: Path | None = Field(
        None, description="YAML or JSON file of presets (NAME: alignment object); --preset "
        "entries win over the file's. Checked at start-up.")
    default_preset: str | None = Field(
        None, description="Preset applied to requests for the base model that carry no "
        "`alignment` (unset: those are plain sampling).")

    scorers: str | None = Field(
        None, max_length=100_000,
        description="More scorers requests may name, loaded at start-up: comma-separated "
        "hf:<id or path> (or ensemble names); flag --scorer NAME, repeatable. Requests can name "
        "only built-ins, value heads, remote scorers and these (docs/security.md).")
    tool_call_parser: str | None = Field(
        None, max_length=64,
        description="vLLM tool-call parser (e.g. hermes, llama3_json, pythonic) that reads the "
        "model's own tool-call syntax: enables tool_choice 'auto' (the default with tools). "
        "Without it tools work with tool_choice 'required' or a named function (structured "
        "outputs, any model). Checked against the tokenizer at start-up.")

    max_n: int = Field(128, ge=1, le=4096, description="Largest candidates-per-answer (alignment.n).")
    max_choices: int = Field(8, ge=1, le=128, description="Largest OpenAI `n` (choices per request).")
    max_tokens_limit: int | None = Field(
        None, ge=1, le=1_048_576,
        description="Largest max_tokens (unset: the model's context, as vLLM; prompt + "
        "max_tokens must fit the context either way).")
    default_max_tokens: int | None = Field(
        None, ge=1, le=1_048_576,
        description="Cap on max_tokens when a request omits it (unset: none, as vLLM: what the "
        "context leaves after the prompt); the token budget caps it too.",
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, le=1_048_576,
        description="Longest prompt, tokens (unset: the model's context less one token).")
    max_concurrent_requests: int = Field(
        64, ge=1, le=100_000, description="Requests in flight; more get 429 with Retry-After."
    )
    max_concurrent_requests_per_key: int | None = Field(
        None, ge=1, le=100_000,
        description="Requests in flight per client (per user API key; the admin key is one "
        "client; without keys, per client address); more get 429 with Retry-After, so one key "
        "cannot hold every slot. Unset: half of max_concurrent_requests (at least 1).",
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1024, le=1_000_000_000, description="Largest request body, bytes."
    )
    tokenize_max_chars: int = Field(
        100_000, ge=1, le=1_000_000,
        description="/tokenize: most characters of input (the prompt, or all messages' text "
        "together); more: 400 naming the field. /tokenize also takes an admission slot like "
        "a generation request (429 when full or when the client holds its share).")
    tokenize_max_messages: int = Field(
        256, ge=1, le=100_000, description="/tokenize: most chat messages in one request.")
    detokenize_max_tokens: int = Field(
        100_000, ge=1, le=1_000_000, description="/detokenize: most token ids in one request.")
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
        "old weights; past it those still running end with 503 + Retry-After (in-band for "
        "streams) and the swap goes on. Keep request_timeout_s at or below it.",
    )
    policy_reload_timeout_s: float = Field(
        300.0, gt=0, le=3600,
        description="Policy hot-swap: the longest the engine may take to reload weights (and, "
        "separately, to run the canary generation); past it the previous weights are restored.",
    )
    policy_root: Path | None = Field(
        None,
        description="Folder that checkpoint and adapter paths given to /admin/policies must "
        "resolve inside (symlinks followed). Unset: the folder holding the served model; when "
        "that is not a local folder, the admin API loads no paths. The policy file is not "
        "confined (operator configuration).",
    )
    max_lora_adapters: int = Field(
        8, ge=1, le=1024,
        description="LoRA adapters registered at once (each holds engine memory); more get 409 "
        "until one is removed (DELETE /admin/policies/NAME).",
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
    # Auth. Secrets are SecretStr (repr shows ******) and never logged.
    api_keys: SecretStr | None = Field(
        None, max_length=100_000,
        description="Comma-separated API keys (8+ characters each; 32+ when host is beyond "
        "loopback, else start-up stops). When set (or api_keys_file "
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
    admin_key_file: Path | None = Field(
        None, description="File holding the admin key (a mounted Secret; joins nothing: give "
        "admin_key or this). Read at start-up.")
    metrics_token: SecretStr | None = Field(
        None, min_length=16, max_length=4096,
        description="Bearer token /metrics needs (16+ characters); without it /metrics gets "
        "401. Unset (default): /metrics is open, for Prometheus inside the cluster "
        "(docs/security.md).")
    metrics_token_file: Path | None = Field(
        None, description="File holding the metrics token (a mounted Secret; give "
        "metrics_token or this). Read at start-up.")
    allow_unauthenticated: bool = Field(
        False, description="Serve /v1 without API keys on an address beyond loopback. Off: such "
        "a server refuses to start (one line), so no API is open by accident.")
    log_level: str = Field("info", description="Python logging level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text or one JSON object per line (for log "
        "collectors); both carry the request id and one access line per request.")
    sse_keepalive_s: float = Field(
        5.0, ge=0, le=300,
        description="Streams: send an SSE comment (': keep-alive') after this many seconds "
        "without an event, so proxies with idle timeouts keep best-of-n streams open while "
        "candidates are chosen; 0: never.")
    playground: bool = Field(
        True, description="Serve the playground page at /playground (static files; the page "
        "asks for an API key and its /v1 calls need one as any client's do). false: 404.")

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

    @field_validator("policy_file")
    @classmethod
    def _policy_file_loads(cls, v: Path | None) -> Path | None:
        if v is not None:
            try:
                load_policy_file(v)
            except OSError as exc:
                raise ValueError(f"cannot read {v}: {exc.strerror or exc}") from None
        return v

    @model_validator(mode="after")
    def _presets_parse(self) -> Settings:
        # schema errors at start-up, before the engine loads; names are checked once it is up
        try:
            for name, spec in self.preset_specs().items():
                parse_preset(name, spec)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.default_preset is not None and self.default_preset not in self.preset_specs():
            raise ValueError(f"default_preset {self.default_preset!r} is not a configured preset")
        return self

    def preset_specs(self) -> dict[str, Any]:
        """NAME → spec from presets_file, then `presets` (which win)."""
        specs = load_presets_file(self.presets_file) if self.presets_file else {}
        return {**specs, **(self.presets or {})}

    @field_validator("dual")
    @classmethod
    def _dual_loads(cls, v: Path | None) -> Path | None:
        # Fail at start-up, before the engine loads, rather than on the first "auto" request.
        if v is not None:
            load_solution(v)
        return v



def unknown_env_vars(environ=None) -> list[str]:
    """ALIGNSERVE_* variables that name no setting."""
    environ = os.environ if environ is None else environ
    fields = {f"ALIGNSERVE_{name.upper()}" for name in Settings.model_fields}
    return sorted(k for k in environ if k.upper().startswith("ALIGNSERVE_")
                  and k.upper() not in fields)

