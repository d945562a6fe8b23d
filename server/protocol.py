"""The HTTP schema: OpenAI's chat/completions fields in OpenAI's order, then our `alignment` block.

No field is silently ignored: every declared field is honoured or refused with a 400 naming
it (`server/fields.py`: tools, and fields a strategy cannot honour); undeclared fields are a
400 too (`extra="forbid"`). A deliberate allow-list of SDK fields that cannot change the
answer (`user`, `metadata`, `store`, ...) is declared and marked "accepted, no effect".
Sampling fields default to None (omitted), so the model's generation_config can fill them.
An explicit `null` means "not set" for every optional field (SDKs and frontends serialise unset
fields as null): `_Body` drops nulls before validation, so the field takes its default.
Limits that depend on settings (max n, max_tokens, prompt length) are checked in `serving/resolve.py`.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from decoding.request import StrategyOptions
from decoding.strategies import STRATEGIES

# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


# Longest stop string: stop matching rescans recent text for each one at every step.
MAX_STOP_CHARS = 1024
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(text: str) -> str:
    """JSON may carry lone surrogates (`"\\ud800"`), which are not Unicode text: no tokenizer
    can encode them. Refused here, naming the field, instead of failing deep inside."""
    if not text.isascii() and _SURROGATE.search(text):
        raise ValueError("contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text")
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Body(BaseModel):
    """Request objects: an unknown key is a 400 naming it; `null` means "not set"."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class TextPart(_Body):
    type: Literal["text"]
    text: Text


# Content part types of OpenAI's API that carry something other than text: refused by name.
_NON_TEXT_PARTS = {"image_url": "images", "input_audio": "audio", "file": "files",
                   "refusal": "refusal parts"}


class FunctionCall(_Body):
    name: str = Field(..., max_length=64)
    arguments: str = Field(..., max_length=1_000_000, description="JSON, as a string.")


class ToolCall(_Body):
    id: str = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(_Body):
    """What every chat message has; `role` picks the message type (`ChatMessage`)."""

    content: Text | list[TextPart] | None = None
    name: Text | None = Field(None, max_length=256)  # passed to the chat template, as vLLM does
    # Output fields clients echo back from earlier answers: not part of the prompt.
    refusal: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        for part in v if isinstance(v, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _NON_TEXT_PARTS:
                raise ValueError(f"{kind} content parts are not supported: this server's model "
                                 f"reads text, not {_NON_TEXT_PARTS[kind]}")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class PromptMessage(_Message):
    role: Literal["system", "developer", "user"]


class AssistantMessage(_Message):
    role: Literal["assistant"]
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)


class ToolMessage(_Message):
    role: Literal["tool"]
    tool_call_id: str = Field(..., max_length=256, description="The call this answers.")


# One type per role (as OpenAI's schema): only an assistant message carries tool_calls, and a
# tool message needs the tool_call_id it answers.
ChatMessage = Annotated[PromptMessage | AssistantMessage | ToolMessage,
                        Field(discriminator="role")]


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="Usage (so far) in every chunk, as vLLM; needs include_usage.")


class JsonSchema(_Body):
    name: str = Field(..., max_length=64)
    description: str | None = None
    schema_: dict = Field(..., alias="schema", description="The JSON Schema answers must obey.")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class _SamplingFields(_Body):
    """Fields shared by both endpoints, in OpenAI's order."""

    model: str | None = Field(None, max_length=256)
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
    stop: Text | list[Text] | None = None
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
        # stop matching scans the text for every string at every step: keep them short
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
        return stops

    # ---- alignserve extension ---------------------------------------------------------------
    alignment: Alignment | None = Field(
        None, description="Inference-time alignment; absent or strategy 'none' = plain sampling."
    )


class AlignmentBase(_Body):
    """The `alignment` fields every strategy takes; each strategy adds its own `Options`
    (decoding/strategies.py), flat in the same object: see `Alignment`."""

    strategy: str = Field("none", description="A name from the strategy registry.")
    n: int = Field(4, ge=1, description="Candidates sampled per answer.")
    reward: str | None = Field(None, description="Reward scorer (default: the server's).")
    cost: str | None = Field(None, description="Optional cost scorer.")
    cost_weight: Annotated[float, Field(ge=0.0, le=1e6)] | Literal["auto"] = Field(
        1.0, description="λ in score = reward − λ·cost; 'auto': the server's CAN dual λ* "
        "(setting `dual`, solved by `alignserve dual`).")
    return_candidates: bool = Field(False, description="The decision trace with every "
                                    "candidate's token ids (docs/strategies.md).")
    trace: bool = Field(False, description="The decision trace (candidates ranked with their "
                        "score terms, decision points, blocks, per-token KL) without the "
                        "candidates' token ids and log-probs: a lighter return_candidates.")
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
    # Built from the registry at import: the checker cannot follow a Literal of a variable
    # nor a base tuple mixing the two hierarchies.
    return create_model(title, __base__=(AlignmentBase, options),  # type: ignore[arg-type]
                        __doc__=f"`alignment` with strategy {name!r}.",
                        strategy=(Literal[name], Field(name, description="The strategy.")))  # type: ignore[arg-type]


