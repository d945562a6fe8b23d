"""POST /v1/responses (OpenAI's Responses API: text and function tools) on the chat path.

A Responses request is translated into a `ChatCompletionRequest` (`instructions` → a system
message, `input` items → messages (`function_call` → an assistant message's tool call,
`function_call_output` → a `tool` message), function `tools` and `tool_choice` → chat's,
`max_output_tokens` → `max_completion_tokens`, `text.format` → `response_format`, `alignment`
as it came) and run by the chat endpoint's own machinery (`endpoints.create_answer`: Ticket,
resolve, admission, policy lease, presets, limits, tool plans, disconnects), so tool calls are
constrained and parsed exactly as on chat (server/tools.py). Only the answer is rendered
differently (responses_events.py): a `response` object, or the Responses event stream
translated chunk by chunk from the chat stream, the way a proxy would (one streaming
implementation to keep correct, so keep-alives, in-band errors and aborts on disconnect behave
exactly as on chat). Errors of the chat path name the Responses field (`renamed`).

Nothing is stored. Fields that need storage (`previous_response_id`, `conversation`,
`background`), hosted tools, reasoning controls and the rest of `REFUSED` are refused by name;
the few accepted without effect are those that cannot change the answer (docs/responses.md).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from ..errors import APIError
from ..protocol import (
    ChatCompletionRequest,
    ResponseObject,
    ResponsesFunctionCallItem,
    ResponsesFunctionCallOutputItem,
    ResponsesFunctionTool,
    ResponsesInputMessage,
    ResponsesRequest,
    ResponsesToolChoiceFunction,
)
from .core import ServingCore
from .endpoints import ChatServing, create_answer
from .responses_events import Head, response_object, stream_events


def _set(value: Any) -> bool:
    return value is not None


# field -> (does this value ask for something not honoured?, why it is refused)
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "previous_response_id": (_set, "nothing is stored on this server, so there is no earlier "
                             "response to continue; send the whole conversation in `input`"),
    "conversation": (_set, "nothing is stored on this server; send the conversation in `input`"),
    "background": (bool, "background responses are polled from storage, and nothing is stored "
                   "here; omit it (the answer comes in the request)"),
    "background_options": (_set, "background responses are not supported (nothing is stored)"),
    "prompt": (_set, "stored prompt templates are not supported; send the text in `input`"),
    "include": (bool, "no extra output data is available (no hosted tools, no reasoning items, "
                "no log-probabilities on /v1/responses yet)"),
    "top_logprobs": (bool, "log-probabilities are not returned on /v1/responses yet; use "
                     "/v1/chat/completions with logprobs"),
    # reasoning.effort reaches the chat template as chat's `reasoning_effort` (as vLLM does);
    # summaries of reasoning are not produced
    "reasoning": (lambda r: r is not None and any((r.summary, r.generate_summary)),
                  "reasoning summaries are not produced by this server"),
    "truncation": (lambda v: v not in (None, "disabled"), "only 'disabled': this server never "
                   "drops input items; shorten `input` instead"),
    "context_management": (_set, "server-side context compaction is not supported"),
    "access_programs": (_set, "not supported by this server"),
    "image": (_set, "image options are not supported: text only"),
    "moderation": (_set, "moderation is not run by this server"),
}

# Parameters named by the chat path, as a Responses client knows them.
_PARAMS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
           "messages": "input", "response_format": "text.format",
           "reasoning_effort": "reasoning.effort"}
_WORDS = re.compile(r"\b(" + "|".join(_PARAMS) + r")\b")
_TEXT_PARTS = ("input_text", "output_text", "refusal")


class ResponsesServing:
    """POST /v1/responses."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core
        self.chat = ChatServing(core)  # the chat template renders the translated messages

    async def create(self, body: ResponsesRequest, request: Request, response: Response
                     ) -> ResponseObject | StreamingResponse | Response:
        check_refused(body)
        tools = function_tools(body)
        chat, origins = to_chat(body, tools)
        head = Head.of(body, self.core.rt.model_name, tools,
                       tools_live=bool(chat.tools) and chat.tool_choice != "none")
        try:
            out = await create_answer(self.core, "chat", self.chat.prompts,
                                      functools.partial(response_object, head), chat, request,
                                      response)
        except APIError as err:
            raise renamed(err, origins) from None
        if isinstance(out, StreamingResponse):
            out.body_iterator = stream_events(head, out.body_iterator)
        return out


