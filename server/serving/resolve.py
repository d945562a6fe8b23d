"""Validation at the edge: a pydantic request → `ResolvedRequest`, or an OpenAI-shaped 4xx.

Every limit is checked here, before any engine work: the model (or LoRA adapter) exists, n and
alignment.n are within the server's limits, the fields the strategy cannot honour are refused
(server/fields.py), the prompt fits, the worst case fits the per-request token budget, and the
scorers named by `alignment` exist and are of the kind the strategy needs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from decoding.dual import DualSolution
from decoding.protocols import Objective, QScorer, Sampling, Scorer, TokenScorer
from decoding.strategies import STRATEGIES, Strategy
from runtime.protocols import Runtime
from runtime.scorers import UnknownScorer

from ..constraint import resolve as resolve_objective
from ..errors import APIError
from ..fields import check_fields, default_max_tokens, sampling_fields, wants_logprobs
from ..protocol import AlignmentBase, ChatCompletionRequest, CompletionRequest
from ..settings import Settings
from ..tracing import current_request_id
from .data import Kind, Prompt, ResolvedRequest

Request = ChatCompletionRequest | CompletionRequest

# vLLM samples greedily below this temperature (vllm.sampling_params._SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5


class RequestResolver:
    """Checks a request against the server's limits and resolves its names (one per server)."""

    def __init__(self, settings: Settings, runtime: Runtime, dual: DualSolution | None) -> None:
        self.settings, self.rt, self.dual = settings, runtime, dual  # dual: CAN's λ* or None

    async def resolve(self, req: Request, kind: Kind,
                      prompts_of: Callable[[Request], list[Prompt]]) -> ResolvedRequest:
        """`prompts_of` tokenises the endpoint's prompt(s) (chat template or raw prompts)."""
        s = self.settings
        adapter = req.model if req.model in self.rt.adapters else None
        if req.model is not None and req.model != self.rt.model_name and adapter is None:
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves "
                           f"{self.rt.model_name!r}", type="not_found_error", param="model",
                           code="model_not_found")
        if req.n > s.max_choices:
            raise APIError(400, f"n {req.n} exceeds this server's limit {s.max_choices}",
                           param="n", code="invalid_value")
        strategy = STRATEGIES[req.alignment.strategy if req.alignment else "none"]
        check_fields(req, strategy.name)  # tools, unknown fields, fields the strategy refuses
        prompts = prompts_of(req)
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
        engine = self.rt.engine
        controls = sampling_fields(req, engine.sampling_defaults,
                                   len(engine.tokenizer))
        if controls["temperature"] < GREEDY_TEMPERATURE:  # the resolved one (generation_config)
            _check_greedy(req, strategy)
        return ResolvedRequest(
            kind=kind, prompts=prompts,
            sampling=Sampling(max_tokens=max_tokens, stop=tuple(req.stop or ()), seed=req.seed,
                              adapter=adapter, **controls),
            choices=req.n, strategy=strategy, alignment=req.alignment, objective=objective,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            value=value, warnings=_value_warnings(value, controls["temperature"],
                                                  controls["top_p"]),
            logprobs=wants_logprobs(req),
            echo=bool(getattr(req, "echo", False)), model=adapter or self.rt.model_name,
            request_id=current_request_id() or uuid.uuid4().hex,
        )

    def _max_tokens(self, req: Request, strategy: Strategy, prompts: list[Prompt]) -> int:
        """The request's max_tokens, or vLLM's default when omitted (fields.default_max_tokens)."""
        s = self.settings
        given = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if given is not None:
            if given > s.max_tokens_limit:
                raise APIError(400, f"max_tokens {given} exceeds this server's limit "
                               f"{s.max_tokens_limit}", param="max_tokens", code="invalid_value")
            return given
        per_answer = _per_answer(req, strategy)
        model_default = self.rt.engine.sampling_defaults.get("max_tokens")
        return default_max_tokens(
            max(len(p.ids) for p in prompts), self.rt.engine.max_model_len,
            min(s.default_max_tokens, s.max_tokens_limit), model_default,
            s.max_request_tokens // (len(prompts) * req.n * per_answer))

    def _check_length(self, prompt: Prompt, max_tokens: int) -> None:
        n, limit = len(prompt.ids), self.settings.max_prompt_tokens
        if n > limit:
            raise APIError(400, f"prompt has {n} tokens; this server accepts at most {limit}",
                           param="messages", code="context_length_exceeded")
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
                           f"the per-request budget is {self.settings.max_request_tokens}",
                           param="max_tokens", code="token_budget_exceeded")

    async def _objective(self, a: AlignmentBase | None, strategy: Strategy) -> Objective | None:
        if a is None:
            return None
        if a.n > self.settings.max_n:
            raise APIError(400, f"alignment.n {a.n} exceeds this server's limit "
                           f"{self.settings.max_n}", param="alignment.n", code="invalid_value")
        names = resolve_objective(a, self.dual, self.settings.default_reward
                                  if strategy.needs_objective else None)
        if names.reward is None:
            return None
        reward = await self._scorer(names.reward, "alignment.reward")
        cost = await self._scorer(names.cost, "alignment.cost") if names.cost else None
        return Objective(reward=reward, cost=cost, cost_weight=names.cost_weight)

    def _check_adapter_option(self, a: AlignmentBase | None, strategy: Strategy) -> None:
        """A strategy's `adapter_option` (aligner: `corrector`) must name a registered LoRA
        adapter; adapters registered since start-up count (the dict is shared with policies)."""
        option = strategy.adapter_option
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
        needs = strategy.value_protocol
        name = a.value if a else None
        if needs is None:
            if name is not None:
                raise APIError(400, f"alignment.value is not used by strategy {strategy.name!r}",
                               param="alignment.value", code="invalid_value")
            return None
        if name is None:
            if strategy.value_required:
                raise APIError(400, f"{strategy.name} needs alignment.value: {_KINDS[needs]}",
                               param="alignment.value", code="invalid_value")
            return None
        scorer = await self._scorer(name, "alignment.value")
        if not isinstance(scorer, needs):
            raise APIError(400, f"{strategy.name} needs {_KINDS[needs]}; {name} is "
                           f"{_describe(scorer)}", param="alignment.value", code="invalid_value")
        return scorer

    async def _scorer(self, name: str, param: str):
        try:
            return await self.rt.scorers.get(name)
        except UnknownScorer as exc:
            raise APIError(400, str(exc), param=param, code="unknown_scorer") from exc


