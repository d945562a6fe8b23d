"""Validation at the edge: a pydantic request → `ResolvedRequest`, or an OpenAI-shaped 4xx.

Every limit is checked here, before any engine work: the model (a preset, or a LoRA adapter)
exists, n and
alignment.n are within the server's limits, the fields the strategy cannot honour are refused
(server/fields.py), the prompt fits, the worst case fits the per-request token budget, and the
scorers named by `alignment` exist and are of the kind the strategy needs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from decoding.dual import DualSolution
from decoding.protocols import QScorer, Scorer, TokenScorer
from decoding.request import Objective
from decoding.strategies import STRATEGIES, Strategy
from decoding.types import Sampling
from runtime.protocols import Runtime
from runtime.scorers import UnknownScorer
from runtime.tools import load_parser, tool_schema

from .. import presets, tools
from ..constraint import constraint_report, with_rule_options
from ..constraint import resolve as resolve_objective
from ..errors import APIError
from ..fields import check_fields, default_max_tokens, sampling_fields, wants_logprobs
from ..observability.request_ids import current_request_id
from ..presets import Preset, PresetBook
from ..protocol import AlignmentBase, ChatCompletionRequest, CompletionRequest
from ..settings import Settings
from .data import Kind, Prompt, ResolvedRequest

Request = ChatCompletionRequest | CompletionRequest

# vLLM samples greedily below this temperature (vllm.sampling_params._SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5


class RequestResolver:
    """Checks a request against the server's limits and resolves its names (one per server)."""

    def __init__(self, settings: Settings, runtime: Runtime, dual: DualSolution | None) -> None:
        self.settings, self.rt, self.dual = settings, runtime, dual  # dual: CAN's λ* or None
        self.presets = PresetBook.from_specs(settings.preset_specs(), settings.default_preset,
                                             runtime.model_name)
        # tool_choice auto: vLLM's parser for the model's tool-call syntax (runtime/tools.py)
        self.parse_tools = (load_parser(settings.tool_call_parser, runtime.engine.tokenizer)
                            if settings.tool_call_parser else None)

    def with_preset(self, req: Request) -> tuple[Request, Preset | None]:
        """The request with its preset's alignment merged in (server/presets.py), and the
        preset; unchanged and None when no preset applies."""
        preset = self.presets.for_request(req.model, req.alignment)
        if preset is None:
            return req, None
        merged = presets.apply(preset, req.alignment)
        return req.model_copy(update={"alignment": merged}), preset

    def _model(self, req: Request, preset: Preset | None) -> tuple[str, str | None]:
        """(the model id answering, for the response and the metrics; the LoRA adapter)."""
        if preset is not None:
            adapter = preset.adapter
            if adapter is not None and adapter not in self.rt.adapters:
                raise APIError(503, f"preset {preset.name!r} answers with LoRA adapter "
                               f"{adapter!r}, which is not loaded now", type="server_error",
                               param="model", code="adapter_unavailable")
            return preset.name, adapter
        if req.model in self.rt.adapters:
            return req.model, req.model
        if req.model is not None and req.model != self.rt.model_name:
            raise APIError(404, f"The model {req.model[:256]!r} does not exist; GET /v1/models "
                           "lists the base model, its presets and adapters",
                           type="not_found_error", param="model", code="model_not_found")
        return self.rt.model_name, None

    async def resolve(self, req: Request, kind: Kind,
                      prompts_of: Callable[[Request], list[Prompt]],
                      preset: Preset | None = None) -> ResolvedRequest:
        """`prompts_of` tokenises the endpoint's prompt(s) (chat template or raw prompts);
        `preset`: the one `with_preset` applied (its name answers and labels the metrics)."""
        s = self.settings
        model, adapter = self._model(req, preset)
        if req.n > s.max_choices:
            raise APIError(400, f"n {req.n} exceeds this server's limit {s.max_choices}",
                           param="n", code="invalid_value")
        strategy = STRATEGIES[req.alignment.strategy if req.alignment else "none"]
        check_fields(req, strategy.name)  # tools, unknown fields, fields the strategy refuses
        # cost_weight "auto": the served rule's own options (soft best-of-n selects at β)
        req = req.model_copy(update={"alignment": with_rule_options(req.alignment, self.dual)})
        plan = (tools.plan(req, tool_schema, self.parse_tools)
                if isinstance(req, ChatCompletionRequest) else None)
        # tokenising (a chat template, up to a megabyte of text) runs off the event loop, so
        # /health and the streams of other requests keep answering meanwhile
        prompts = await asyncio.to_thread(prompts_of, req)
        objective = await self._objective(req.alignment, strategy)
        self._check_adapter_option(req.alignment, strategy)
        value = await self._value(req.alignment, strategy)
        max_tokens = self._max_tokens(req, strategy, prompts)
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens {req.min_tokens} exceeds max_tokens {max_tokens}",
                           param="min_tokens", code="invalid_value")
        for p in prompts:
            self._check_length(p, max_tokens)
        self._check_budget(req, strategy, len(prompts), max_tokens)
        self._check_prefill(req, strategy, prompts)
        engine = self.rt.engine
        controls = sampling_fields(req, engine.sampling_defaults,
                                   len(engine.tokenizer))
        if plan is not None and plan.structured is not None:
            controls["structured"] = plan.structured  # every candidate is a tool call
        if controls["temperature"] < GREEDY_TEMPERATURE:  # the resolved one (generation_config)
            _check_greedy(req, strategy)
        rr = ResolvedRequest(
            kind=kind, prompts=prompts,
            sampling=Sampling(max_tokens=max_tokens, stop=tuple(req.stop or ()), seed=req.seed,
                              adapter=adapter, **controls),
            choices=req.n, strategy=strategy, alignment=req.alignment, objective=objective,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            value=value, warnings=_value_warnings(value, controls),
            logprobs=wants_logprobs(req),
            echo=bool(getattr(req, "echo", False)), model=model,
            preset=preset.name if preset else None, tools=plan,
            continuous_usage=bool(req.stream_options and req.stream_options.continuous_usage_stats),
            request_id=current_request_id() or uuid.uuid4().hex,
        )
        # cost_weight "auto": the rule's λ and predicted safety; warnings where the request
        # samples otherwise than the dual's reference samples (server/constraint.py)
        rr.constraint, warnings = constraint_report(rr.alignment, self.dual, rr.sampling,
                                                    self.rt.model_name)
        rr.warnings.extend(warnings)
        return rr

    def _max_tokens(self, req: Request, strategy: Strategy, prompts: list[Prompt]) -> int:
        """The request's max_tokens, or vLLM's default when omitted (fields.default_max_tokens).
        Both follow the model's context (prompt + max_tokens ≤ max_model_len, checked per
        prompt in `_check_length`) unless an operator set a lower limit."""
        s = self.settings
        context = self.rt.engine.max_model_len
        limit = min(s.max_tokens_limit or context, context)
        given = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if given is not None:
            if given > limit:
                where = ("the model's context length" if s.max_tokens_limit is None else
                         "this server's limit (--max-tokens-limit)")
                raise APIError(400, f"max_tokens {given} exceeds {where} {limit}",
                               param="max_tokens", code="invalid_value")
            return given
        per_answer = _per_answer(req, strategy)
        model_default = self.rt.engine.sampling_defaults.get("max_tokens")
        return default_max_tokens(
            max(len(p.ids) for p in prompts), context,
            min(s.default_max_tokens or limit, limit), model_default,
            s.max_request_tokens // (len(prompts) * req.n * per_answer))

    def _check_length(self, prompt: Prompt, max_tokens: int) -> None:
        n, limit = len(prompt.ids), self.settings.max_prompt_tokens
        if limit is not None and n > limit:
            raise APIError(400, f"prompt has {n} tokens; this server accepts at most {limit} "
                           "(--max-prompt-tokens)", param="messages",
                           code="context_length_exceeded")
        if n + max_tokens > self.rt.engine.max_model_len:
            raise APIError(400, f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the "
                           f"model's context length {self.rt.engine.max_model_len}",
                           param="max_tokens", code="context_length_exceeded")

    def _check_budget(self, req: Request, strategy: Strategy, prompts: int,
                      max_tokens: int) -> None:
        """Refuse requests whose worst case (every candidate runs to max_tokens) exceeds the
        per-request token budget. Plain sampling (a strategy without an objective) draws one
        sample per answer whatever alignment.n says; selection strategies at most n each:
        blockwise_cd's K = n candidates of every block add up to K·max_tokens too. tokenwise_cd
        (no objective needed) generates one engine token per answer token: max_tokens."""
        per_answer = _per_answer(req, strategy)
        tokens = prompts * req.n * per_answer * max_tokens
        if tokens > self.settings.max_request_tokens:
            raise APIError(400, f"request may generate up to {tokens} tokens (prompts {prompts} "
                           f"× n {req.n} × alignment.n {per_answer} × max_tokens {max_tokens}); "
                           f"the per-request budget is {self.settings.max_request_tokens}: "
                           "lower max_tokens or alignment.n, or start the server with a larger "
                           "--max-request-tokens", param="max_tokens",
                           code="token_budget_exceeded")

    def _check_prefill(self, req: Request, strategy: Strategy, prompts: list[Prompt]) -> None:
        """The prompt side of the budget: every candidate is its own engine request that
        prefills its prompt (speculative rejection: one per track), so many prompts × choices ×
        candidates cost compute even at max_tokens 1. The prefix cache shares full KV blocks
        between them, but the scheduler still handles each request: counted in full."""
        requests = req.n * _per_answer(req, strategy)
        tokens = requests * sum(len(p.ids) for p in prompts)
        if tokens > self.settings.max_request_tokens:
            raise APIError(400, f"request prefills {tokens} prompt tokens ({len(prompts)} "
                           f"prompt(s) of {sum(len(p.ids) for p in prompts)} tokens in all × "
                           f"{requests} engine requests each); the per-request budget is "
                           f"{self.settings.max_request_tokens}: send fewer prompts or "
                           "candidates, or start the server with a larger --max-request-tokens",
                           param="prompt" if req_kind(req) == "completions" else "messages",
                           code="token_budget_exceeded")

    async def _objective(self, a: AlignmentBase | None, strategy: Strategy) -> Objective | None:
        if a is None:
            return None
        if a.n > self.settings.max_n:
            raise APIError(400, f"alignment.n {a.n} exceeds this server's limit "
                           f"{self.settings.max_n}", param="alignment.n", code="invalid_value")
        names = resolve_objective(a, self.dual, self.settings.default_reward
                                  if strategy.traits.needs_objective else None)
        if names.reward is None:
            return None
        reward = await self._scorer(names.reward, "alignment.reward")
        cost = await self._scorer(names.cost, "alignment.cost") if names.cost else None
        for scorer, param in ((reward, "alignment.reward"), (cost, "alignment.cost")):
            if (scorer is not None and getattr(scorer, "relative", False)
                    and not strategy.traits.relative_scores_ok):
                raise APIError(400, f"{param} {scorer.name[:120]!r} is calibrated among the "
                               "candidates scored together (ensemble:/calibrated:); strategy "
                               f"{strategy.name!r} does not score i.i.d. candidates together: "
                               "use best_of_n, soft_best_of_n or nash", param=param,
                               code="invalid_value")
        return Objective(reward=reward, cost=cost, cost_weight=names.cost_weight)

    def _check_adapter_option(self, a: AlignmentBase | None, strategy: Strategy) -> None:
        """A strategy's `adapter_option` (aligner: `corrector`) must name a registered LoRA
        adapter; adapters registered since start-up count (the dict is shared with policies)."""
        option = strategy.traits.adapter_option
        if option is None or a is None:
            return
        name = getattr(a, option, None)
        if name not in self.rt.adapters:
            known = ", ".join(sorted(self.rt.adapters)) or "none (register one through "\
                "/admin/policies on a server started with --enable-lora true)"
            raise APIError(400, f"{strategy.name} needs alignment.{option}: a registered LoRA "
                           f"adapter; {name!r} is not one. Registered: {known}",
                           param=f"alignment.{option}", code="unknown_adapter")

    async def _value(self, a: AlignmentBase | None, strategy: Strategy) -> Scorer | None:
        """Resolve `alignment.value` against the scorer registry and check that it is the kind
        of value the strategy needs (its `value_protocol`: tokenwise CD needs a CD-Q head)."""
        needs = strategy.traits.value_protocol
        name = a.value if a else None
        if needs is None:
            if name is not None:
                raise APIError(400, f"alignment.value is not used by strategy {strategy.name!r}",
                               param="alignment.value", code="invalid_value")
            return None
        if name is None:
            if strategy.traits.value_required:
                raise APIError(400, f"{strategy.name} needs alignment.value: {_KINDS[needs]}",
                               param="alignment.value", code="invalid_value")
            return None
        scorer = await self._scorer(name, "alignment.value")
        if getattr(scorer, "relative", False) and not strategy.traits.relative_values_ok:
            raise APIError(400, f"{strategy.name} compares value scores across calls; an "
                           "ensemble:/calibrated: value is relative to one call",
                           param="alignment.value", code="invalid_value")
        if not isinstance(scorer, needs):
            raise APIError(400, f"{strategy.name} needs {_KINDS[needs]}; {name} is "
                           f"{_describe(scorer)}", param="alignment.value", code="invalid_value")
        return scorer

    async def _scorer(self, name: str, param: str) -> Scorer:
        try:
            return await self.rt.scorers.get(name)
        except UnknownScorer as exc:
            raise APIError(400, str(exc), param=param, code="unknown_scorer") from exc


def req_kind(req: Request) -> Kind:
    return "chat" if isinstance(req, ChatCompletionRequest) else "completions"


def _per_answer(req, strategy: Strategy) -> int:
    """Worst-case generations of max_tokens per answer: alignment.n for selection strategies,
    else the strategy's `generations_per_answer` (aligner: draft + correction = 2)."""
    if req.alignment and strategy.traits.needs_objective:
        return req.alignment.n
    return strategy.traits.generations_per_answer if req.alignment else 1


def _value_warnings(value: Scorer | None, controls: Mapping[str, Any]) -> list[str]:
    """A value head knows the sampling settings its targets were computed at (valuenet): a
    CD-Q head's Q assumes continuations drawn from that same p, so with another temperature,
    top-p, top_k, min_p, penalty, logit_bias, min_tokens or structured output (every resolved
    control that changes p, passed by name) its tilt no longer targets π* ∝ p·exp(λ·Q). Say so
    in the answer."""
    check = getattr(value, "warnings_for", None)
    return list(check(**controls)) if check is not None else []


def _check_greedy(req: Request, strategy: Strategy) -> None:
    """Temperature 0 is greedy decoding: every draw is the same answer. A strategy that picks
    among several draws (or tilts the sampling distribution) has nothing to choose from, and
    vLLM refuses n > 1 at temperature 0; refuse it here, naming the field, rather than report
    a KL estimate computed from probabilities nobody sampled from."""
    if req.n > 1:
        raise APIError(400, f"n {req.n} needs temperature > 0: greedy choices are identical",
                       param="n", code="invalid_value")
    a = req.alignment
    if a is None:
        return
    if strategy.traits.needs_objective and a.n > 1:
        raise APIError(400, f"{strategy.name} draws alignment.n = {a.n} candidates, which are "
                       "identical at temperature 0 (greedy); use temperature > 0 or "
                       "alignment.n 1", param="temperature", code="invalid_value")
    if strategy.traits.needs_sampling:
        raise APIError(400, f"{strategy.name} samples from a tilted policy and needs "
                       "temperature > 0", param="temperature", code="invalid_value")


# What each value protocol means, for error messages (most specific first for `_describe`).
_KINDS: dict[type, str] = {QScorer: "a CD-Q value head (value:NAME trained as CD-Q)",
          TokenScorer: "a value head", Scorer: "a scorer"}


def _describe(scorer: Scorer) -> str:
    if isinstance(scorer, QScorer):
        return "a CD-Q head"
    if isinstance(scorer, TokenScorer):
        return "a FUDGE head (prefix values only, no per-token Q values)"
    return "a text scorer"
