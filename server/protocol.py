"""The HTTP schema: OpenAI's chat/completions fields in OpenAI's order, then our `alignment` block.

No field is silently ignored: every declared field is honoured or refused with a 400 naming
it (`server/fields.py`: tools, and fields a strategy cannot honour); undeclared fields are a
400 too (`extra="forbid"`). A deliberate allow-list of SDK fields that cannot change the
answer (`user`, `metadata`, `store`, ...) is declared and marked "accepted, no effect".
Sampling fields default to None (omitted), so the model's generation_config can fill them.
Limits that depend on settings (max n, max_tokens, prompt length) are checked in `serving/resolve.py`.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model, field_validator

from decoding.protocols import StrategyOptions
from decoding.strategies import STRATEGIES

# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown key is a 400 naming it

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # passed to the chat template, as vLLM does
    # Tool calling is not implemented: declared so that fields.py refuses them (400).
    tool_calls: list[dict] | None = Field(None, max_length=0)
    tool_call_id: str | None = Field(None, max_length=0)
    # Output fields clients echo back from earlier answers: not part of the prompt.
    refusal: str | None = None
    reasoning_content: str | None = None

    @field_validator("role", "tool_calls", "tool_call_id", mode="before")
    @classmethod
    def _no_tools(cls, v, info):
        if (v == "tool") if info.field_name == "role" else v:
            raise ValueError("tool calls and tool results are not supported by this server "
                             "(no tool parser)")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchema(BaseModel):
    name: str = Field(..., max_length=64)
    description: str | None = None
    schema_: dict = Field(..., alias="schema", description="The JSON Schema answers must obey.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints, in OpenAI's order."""

    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it

    model: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=1024,
        description="Token id (as a string) → bias in [-100, 100] added to its logit.")
    metadata: dict[str, str] | None = None  # SDK bookkeeping: accepted, no effect
    max_tokens: int | None = Field(None, ge=1, description="New tokens per answer (default: "
                                   "what is left of the context, capped by the server).")
    n: int = Field(1, ge=1, description="Choices to return; each is its own aligned answer.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    prompt_cache_key: str | None = None  # accepted, no effect (vLLM's prefix cache is automatic)
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = None  # accepted, no effect
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    service_tier: str | None = None  # accepted, no effect
    stop: str | list[str] | None = None
    store: bool | None = None  # accepted; nothing is stored
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None  # recorded nowhere; allowed because SDKs send it

    # ---- vLLM's sampling extras (same names and meaning as vLLM's OpenAI server) ------------
    top_k: int | None = Field(None, ge=-1, description="Sample from the k most likely tokens "
                              "(0 or -1: all).")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    min_tokens: int = Field(0, ge=0, description="EOS and stop tokens are banned before this.")
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    # ---- alignserve extension ---------------------------------------------------------------
    alignment: Alignment | None = Field(
        None, description="Inference-time alignment; absent or strategy 'none' = plain sampling."
    )


class AlignmentBase(BaseModel):
    """The `alignment` fields every strategy takes; each strategy adds its own `Options`
    (decoding/strategies.py), flat in the same object: see `Alignment`."""

    model_config = ConfigDict(extra="forbid")

    strategy: str = Field("none", description="A name from the strategy registry.")
    n: int = Field(4, ge=1, description="Candidates sampled per answer.")
    reward: str | None = Field(None, description="Reward scorer (default: the server's).")
    cost: str | None = Field(None, description="Optional cost scorer.")
    cost_weight: Annotated[float, Field(ge=0.0)] | Literal["auto"] = Field(
        1.0, description="λ in score = reward − λ·cost; 'auto': the server's CAN dual λ* "
        "(setting `dual`, solved by `alignserve dual`).")
    return_candidates: bool = False
    value: str | None = Field(None, description="Value scorer guiding the strategy (controlled "
                              "decoding, speculative rejection's decisions): a `value:NAME` head "
                              "or any scorer (blockwise default: the reward).")

    def options(self) -> StrategyOptions:
        """The strategy's own fields, as its typed `Options` (what `DecodeRequest` carries)."""
        cls = STRATEGIES[self.strategy].Options
        return cls.model_construct(**{name: getattr(self, name) for name in cls.model_fields})


def _alignment_model(name: str, options: type[StrategyOptions]) -> type[AlignmentBase]:
    """`alignment` for strategy `name`: the common fields plus its own options."""
    title = "".join(part.title() for part in name.split("_")) + "Alignment"
    return create_model(title, __base__=(AlignmentBase, options),
                        __doc__=f"`alignment` with strategy {name!r}.",
                        strategy=(Literal[name], Field(name, description="The strategy.")))


def _strategy_tag(value) -> str | None:
    """The union's tag: the `strategy` key (absent: "none"); None for an unknown name."""
    name = value.get("strategy", "none") if isinstance(value, dict) else getattr(
        value, "strategy", None)
    return name if isinstance(name, str) and name in STRATEGIES else None


# One model per registered strategy, chosen by `strategy`: a field of another strategy is a
# 400 naming it (extra="forbid"), an unknown strategy a 400 with code unknown_strategy
# (server/errors.py). Adding a strategy adds its member here; nothing to edit.
Alignment = Annotated[
    Union[tuple(Annotated[_alignment_model(name, s.Options), Tag(name)]  # noqa: UP007
                for name, s in STRATEGIES.items())],
    Discriminator(_strategy_tag, custom_error_type="unknown_strategy",
                  custom_error_message="unknown alignment strategy"),
]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = Field(False, description="Return the answer's token log-probabilities.")
    max_completion_tokens: int | None = Field(None, ge=1)
    parallel_tool_calls: bool | None = None  # accepted: no tools, so nothing to parallelise
    # Tool calling is not implemented (no tool parser): declared so that any use is refused
    # with a 400 naming the field, never dropped.
    tool_choice: Literal["none"] | None = Field(None, description="Only 'none': no tool calling.")
    tools: list[dict] | None = Field(None, max_length=0, description="Not supported: no tools.")

    @field_validator("tools", "tool_choice", mode="before")
    @classmethod
    def _no_tools(cls, v):
        if v and v != "none":
            raise ValueError("tool calling is not supported by this server (no tool parser)")
        return v
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the k "
                                     "most likely tokens at each position too.")


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1, description="Only 1 or n (use alignment.n).")
    echo: bool = Field(False, description="Prepend the prompt to the text.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return the answer's token "
                                 "log-probabilities and the k most likely tokens at each.")
    suffix: str | None = None  # refused: no insertion mode

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if v == "" or v == [] or (isinstance(v, list) and any(p in ("", []) for p in v)):
            raise ValueError("prompt must not be empty")
        return v


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Latency(BaseModel):
    generate_s: float
    score_s: float
    total_s: float


