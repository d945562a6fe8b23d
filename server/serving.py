"""Serving object for /v1/chat/completions and /v1/completions.

Data flow: validated pydantic request → `Prepared` (token prompts, sampling, strategy and
objective resolved against the registries; every limit checked here, at the edge) → one
`DecodeRequest` per (prompt, choice), run concurrently by the chosen strategy → OpenAI response
(or SSE chunks) with the `alignment` accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from decoding.concurrency import gather_all
from decoding.protocols import (
    DecodeRequest,
    DecodeResult,
    Objective,
    QScorer,
    Sample,
    Sampling,
    Scorer,
    TokenScorer,
)
from decoding.seeds import choice_seed
from decoding.strategies import STRATEGIES, Strategy
from runtime.protocols import Runtime
from runtime.scorers import UnknownScorer

from . import tracing
from .constraint import load_dual
from .constraint import resolve as resolve_objective
from .errors import APIError
from .fields import check_fields, default_max_tokens, sampling_fields, wants_logprobs
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .metrics import Metrics
from .protocol import (
    Alignment,
    AlignmentInfo,
    Candidate,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Latency,
    Usage,
)
from .settings import Settings
from .streaming import StreamingMixin
from .streaming import finish_reason as _finish
from .tracing import current_request_id

Kind = Literal["chat", "text"]


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what scorers see
    echo: str = ""  # completions: the prompt as text (what `echo` prepends)


@dataclass
class Prepared:
    kind: Kind
    prompts: list[Prompt]
    sampling: Sampling
    choices: int
    strategy: Strategy
    alignment: Alignment | None
    objective: Objective | None
    stream: bool
    include_usage: bool
    value: Scorer | None = None  # controlled decoding's value function (alignment.value)
    warnings: list[str] = field(default_factory=list)  # reported as alignment.warnings
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    logprobs: bool = False  # report the answer's token log-probs (OpenAI `logprobs`)
    model: str = ""  # the served model or LoRA adapter answering (a metrics label)
    policy: str = ""  # the policy that answers (set once its lease is held)
    echo: bool = False  # completions: the prompt text precedes the answer

    @property
    def strategy_name(self) -> str:
        return self.strategy.name


@dataclass
class Answer:
    index: int  # OpenAI choice index: prompt_index * choices + choice
    prompt: Prompt
    result: DecodeResult


class Admission:
    """Bounded concurrency: over the limit, answer 429 at once instead of queueing without end.
    A stream holds its slot until its last event, so `wait_idle` (used by the drain) returns
    only when every admitted request has finished."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit, self.active, self.retry_after_s = limit, 0, retry_after_s
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise APIError(429, f"server busy: {self.limit} requests in flight; retry shortly",
                           type="rate_limit_error", code="too_many_requests",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class CompletionService(StreamingMixin):
    def __init__(self, settings: Settings, runtime: Runtime, metrics: Metrics) -> None:
        self.settings, self.rt, self.metrics = settings, runtime, metrics
        self.admission = Admission(settings.max_concurrent_requests, settings.retry_after_s)
        self.dual = load_dual(settings.dual)  # CAN's λ* for cost_weight "auto" (or None)
        self._token_text: TokenText | None = None  # token strings for logprobs (lazy)

    # ---------------------------------------------------------------- validation at the edge

    async def prepare(self, req: ChatCompletionRequest | CompletionRequest, kind: Kind) -> Prepared:
        s = self.settings
        adapter = req.model if req.model in self.rt.adapters else None
        if req.model is not None and req.model != self.rt.model_name and adapter is None:
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves "
                           f"{self.rt.model_name!r}", type="not_found_error", param="model",
                           code="model_not_found")
        if req.n > s.max_choices:
            raise APIError(400, f"n {req.n} exceeds this server's limit {s.max_choices}",
                           param="n", code="invalid_value")
        strategy_name = req.alignment.strategy if req.alignment else "none"
        check_fields(req, strategy_name)  # tools, unknown fields, fields the strategy refuses
        prompts = self._chat_prompt(req) if kind == "chat" else self._text_prompts(req)
        strategy, objective = await self._alignment(req.alignment)
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
        return Prepared(
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

    def _max_tokens(self, req, strategy: Strategy, prompts: list[Prompt]) -> int:
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

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[Prompt]:
        tok = self.rt.engine.tokenizer
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template itself may reject role orders (jinja raise)
            raise APIError(400, f"messages rejected by the chat template: {exc}",
                           param="messages", code="invalid_messages") from exc
        users = [m.text() for m in req.messages if m.role == "user"]
        scorer_text = users[-1] if users else req.messages[-1].text()
        return [Prompt(tok.encode(text, add_special_tokens=False), scorer_text)]

    def _text_prompts(self, req: CompletionRequest) -> list[Prompt]:
        tok, p = self.rt.engine.tokenizer, req.prompt
        batch = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        vocab = len(tok)
        out = []
        for item in batch:
            if isinstance(item, str):
                out.append(Prompt(tok.encode(item, add_special_tokens=True), item, item))
            else:
                if any(t < 0 or t >= vocab for t in item):
                    raise APIError(400, f"prompt token ids must lie in [0, {vocab})",
                                   param="prompt", code="invalid_value")
                text = tok.decode(item)
                out.append(Prompt(list(item), text, text))
        return out

    def _check_length(self, prompt: Prompt, max_tokens: int) -> None:
        n, limit = len(prompt.ids), self.settings.max_prompt_tokens
        if n > limit:
            raise APIError(400, f"prompt has {n} tokens; this server accepts at most {limit}",
                           param="messages", code="context_length_exceeded")
        if n + max_tokens > self.rt.engine.max_model_len:
            raise APIError(400, f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the "
                           f"model's context length {self.rt.engine.max_model_len}",
                           param="max_tokens", code="context_length_exceeded")

    def _check_budget(self, req, strategy: Strategy, prompts: int, max_tokens: int) -> None:
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

    async def _alignment(self, a: Alignment | None) -> tuple[Strategy, Objective | None]:
        if a is None:
            return STRATEGIES["none"], None
        strategy = STRATEGIES.get(a.strategy)
        if strategy is None:
            raise APIError(400, f"unknown alignment strategy {a.strategy!r}; available: "
                           f"{', '.join(sorted(STRATEGIES))}", param="alignment.strategy",
                           code="unknown_strategy")
        if a.n > self.settings.max_n:
            raise APIError(400, f"alignment.n {a.n} exceeds this server's limit "
                           f"{self.settings.max_n}", param="alignment.n", code="invalid_value")
        names = resolve_objective(a, self.dual, self.settings.default_reward
                                  if strategy.needs_objective else None)
        if names.reward is None:
            return strategy, None
        reward = await self._scorer(names.reward, "alignment.reward")
        cost = await self._scorer(names.cost, "alignment.cost") if names.cost else None
        return strategy, Objective(reward=reward, cost=cost, cost_weight=names.cost_weight)

    def _check_adapter_option(self, a: Alignment | None, strategy: Strategy) -> None:
        """A strategy's `adapter_option` (aligner: `corrector`) must name a registered LoRA
        adapter; adapters registered since start-up count (the dict is shared with policies)."""
        option = getattr(strategy, "adapter_option", None)
        if option is None or a is None:
            return
        name = getattr(a, option, None)
        if name not in self.rt.adapters:
            known = ", ".join(sorted(self.rt.adapters)) or "none (register one through "\
                "/admin/policies on a server started with --enable-lora true)"
            raise APIError(400, f"{strategy.name} needs alignment.{option}: a registered LoRA "
                           f"adapter; {name!r} is not one. Registered: {known}",
                           param=f"alignment.{option}", code="unknown_adapter")

    async def _value(self, a: Alignment | None, strategy: Strategy) -> Scorer | None:
        """Resolve `alignment.value` against the scorer registry and check that it is the kind
        of value the strategy needs (its `value_protocol`: tokenwise CD needs a CD-Q head)."""
        needs = getattr(strategy, "value_protocol", None)
        name = a.value if a else None
        if needs is None:
            if name is not None:
                raise APIError(400, f"alignment.value is not used by strategy {strategy.name!r}",
                               param="alignment.value", code="invalid_value")
            return None
        if name is None:
            if getattr(strategy, "value_required", False):
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

    # ---------------------------------------------------------------- running strategies

    def _decode_requests(self, prep: Prepared) -> list[tuple[int, Prompt, DecodeRequest]]:
        a = prep.alignment
        # each choice's first engine call draws `children` samples (seeds seed + index)
        children = a.n if a and prep.strategy.needs_objective else 1
        out = []
        for pi, prompt in enumerate(prep.prompts):
            for c in range(prep.choices):
                seed = choice_seed(prep.sampling.seed, c, children)
                sampling = Sampling(**{**prep.sampling.__dict__, "seed": seed})
                out.append((pi * prep.choices + c, prompt, DecodeRequest(
                    prompt_ids=prompt.ids, prompt_text=prompt.text, sampling=sampling,
                    n=a.n if a else 1,
                    objective=prep.objective, temperature=a.temperature if a else 1.0,
                    return_candidates=bool(a and a.return_candidates), seed=seed,
                    options=a.options() if a else {}, value=prep.value)))
        return out

    async def answers(self, prep: Prepared,
                      emit: Callable[[int, str], None] | None = None) -> list[Answer]:
        """Run every (prompt, choice) concurrently; one failure cancels the rest. `emit(index,
        piece)` receives the text that `streams_text` strategies commit along the way."""
        jobs = self._decode_requests(prep)
        if emit is not None:
            for index, _, dr in jobs:
                dr.emit = functools.partial(emit, index)
        results = await gather_all(prep.strategy.run(dr, self.rt.ctx) for _, _, dr in jobs)
        answers = [Answer(i, p, r) for (i, p, _), r in zip(jobs, results)]
        for a in answers:
            self.metrics.observe_answer(prep.strategy_name, a.result)
        return answers

    # ---------------------------------------------------------------- responses

    def response(self, prep: Prepared, answers: list[Answer], total_s: float):
        infos = [self._info(prep, a.result, total_s) for a in answers]
        usage = self._usage(prep, answers)
        top = _aggregate(infos)
        if prep.kind == "chat":
            choices = [ChatChoice(index=a.index, message=ChatMessageOut(content=a.result.sample.text),
                                  logprobs=self.logprobs(prep, a.result.sample),
                                  finish_reason=_finish(a), alignment=info)
                       for a, info in zip(answers, infos)]
            return ChatCompletionResponse(id=f"chatcmpl-{prep.request_id}",
                                          model=self.rt.model_name, choices=choices,
                                          usage=usage, alignment=top)
        choices = [CompletionChoice(index=a.index, text=self.echoed(prep, a) + a.result.sample.text,
                                    logprobs=self.logprobs(prep, a.result.sample,
                                                           len(self.echoed(prep, a))),
                                    finish_reason=_finish(a), alignment=info)
                   for a, info in zip(answers, infos)]
        return CompletionResponse(id=f"cmpl-{prep.request_id}", model=self.rt.model_name,
                                  choices=choices, usage=usage, alignment=top)

    def echoed(self, prep: Prepared, a: Answer) -> str:
        """completions `echo`: the prompt's text before the answer."""
        return a.prompt.echo if prep.echo else ""

    def logprobs(self, prep: Prepared, sample: Sample, offset: int = 0, start: int = 0):
        """OpenAI `logprobs` of `sample`'s tokens from `start` on (None unless requested)."""
        if not prep.logprobs:
            return None
        if self._token_text is None:
            self._token_text = TokenText(self.rt.engine.tokenizer)
        k, ids = prep.sampling.top_logprobs, sample.token_ids[start:]
        top = sample.top_logprobs[start:] if sample.top_logprobs else None
        lps = sample.logprobs[start:]
        if prep.kind == "chat":
            return chat_logprobs(self._token_text, ids, lps, top, k)
        return completion_logprobs(self._token_text, ids, lps, top, k, offset)

    def note_answers(self, prep: Prepared, answers: list[Answer]) -> None:
        """What the access log line reports about the answers (server/tracing.py)."""
        record = tracing.current()
        if record is None:
            return
        usage = self._usage(prep, answers)
        record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        record.generated_tokens = sum(a.result.generated_tokens for a in answers)
        record.generate_s = sum(a.result.timer.generate_s for a in answers)
        record.score_s = sum(a.result.timer.score_s for a in answers)

    def _info(self, prep: Prepared, r: DecodeResult, total_s: float) -> AlignmentInfo | None:
        if prep.alignment is None:
            return None
        candidates = None
        if r.candidates is not None:
            candidates = [Candidate(text=c.sample.text, reward=c.reward, cost=c.cost,
                                    tokens=len(c.sample.token_ids), logprob=c.sample.logprob,
                                    finish_reason=c.sample.finish_reason,
                                    token_ids=c.sample.token_ids,
                                    logprobs=c.sample.logprobs if prep.logprobs else None)
                          for c in r.candidates]
        return AlignmentInfo(
            strategy=r.strategy, n=r.n, reward=r.reward, cost=r.cost, kl_bound=r.kl_bound,
            kl_estimate=r.kl_estimate, win_rate_bound=r.win_rate_bound,
            generated_tokens=r.generated_tokens, scored_candidates=r.scored_candidates,
            latency=Latency(generate_s=r.timer.generate_s, score_s=r.timer.score_s,
                            total_s=total_s),
            cost_weight=prep.objective.cost_weight if prep.objective and prep.objective.cost
            else None,
            candidates=candidates, warnings=[*prep.warnings, *r.warnings] or None, **r.extra)

    def _usage(self, prep: Prepared, answers: list[Answer]) -> Usage:
        prompt = sum(len(p.ids) for p in prep.prompts)
        completion = sum(len(a.result.sample.token_ids) for a in answers)
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


def _per_answer(req, strategy: Strategy) -> int:
    """Worst-case generations of max_tokens per answer: alignment.n for selection strategies,
    else the strategy's `generations_per_answer` (aligner: draft + correction = 2), else 1."""
    if req.alignment and strategy.needs_objective:
        return req.alignment.n
    return getattr(strategy, "generations_per_answer", 1) if req.alignment else 1


def _value_warnings(value: Scorer | None, temperature: float, top_p: float) -> list[str]:
    """A value head knows the sampling settings its targets were computed at (valuenet): a
    CD-Q head's Q assumes continuations drawn from that same p, so at another temperature or
    top-p its tilt no longer targets π* ∝ p·exp(λ·Q). Say so in the answer."""
    check = getattr(value, "warnings_for", None)
    return list(check(temperature, top_p)) if check is not None else []


# vLLM samples greedily below this temperature (vllm.sampling_params._SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5


def _check_greedy(req, strategy: Strategy) -> None:
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
    if getattr(strategy, "needs_sampling", False):
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


def _aggregate(infos: list[AlignmentInfo | None]) -> AlignmentInfo | None:
    """Top-level `alignment`: the answer's own for one choice; with several, choice 0's fields
    with generated_tokens, scored_candidates and latency totalled over all choices."""
    if not infos or infos[0] is None:
        return None
    if len(infos) == 1:
        return infos[0]
    top = infos[0].model_copy(deep=True)
    top.generated_tokens = sum(i.generated_tokens for i in infos)
    top.scored_candidates = sum(i.scored_candidates for i in infos)
    top.latency.generate_s = sum(i.latency.generate_s for i in infos)
    top.latency.score_s = sum(i.latency.score_s for i in infos)
    top.candidates = None
    return top