# ---------------------------------------------------------------- request → chat request


def check_refused(body: ResponsesRequest) -> None:
    """400 naming the first field asking for something this server does not do."""
    for name, (asks, why) in REFUSED.items():
        if asks(getattr(body, name)):
            raise APIError(400, f"{name} is not supported: {why}", param=name,
                           code="unsupported_field")
    for i, tool in enumerate(body.tools or ()):
        kind = tool.get("type")
        if kind == "function":
            continue
        why = ("custom (free-form) tools are not supported: declare a function tool" if
               kind == "custom" else f"built-in tool {kind!r} is not supported: this server "
               "runs no hosted tools; declare a function tool and run it yourself")
        raise APIError(400, f"tools[{i}].type: {why}", param=f"tools[{i}].type",
                       code="unsupported_field")
    if body.stream_options is not None and body.stream_options.include_obfuscation:
        raise APIError(400, "stream_options.include_obfuscation is not supported: events carry "
                       "no obfuscation padding; set it to false",
                       param="stream_options.include_obfuscation", code="unsupported_field")
    if body.text is not None and body.text.verbosity not in (None, "medium"):
        raise APIError(400, "text.verbosity: only 'medium' (the model's own length)",
                       param="text.verbosity", code="unsupported_field")


def function_tools(body: ResponsesRequest) -> list[ResponsesFunctionTool]:
    """`tools`, validated (check_refused let only function tools through)."""
    return [_validated(ResponsesFunctionTool, tool, f"tools[{i}]")
            for i, tool in enumerate(body.tools or ())]


def chat_tool_choice(body: ResponsesRequest, tools: list) -> Any:
    """`tool_choice` as chat's. `auto` without tools means nothing (OpenAI's default): unset."""
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        if choice not in (None, "none", "auto", "required"):
            raise APIError(400, f"tool_choice: {choice!r} is not one of 'none', 'auto', "
                           "'required' or {\"type\": \"function\", \"name\": ...}",
                           param="tool_choice", code="invalid_value")
        return None if choice == "auto" and not tools else choice
    kind = choice.get("type")
    if kind != "function":
        why = ("allowed_tools is not supported: declare only the allowed tools in `tools`"
               if kind == "allowed_tools" else f"{kind!r} names a built-in tool, and this "
               "server runs none: name a function tool")
        raise APIError(400, f"tool_choice.type: {why}", param="tool_choice.type",
                       code="unsupported_value")
    named = _validated(ResponsesToolChoiceFunction, choice, "tool_choice")
    return {"type": "function", "function": {"name": named.name}}


def to_messages(body: ResponsesRequest) -> tuple[list[dict], list[str]]:
    """`instructions` and `input` as chat messages, with the Responses field each came from
    (`origins`, so the chat path's errors can name it)."""
    messages: list[dict] = []
    origins: list[str] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
        origins.append("instructions")
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        origins.append("input")
    for i, item in enumerate(body.input if isinstance(body.input, list) else ()):
        kind = item.get("type", "message")
        add = _ITEMS.get(kind)
        if add is None:
            raise APIError(400, f"input[{i}]: items of type {kind!r} are not supported: "
                           f"only {', '.join(_ITEMS)}", param=f"input[{i}].type",
                           code="unsupported_field")
        add(item, f"input[{i}]", messages, origins)
    if not messages:
        raise APIError(400, "input: give `input` (a string or message items) or `instructions`",
                       param="input", code="invalid_value")
    return messages, origins


def _message_item(item: dict, where: str, messages: list[dict], origins: list[str]) -> None:
    content = item.get("content")
    _check_text_parts(content, f"{where}.content")
    message = _validated(ResponsesInputMessage, item, where)
    messages.append({"role": message.role, "content": message.text()})
    origins.append(where)


