"""The answer of POST /v1/responses: the `response` object and the Responses event stream.

Both are rendered from what the chat path produced (server/serving/responses.py translates the
request): the non-streamed answer from the chosen `Answer` (its text parsed into tool calls by
the chat path's own `render.answer_message`), the stream chunk by chunk from the chat stream,
the way a proxy would. Output items, in order: a `message` item when the answer has text (or
nothing else), then one `function_call` item per tool call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..logprobs import TokenText
from ..observability.request_ids import current_request_id
from ..protocol import (
    AlignmentInfo,
    ResponseObject,
    ResponsesError,
    ResponsesFunctionCall,
    ResponsesFunctionTool,
    ResponsesIncomplete,
    ResponsesOutputMessage,
    ResponsesOutputText,
    ResponsesRequest,
    ResponsesUsage,
)
from . import render
from .data import Answer, ResolvedRequest

Item = ResponsesOutputMessage | ResponsesFunctionCall


@dataclass(frozen=True)
class Head:
    """What a response repeats from its request (the same in every stream event)."""

    id: str
    hexid: str
    model: str
    echo: dict
    tools_live: bool = False  # the answer may be tool calls: a stream opens its items lazily

    @classmethod
    def of(cls, body: ResponsesRequest, served: str, tools: list[ResponsesFunctionTool],
           tools_live: bool) -> Head:
        hexid = current_request_id() or uuid.uuid4().hex
        fmt = body.text.format if body.text is not None else None
        echo = {"instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                "temperature": body.temperature, "top_p": body.top_p, "user": body.user,
                "metadata": body.metadata or {}, "tool_choice": body.tool_choice or "auto",
                "tools": [t.echo() for t in tools],
                "parallel_tool_calls": body.parallel_tool_calls is not False,
                "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                         if fmt else {"type": "text"}}}
        return cls(f"resp_{hexid}", hexid, body.model or served, echo, tools_live)

    @property
    def message_id(self) -> str:
        return f"msg_{self.hexid}"

    def response(self, status: str, output: list[Item] | None = None,
                 usage: ResponsesUsage | None = None, alignment: AlignmentInfo | None = None,
                 error: ResponsesError | None = None) -> ResponseObject:
        return ResponseObject(
            id=self.id, status=status, model=self.model, output=output or [], usage=usage,
            alignment=alignment, error=error,
            incomplete_details=(ResponsesIncomplete(reason="max_output_tokens")
                                if status == "incomplete" else None), **self.echo)

    def message(self, status: str, text: str | None) -> ResponsesOutputMessage:
        content = [] if text is None else [ResponsesOutputText(text=text)]
        return ResponsesOutputMessage(id=self.message_id, status=status, content=content)

    def function_call(self, index: int, call: dict, status: str = "completed"
                      ) -> ResponsesFunctionCall:
        """Output item of chat's tool call `call` (its `id` is the item's `call_id`)."""
        return ResponsesFunctionCall(id=f"fc_{self.hexid}_{index}", call_id=call["id"],
                                     name=call["function"]["name"],
                                     arguments=call["function"]["arguments"], status=status)

    def items(self, status: str, content: str | None, calls: list[dict]) -> list[Item]:
        """The output items of an answer: its text (if any, or if there is nothing else),
        then its calls."""
        out: list[Item] = [self.message(status, content or "")] if content or not calls else []
        return [*out, *(self.function_call(i, c) for i, c in enumerate(calls))]


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _usage(u: dict) -> ResponsesUsage:
    return ResponsesUsage(input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"],
                          total_tokens=u["total_tokens"])


def response_object(head: Head, rr: ResolvedRequest, answers: list[Answer], total_s: float,
                    model: str, text: TokenText) -> ResponseObject:
    """The non-streamed answer (`endpoints.create_answer`'s renderer; one choice: no `n` here)."""
    (a,) = answers
    content, calls, finish = render.answer_message(rr, a)  # tool calls parsed as on chat
    head = dataclasses.replace(head, model=model)  # the preset or adapter that answered
    status = _status(finish)
    return head.response(status, head.items(status, content, calls),
                         _usage(render.usage(rr, answers).model_dump()),
                         render.alignment_info(rr, a.result, total_s))


# ---------------------------------------------------------------- the event stream


class _Events:
    """Numbers and renders the events of one stream (`sequence_number` from 0), and tracks
    its output items: the open message (if any) and those already done."""

    def __init__(self, head: Head) -> None:
        self.head, self.seq = head, 0
        self.done: list[Item] = []
        self.parts: list[str] | None = None  # the open message's text so far
        self.at = 0  # the open message's output_index

    def __call__(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n"

    def where(self) -> dict:
        return {"item_id": self.head.message_id, "output_index": self.at, "content_index": 0}

    def open_message(self) -> list[str]:
        self.parts, self.at = [], len(self.done)
        return [self("response.output_item.added", output_index=self.at,
                     item=self.head.message("in_progress", None).model_dump()),
                self("response.content_part.added", part=_part(""), **self.where())]

    def text(self, delta: str) -> list[str]:
        out = self.open_message() if self.parts is None else []
        assert self.parts is not None
        self.parts.append(delta)
        return [*out, self("response.output_text.delta", delta=delta, logprobs=[],
                           **self.where())]

    def close_message(self, status: str) -> list[str]:
        if self.parts is None:
            return []
        text, self.parts = "".join(self.parts), None
        item = self.head.message(status, text)
        self.done.append(item)
        return [self("response.output_text.done", text=text, logprobs=[], **self.where()),
                self("response.content_part.done", part=_part(text), **self.where()),
                self("response.output_item.done", output_index=self.at, item=item.model_dump())]

    def calls(self, calls: list[dict]) -> list[str]:
        """Chat's tool-call delta (whole calls, at the answer's end) as function_call items:
        added (empty arguments), the arguments as one delta, their done, the item's done."""
        out = self.close_message("completed") if calls else []
        for call in calls:
            at = len(self.done)
            item = self.head.function_call(call.get("index", at), call)
            where = {"item_id": item.id, "output_index": at}
            opening = item.model_copy(update={"arguments": "", "status": "in_progress"})
            out += [self("response.output_item.added", output_index=at,
                         item=opening.model_dump()),
                    self("response.function_call_arguments.delta", delta=item.arguments,
                         **where),
                    self("response.function_call_arguments.done", arguments=item.arguments,
                         name=item.name, **where),
                    self("response.output_item.done", output_index=at, item=item.model_dump())]
            self.done.append(item)
        return out


def _part(text: str) -> dict:
    return ResponsesOutputText(text=text).model_dump()


async def stream_events(head: Head, chat_events: Any) -> AsyncIterator[str]:
    """The Responses event sequence, translated from the chat stream's chunks. Closing this
    generator (client gone) closes the chat stream, which aborts the engine work.

    Without tools the message item opens at once (clients see it while an aligned strategy
    chooses); with tools the answer may be function calls only, so items open as their first
    content arrives (chat streams a tool-call answer as one delta at its end)."""
    event = _Events(head)
    finish = alignment = usage = error = None
    yield event("response.created", response=head.response("in_progress").model_dump())
    yield event("response.in_progress", response=head.response("in_progress").model_dump())
    if not head.tools_live:
        for e in event.open_message():
            yield e
    async with contextlib.aclosing(chat_events) as chunks:  # StreamingResponse.body_iterator
        async for raw in chunks:
            chunk = raw.decode() if isinstance(raw, bytes) else raw
            if not chunk.startswith("data: "):
                yield chunk  # a keep-alive comment: proxies see traffic, clients skip it
                continue
            data = chunk[len("data: "):].strip()
            if data == "[DONE]":
                continue
            obj = json.loads(data)
            if "error" in obj:
                error = obj["error"]
                continue
            usage = obj.get("usage") or usage
            for choice in obj.get("choices", ()):
                delta = choice["delta"]
                for e in [*(event.text(delta["content"]) if delta.get("content") else ()),
                          *event.calls(delta.get("tool_calls") or [])]:
                    yield e
                finish = choice.get("finish_reason") or finish
                alignment = choice.get("alignment") or alignment
    if error is not None:  # reported in-band by the chat path once the headers were sent
        yield event("error", code=error.get("code") or error.get("type"),
                    message=error.get("message", ""), param=error.get("param"))
        failed = ResponsesError(code=error.get("code") or "server_error",
                                message=error.get("message", ""))
        yield event("response.failed",
                    response=head.response("failed", error=failed).model_dump())
        return
    if finish is None:  # the chat stream stopped short: its client is gone, nobody listens
        return
    status = _status(finish)
    ending = event.open_message() if not event.done and event.parts is None else []
    for e in [*ending, *event.close_message(status)]:  # an empty answer: an empty message
        yield e
    final = head.response(status, event.done, alignment=(AlignmentInfo.model_validate(alignment)
                                                          if alignment else None),
                          usage=_usage(usage) if usage else None)
    yield event("response.completed" if status == "completed" else "response.incomplete",
                response=final.model_dump())