class Candidate(BaseModel):
    text: str
    reward: float | None
    cost: float | None
    tokens: int
    logprob: float  # Σ log p(token) under the distribution sampled from (the KL estimator's log ε)
    finish_reason: str | None  # null: stopped early by speculative rejection
    token_ids: list[int]
    # per-token log-probs of token_ids (same distribution as `logprob`); only when the request
    # asks for `logprobs` (`alignserve rollouts --server` stores them)
    logprobs: list[float] | None = None


class AlignmentInfo(BaseModel):
    """Accounting of one aligned answer (see docs/strategies.md: KL accounting)."""

    model_config = ConfigDict(extra="allow")  # strategy-specific fields (rounds, blocks, ...)

    strategy: str
    n: int
    reward: float | None = None
    cost: float | None = None
    kl_bound: float | None  # null: no bound holds (aligner; see its warning)
    kl_estimate: float | None
    win_rate_bound: float | None = None
    generated_tokens: int
    scored_candidates: int
    latency: Latency
    cost_weight: float | None = None  # the weight used (λ* when the request said "auto")
    candidates: list[Candidate] | None = None
    warnings: list[str] | None = Field(
        None, description="Where the answer's guarantees are weaker than usual, and why (e.g. a "
        "CD-Q head used at a sampling temperature other than its training one).")


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    alignment: AlignmentInfo | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    alignment: AlignmentInfo | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    alignment: AlignmentInfo | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    alignment: AlignmentInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "alignserve"
    max_model_len: int | None = None
    parent: str | None = None  # for a LoRA adapter: the served model it adapts


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# --------------------------------------------------------------------------------------------
# vLLM's tokenizer endpoints (/tokenize, /detokenize) and /version
# --------------------------------------------------------------------------------------------


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str = Field(..., max_length=1_000_000)
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(..., max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionInfo(BaseModel):
    version: str = Field(description="alignserve's version.")
    vllm: str | None = Field(None, description="The vLLM build serving the model.")


# --------------------------------------------------------------------------------------------
# Operations (not OpenAI): probes and the admin API
# --------------------------------------------------------------------------------------------


class ProbeStatus(BaseModel):
    status: str = Field(description="'ok', or why not: loading, draining, unhealthy, ...")


class AdminStatus(BaseModel):
    state: str = Field(description="loading | ready | warmup_failed | draining | stopped")
    model: str
    requests_in_flight: int
    max_concurrent_requests: int
    engine_requests_unfinished: int | None = None
    user_keys: int = Field(description="How many user API keys are configured (never the keys).")
    policy: str | None = Field(None, description="Active policy (see /admin/policies).")
    policy_file: dict | None = Field(
        None, description="Policy file this replica follows: path, generation applied (content "
        "hash), active policy, when, and the last error (server/policy_file.py).")


class PolicyCreate(BaseModel):
    """POST /admin/policies: register a full checkpoint folder (and by default activate it)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="Policy name; 'base' is the model the server started with.")
    path: str | None = Field(None, min_length=1, max_length=4096,
                             description="Checkpoint folder on the server (config.json + "
                             "*.safetensors); may be omitted for a registered name.")
    activate: bool = Field(True, description="Swap it in now; false only validates and records.")


class PolicyInfo(BaseModel):
    name: str
    path: str | None
    kind: Literal["full", "lora"] = Field("full", description="full: a checkpoint swapped in "
                                          "for all requests; lora: an adapter chosen per "
                                          "request by `model`.")
    active: bool
    registered_at: int = Field(description="Unix time it was registered.")
    loaded_at: int | None = Field(None, description="Unix time it last became active.")
    activations: int = 0


class PolicySwap(BaseModel):
    previous: str
    drained_requests: int = Field(description="Requests running when the swap began; each "
                                  "finished on the previous policy.")
    queued_requests: int = Field(description="Most requests queued at the gate during the swap; "
                                 "they ran on the new policy.")
    drain_s: float
    reload_s: float
    total_s: float


class PolicyStatus(PolicyInfo):
    swap: PolicySwap | None = Field(None, description="Set when this call swapped policies.")


class PolicyList(BaseModel):
    object: Literal["list"] = "list"
    active: str
    swapping: bool = Field(description="True while a swap holds new requests at the gate.")
    swaps: int = Field(description="Successful swaps since start-up.")
    data: list[PolicyInfo]


_SamplingFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