def _strategy_tag(value) -> str | None:
    """The union's tag: the `strategy` key (absent: "none"); None for an unknown name."""
    name = (value.get("strategy") or "none") if isinstance(value, dict) else getattr(
        value, "strategy", None)  # null: not set
    return name if isinstance(name, str) and name in STRATEGIES else None


# One model per registered strategy, chosen by `strategy`: a field of another strategy is a
# 400 naming it (extra="forbid"), an unknown strategy a 400 with code unknown_strategy
# (server/errors.py). Adding a strategy adds its member here; nothing to edit.
if TYPE_CHECKING:  # to a type checker the registry-built union is its common base
    Alignment: TypeAlias = AlignmentBase
else:
    Alignment = Annotated[
        Union[tuple(Annotated[_alignment_model(name, s.Options), Tag(name)]  # noqa: UP007
                    for name, s in STRATEGIES.items())],
        Discriminator(_strategy_tag, custom_error_type="unknown_strategy",
                      custom_error_message="unknown alignment strategy"),
    ]


# Fields of OpenAI's chat request this server cannot honour, each refused by name with why
# (server/fields.py `check_fields`); declared so that the refusal says why, not "extra field".
CHAT_REFUSED: dict[str, str] = {
    "audio": "audio output is not supported: this server generates text",
    "prediction": "predicted outputs are not supported by this server",
    "web_search_options": "web search is not available on this server",
    "functions": "the deprecated `functions` field is not supported (no tool calling)",
    "function_call": "the deprecated `function_call` field is not supported (no tool calling)",
    "verbosity": "verbosity is a hint to OpenAI's reasoning models; this model has no such "
                 "control",
}


class FunctionDefinition(_Body):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = Field(None, max_length=100_000)
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments.")
    strict: bool | None = None  # the arguments always follow the schema here (a grammar)


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str = Field(..., max_length=64)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