def _per_answer(req, strategy: Strategy) -> int:
    """Worst-case generations of max_tokens per answer: alignment.n for selection strategies,
    else the strategy's `generations_per_answer` (aligner: draft + correction = 2)."""
    if req.alignment and strategy.needs_objective:
        return req.alignment.n
    return strategy.generations_per_answer if req.alignment else 1


def _value_warnings(value: Scorer | None, temperature: float, top_p: float) -> list[str]:
    """A value head knows the sampling settings its targets were computed at (valuenet): a
    CD-Q head's Q assumes continuations drawn from that same p, so at another temperature or
    top-p its tilt no longer targets π* ∝ p·exp(λ·Q). Say so in the answer."""
    check = getattr(value, "warnings_for", None)
    return list(check(temperature, top_p)) if check is not None else []


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
    if strategy.needs_objective and a.n > 1:
        raise APIError(400, f"{strategy.name} draws alignment.n = {a.n} candidates, which are "
                       "identical at temperature 0 (greedy); use temperature > 0 or "
                       "alignment.n 1", param="temperature", code="invalid_value")
    if strategy.needs_sampling:
        raise APIError(400, f"{strategy.name} samples from a tilted policy and needs "
                       "temperature > 0", param="temperature", code="invalid_value")


# What each value protocol means, for error messages (most specific first for `_describe`).
_KINDS = {QScorer: "a CD-Q value head (value:NAME trained as CD-Q)",
          TokenScorer: "a value head", Scorer: "a scorer"}


def _describe(scorer: Scorer) -> str:
    if isinstance(scorer, QScorer):
        return "a CD-Q head"
    if isinstance(scorer, TokenScorer):
        return "a FUDGE head (prefix values only, no per-token Q values)"
    return "a text scorer"
