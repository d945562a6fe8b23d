"""The serving objects: one per endpoint, each owning `create()` end to end.

preset (server/presets.py) → admit (429) → resolve (every 4xx, server/serving/resolve.py) →
policy lease → the strategy's
run, or its stream (server/serving/core.py) → the response body (server/serving/render.py).
The endpoints differ only in how a prompt becomes token ids and how the answer is rendered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import cast

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from ..errors import APIError
from ..protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from . import render
from .core import ServingCore
from .data import Kind, Prompt
from .ticket import Ticket


async def create_answer(core: ServingCore, kind: Kind, prompts_of: Callable,
                        render_response: Callable, body, request: Request, response: Response):
    """What both endpoints do: resolve, admit, then stream or run and render."""
    body, preset = core.resolver.with_preset(body)
    with Ticket(core, request, body.alignment.strategy if body.alignment else "none") as t:
        rr = await core.resolve(body, kind, prompts_of, preset)
        await t.start(rr, response)
        if rr.stream:
            return t.stream(rr)
        answers = await t.run(core.answers(rr))
        if answers is None:
            return Response(status_code=499)  # nobody is listening; engine work aborted
        return render_response(rr, answers, t.finish(rr, answers), rr.model, core.token_text)


class ChatServing:
    """POST /v1/chat/completions."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def prompts(self, req: ChatCompletionRequest) -> list[Prompt]:
        return chat_prompt(self.core.rt.engine.tokenizer, req)

    async def create(self, body: ChatCompletionRequest, request: Request, response: Response
                     ) -> ChatCompletionResponse | StreamingResponse | Response:
        return await create_answer(self.core, "chat", self.prompts, render.chat_response,
                                   body, request, response)


class CompletionServing:
    """POST /v1/completions."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def prompts(self, req: CompletionRequest) -> list[Prompt]:
        return text_prompts(self.core.rt.engine.tokenizer, req)

    async def create(self, body: CompletionRequest, request: Request, response: Response
                     ) -> CompletionResponse | StreamingResponse | Response:
        return await create_answer(self.core, "completions", self.prompts,
                                   render.completion_response, body, request, response)


def chat_prompt(tok, req: ChatCompletionRequest) -> list[Prompt]:
    """The model's chat template over the messages; scorers see the last user message.

    As vLLM: `chat_template_kwargs` and `reasoning_effort` become template variables;
    `continue_final_message` renders the last (assistant) message open, so the answer continues
    it (assistant prefill) and only the continuation is generated, returned and KL-accounted."""
    messages = [_template_message(m) for m in req.messages]
    extra = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        extra["reasoning_effort"] = req.reasoning_effort
    if req.tools and req.tool_choice != "none":  # as vLLM: the template decides how to show them
        extra["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
    try:
        text = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, **extra)
    except Exception as exc:  # the template itself may reject role orders (jinja raise)
        raise APIError(400, f"messages rejected by the chat template: {exc}",
                       param="messages", code="invalid_messages") from exc
    users = [m.text() for m in req.messages if m.role == "user"]
    scorer_text = users[-1] if users else req.messages[-1].text()
    return [Prompt(tok.encode(text, add_special_tokens=False), scorer_text)]


def _template_message(m) -> dict:
    """A message as HF chat templates take it (tool calls with their arguments as dicts)."""
    out = {"role": m.role, "content": m.text()}
    if m.name:
        out["name"] = m.name
    if getattr(m, "tool_call_id", None) is not None:
        out["tool_call_id"] = m.tool_call_id
    if getattr(m, "tool_calls", None):
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in m.tool_calls]
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def text_prompts(tok, req: CompletionRequest) -> list[Prompt]:
    """One prompt per item of `prompt` (a string, token ids, or a batch of either)."""
    p = req.prompt
    # one string or one id list (the first item tells which) is a batch of one
    batch = cast("list[str | list[int]]",
                 [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p)
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