def _refused(name: str) -> Any:
    """A field declared only to be refused by name (server/fields.py): null in the schema, so
    the OpenAPI document says what a request may send."""
    return Field(None, description=f"Refused unless null: {CHAT_REFUSED[name]}.",
                 json_schema_extra={"type": "null"})


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    audio: Any = _refused("audio")
    function_call: Any = _refused("function_call")
    functions: Any = _refused("functions")
    logprobs: bool = Field(False, description="Return the answer's token log-probabilities.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens "
                                              "(wins when both are given).")
    modalities: list[Literal["text"]] | None = Field(
        None, description="Only ['text']: this server generates text.")
    parallel_tool_calls: bool | None = Field(
        None, description="tool_choice required: false allows one call only (default true).")
    prediction: Any = _refused("prediction")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="Passed to the chat template as `reasoning_effort`, as vLLM does "
        "(templates without the variable ignore it).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="required / a named function: the answer is a tool call (structured "
        "outputs); auto (the default with tools): needs the server's --tool-call-parser; "
        "server/tools.py.")
    tools: list[ChatTool] | None = Field(None, max_length=128)
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the k "
                                     "most likely tokens at each position too.")
    verbosity: Any = _refused("verbosity")
    web_search_options: Any = _refused("web_search_options")

    # ---- vLLM's chat extras (same names and meaning as vLLM's OpenAI server) ----------------
    add_generation_prompt: bool = Field(
        True, description="End the prompt with the assistant turn's header (the template's).")
    continue_final_message: bool = Field(
        False, description="Continue the last (assistant) message instead of starting a new "
        "turn: assistant prefill. Needs add_generation_prompt false; the answer is what comes "
        "after the prefill, and KL accounting covers only the generated tokens.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, max_length=32, description="Extra variables for the chat template (e.g. "
        "enable_thinking), as vLLM; may not override the messages or the template's controls.")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        clash = sorted(set(v or ()) & RESERVED_TEMPLATE_KWARGS)
        if clash:
            raise ValueError(f"{clash[0]!r} is set by the server, not by chat_template_kwargs")
        return v

    @model_validator(mode="after")
    def _prefill(self) -> ChatCompletionRequest:
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise ValueError("continue_final_message needs add_generation_prompt: false")
            if self.messages[-1].role != "assistant":
                raise ValueError("continue_final_message needs the last message to be the "
                                 "assistant's (the prefill)")
        return self


# Template inputs the server sets itself: chat_template_kwargs may not override them.
RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "documents", "chat_template", "tokenize",
                            "add_generation_prompt", "continue_final_message", "return_dict",
                            "conversation", "tokenizer"}


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
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
    token_ids: list[int] | None  # null with `trace` alone (return_candidates gives them)
    # per-token log-probs of token_ids (same distribution as `logprob`); only when the request
    # asks for `logprobs` (`alignserve rollouts --server` stores them)
    logprobs: list[float] | None = None
    tool_calls: list[ToolCall] | None = None  # with tools: what this candidate would call
    # the decision trace (docs/strategies.md): the selection score, its rank (1: best) and
    # whether this candidate is the answer
    objective: float | None = None  # reward − cost_weight·cost (null: not scored whole)
    rank: int | None = None
    chosen: bool = False
    selection_probability: float | None = None  # soft best-of-n: softmax(objective / λ)


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
    constraint: dict | None = Field(
        None, description="cost_weight 'auto': the served rule, its λ, the threshold b and the "
        "predicted E[g] (a mean over prompts like the dual's reference prompts, not a per-answer "
        "guarantee) with a bootstrap interval (server/constraint.py).")
    warnings: list[str] | None = Field(
        None, description="Where the answer's guarantees are weaker than usual, and why (e.g. a "
        "CD-Q head used at a sampling temperature other than its training one).")


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


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
    # as vLLM: root = what the weights come from, parent = the served model it builds on
    root: str | None = None
    parent: str | None = None  # for a LoRA adapter or a preset: the base model
    max_model_len: int | None = None
    alignment: dict[str, Any] | None = Field(
        None, description="A preset's alignment object: what a request for this model runs.")
    description: str | None = None  # a preset's description, for people browsing the list


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
        "hash), active policy, when, and the last error (server/policy/file.py).")


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


# --------------------------------------------------------------------------------------------
# The Responses API (/v1/responses): text and function tools. server/serving/responses.py
# translates a request into a chat completion request (presets, limits, tools and `alignment`
# apply as on chat).
# Fields it cannot honour are declared loosely here and refused by name there (`REFUSED`);
# explicit nulls mean "not set".
# --------------------------------------------------------------------------------------------


class ResponsesTextPart(BaseModel):
    """A text part of an input message (`output_text`: an earlier answer echoed back)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[dict] | None = None  # output fields echoed back: not part of the prompt
    logprobs: list[dict] | None = None


class ResponsesRefusalPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["refusal"]
    refusal: str  # an earlier answer's refusal: part of the conversation, as text


class ResponsesInputMessage(BaseModel):
    """A message item of `input`: `{"role", "content"}`, optionally `"type": "message"`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Annotated[ResponsesTextPart | ResponsesRefusalPart,
                                  Field(discriminator="type")]]
    # Output fields clients echo back from earlier answers: not part of the prompt.
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, ResponsesTextPart) else p.refusal
                       for p in self.content)


class ResponsesFunctionCallItem(BaseModel):
    """An input item `{"type": "function_call"}`: a call an earlier answer made (chat: an
    assistant message's tool call)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call"]
    call_id: str = Field(..., min_length=1, max_length=256)
    name: str = Field(..., max_length=64)
    arguments: str = Field(..., max_length=1_000_000, description="JSON, as a string.")
    # Output fields clients echo back from earlier answers: not part of the prompt.
    id: str | None = None
    status: str | None = None
    caller: dict[str, Any] | None = None


class ResponsesFunctionCallOutputItem(BaseModel):
    """An input item `{"type": "function_call_output"}`: a call's result (chat: a `tool`
    message). `output` is a string or `input_text` parts (joined)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call_output"]
    call_id: str = Field(..., min_length=1, max_length=256)
    output: str | list[ResponsesTextPart]
    id: str | None = None
    status: str | None = None
    caller: dict[str, Any] | None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(p.text for p in self.output)