def _call_item(item: dict, where: str, messages: list[dict], origins: list[str]) -> None:
    """A call of an earlier answer. Calls right after an assistant message (its text, or
    the calls before them) join it: chat templates expect one assistant turn per answer."""
    call = _validated(ResponsesFunctionCallItem, item, where)
    chat_call = {"id": call.call_id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(chat_call)
        return
    messages.append({"role": "assistant", "content": None, "tool_calls": [chat_call]})
    origins.append(where)


def _call_output_item(item: dict, where: str, messages: list[dict], origins: list[str]) -> None:
    _check_text_parts(item.get("output"), f"{where}.output")
    result = _validated(ResponsesFunctionCallOutputItem, item, where)
    messages.append({"role": "tool", "tool_call_id": result.call_id, "content": result.text()})
    origins.append(where)


# input item type -> adds its chat message(s)
_ITEMS: dict[str, Callable[[dict, str, list[dict], list[str]], None]] = {
    "message": _message_item, "function_call": _call_item,
    "function_call_output": _call_output_item}


def _check_text_parts(parts: Any, where: str) -> None:
    for j, part in enumerate(parts if isinstance(parts, list) else ()):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype not in _TEXT_PARTS:
            raise APIError(400, f"{where}[{j}]: {ptype!r} parts are not supported: text only",
                           param=f"{where}[{j}].type", code="unsupported_field")


def _validated(model: Any, value: dict, where: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _invalid(exc, where) from None


def to_chat(body: ResponsesRequest, tools: list[ResponsesFunctionTool]
            ) -> tuple[ChatCompletionRequest, list[str]]:
    """The chat completion request that answers `body` (fields left unset stay unset), and
    each of its messages' origin (`to_messages`)."""
    stream = bool(body.stream)
    messages, origins = to_messages(body)
    fields = {
        "model": body.model, "messages": messages,
        "max_completion_tokens": body.max_output_tokens, "temperature": body.temperature,
        "top_p": body.top_p, "stream": stream,
        "reasoning_effort": body.reasoning.effort if body.reasoning is not None else None,
        "stream_options": {"include_usage": True} if stream else None,
        "response_format": _response_format(body), "metadata": body.metadata,
        "tools": [t.chat() for t in tools] or None,
        "tool_choice": chat_tool_choice(body, tools),
        "parallel_tool_calls": body.parallel_tool_calls,
        "user": body.user, "safety_identifier": body.safety_identifier,
        "prompt_cache_key": body.prompt_cache_key, "service_tier": body.service_tier,
        # only what the client set, so presets can fill the rest field by field
        "alignment": (body.alignment.model_dump(exclude_unset=True)
                      if body.alignment is not None else None),
    }
    try:
        chat = ChatCompletionRequest.model_validate(
            {k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise renamed(_invalid(exc, ""), origins) from None
    return chat, origins


def _response_format(body: ResponsesRequest) -> dict | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else {"type": fmt.type}
    if fmt.schema_ is None or not fmt.name:
        raise APIError(400, "text.format: json_schema needs `name` and `schema`",
                       param="text.format", code="invalid_value")
    schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description,
              "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items()
                                                   if v is not None}}


def _invalid(exc: ValidationError, prefix: str) -> APIError:
    first = exc.errors()[0]
    path = prefix
    for part in first.get("loc", ()):
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return APIError(400, f"{path}: {first.get('msg', 'invalid value')}", param=path or None,
                    code="invalid_value")


# A chat message's field, as its Responses input item names it.
_ITEM_FIELDS = {".tool_call_id": ".call_id"}
_ITEM_WORDS = {"tool message": "function_call_output item",
               "assistant message": "function_call item"}
# chat's nested tool fields, as the Responses API flattens them
_FLAT = ((re.compile(r"^tools\[(\d+)\]\.function\."), r"tools[\1]."),
         (re.compile(r"^tool_choice\.function\."), "tool_choice."))


def renamed(err: APIError, origins: list[str]) -> APIError:
    """An error of the chat path, naming the Responses field instead of the chat one
    (`origins`: the Responses field each chat message came from)."""
    if err.param is None:
        return err
    message = re.match(r"^messages\[(\d+)\](.*)$", err.param)
    if message is not None and int(message[1]) < len(origins):
        rest = message[2]
        err.param = origins[int(message[1])] + _ITEM_FIELDS.get(rest, rest)
        for chat, responses in _ITEM_WORDS.items():
            err.message = err.message.replace(chat, responses)
        return err
    for pattern, flat in _FLAT:
        err.param = pattern.sub(flat, err.param)
    head, _, rest = err.param.partition(".")
    if head in _PARAMS:
        err.param = _PARAMS[head] + (f".{rest}" if rest else "")
        err.message = _WORDS.sub(lambda m: _PARAMS[m.group(1)], err.message)
    return err