class ResponsesFunctionTool(BaseModel):
    """A function tool of `tools` (chat's `{"type": "function", "function": {...}}`,
    flattened)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = Field(None, max_length=100_000)
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments.")
    strict: bool | None = None  # the arguments always follow the schema here (a grammar)
    output_schema: dict[str, Any] | None = None  # describes the tool's result: no effect here
    # tool search and programmatic callers are hosted features: refused unless neutral
    defer_loading: Literal[False] | None = None
    allowed_callers: list[Literal["direct"]] | None = None

    def chat(self) -> dict[str, Any]:
        """As chat's tool object."""
        fn = self.model_dump(include={"name", "description", "parameters", "strict"},
                             exclude_none=True)
        return {"type": "function", "function": fn}

    def echo(self) -> dict[str, Any]:
        """As the response repeats it (OpenAI's FunctionTool: parameters and strict always)."""
        return self.model_dump(include={"type", "name", "description", "parameters", "strict"})


class ResponsesToolChoiceFunction(BaseModel):
    """`tool_choice: {"type": "function", "name": ...}`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(..., max_length=64)


class ResponsesTextFormat(BaseModel):
    """`text.format`: chat's `response_format`, flattened."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponsesText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: ResponsesTextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # only medium (the default)


class ResponsesReasoning(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: str | None = None  # chat's reasoning_effort (a chat-template variable)
    summary: str | None = None  # refused when set: no reasoning summaries
    generate_summary: str | None = None


class ResponsesStreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_obfuscation: bool | None = None  # refused when true: no obfuscation padding


class ResponsesRequest(BaseModel):
    """POST /v1/responses. Every field of OpenAI's request is declared; the ones this server
    cannot honour are refused by name (server/serving/responses.py `REFUSED`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[dict[str, Any]] | None = Field(
        None, description="A string (one user message) or a list of message items.")
    instructions: str | None = Field(None, description="A system message before `input`.")
    max_output_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None  # echoed back; no effect on the answer
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = None
    stream_options: ResponsesStreamOptions | None = None
    text: ResponsesText | None = None
    tools: list[dict[str, Any]] | None = Field(
        None, max_length=128, description="Function tools (built-in tools are refused by name).")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="none, auto (needs the server's --tool-call-parser), required, or "
        "{type: function, name}: as chat's (server/tools.py).")
    parallel_tool_calls: bool | None = None  # tool_choice required: false allows one call
    max_tool_calls: int | None = Field(None, ge=1)  # accepted: counts built-in tools, none here
    store: bool | None = None  # accepted; nothing is stored (docs/responses.md)
    user: str | None = None  # accepted, no effect
    safety_identifier: str | None = None  # accepted, no effect
    prompt_cache_key: str | None = None  # accepted, no effect (the prefix cache is automatic)
    prompt_cache_retention: str | None = None  # accepted, no effect
    prompt_cache_options: dict[str, Any] | None = None  # accepted, no effect
    service_tier: str | None = None  # accepted, no effect
    truncation: str | None = None  # only "disabled" (the default)
    # Refused when set (server/serving/responses.py says why for each):
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    background_options: dict[str, Any] | None = None
    reasoning: ResponsesReasoning | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    prompt: dict[str, Any] | None = None
    context_management: Any = None
    access_programs: Any = None
    image: Any = None
    moderation: Any = None

    # ---- alignserve extension ---------------------------------------------------------------
    alignment: Alignment | None = Field(
        None, description="Inference-time alignment, as on /v1/chat/completions.")


class ResponsesOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict] = Field(default_factory=list)
    logprobs: list[dict] = Field(default_factory=list)


class ResponsesOutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[ResponsesOutputText]


class ResponsesFunctionCall(BaseModel):
    """An output item: a function call of the answer (chat's `tool_calls` entry)."""

    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str  # JSON, as a string
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ResponsesInputDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # required by OpenAI's ResponseUsage type; nothing is stored


class ResponsesOutputDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: ResponsesInputDetails = Field(default_factory=ResponsesInputDetails)
    output_tokens: int
    output_tokens_details: ResponsesOutputDetails = Field(
        default_factory=ResponsesOutputDetails)
    total_tokens: int


class ResponsesIncomplete(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponsesError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """The answer of /v1/responses (also the `response` of its stream events)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponsesError | None = None
    incomplete_details: ResponsesIncomplete | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[Annotated[ResponsesOutputMessage | ResponsesFunctionCall,
                           Field(discriminator="type")]]
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict] = Field(default_factory=list)
    truncation: Literal["disabled"] = "disabled"
    store: bool = False  # nothing is stored, whatever the request said
    background: bool = False
    usage: ResponsesUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    alignment: AlignmentInfo | None = None


_SamplingFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
