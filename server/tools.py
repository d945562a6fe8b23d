"""Tool calling on chat: what a request's `tools`/`tool_choice` constrain, and how the chosen
answer becomes `tool_calls`.

As vLLM's OpenAI server does it:
- `required` and a named function are **structured outputs**: every candidate is generated under
  a JSON schema built from the tools (vLLM's own `get_json_schema_from_tools`, reached through
  runtime/tools.py): an array of `{"name", "parameters"}` for `required` (one item unless
  `parallel_tool_calls`), the function's parameters object for a named choice. This works with any
  model, the embedded one included.
- `auto` needs the server's tool-call parser (`--tool-call-parser NAME`, one of vLLM's), which
  reads the model's own tool-call syntax out of the answer; without one `auto` is refused (400),
  as vLLM refuses it without `--enable-auto-tool-choice`.
- `none` (or no tools): plain text.

Aligned strategies that generate each candidate as one engine request (best-of-n, soft best-of-n,
speculative rejection, nash) hold every candidate to the same schema and select among them; the
scorer sees a candidate's raw text (the JSON of its tool calls), and only the chosen answer is
parsed. Strategies that continue an answer across engine requests cannot hold a grammar across
continuations and refuse tools (server/fields.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .errors import APIError
from .protocol import ChatCompletionRequest, NamedToolChoice, ToolMessage

Mode = Literal["required", "named", "auto"]


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask of the answer: its mode and, for required/named, the schema
    every candidate is generated under."""

    mode: Mode
    tools: list[dict[str, Any]]  # OpenAI tool objects, as sent (the chat template gets them)
    schema: dict[str, Any] | None = None
    function: str | None = None  # named choice
    parse_auto: Callable | None = None  # auto: vLLM's parser (runtime/tools.py ParseAuto)

    @property
    def structured(self) -> tuple[str, str] | None:
        """`Sampling.structured` for the engine (json_schema; compact JSON, runtime/engine.py),
        or None for auto."""
        return None if self.schema is None else ("json_schema", json.dumps(self.schema))

    def message(self, text: str, finish_reason: str) -> tuple[str | None, list[dict], str]:
        """(content, tool_calls, finish_reason) of an answer's text: OpenAI's `tool_calls`
        finish reason when it parsed into calls."""
        content, calls = tool_calls(self, text)
        return content, calls, "tool_calls" if calls else finish_reason


def plan(req: ChatCompletionRequest, schema_of, parse_auto=None) -> ToolPlan | None:
    """The request's plan, or None (no tools, or tool_choice none). `schema_of(tools, choice,
    parallel)`: vLLM's schema builder; `parse_auto`: the server's tool-call parser, if any
    (both runtime/tools.py). Every 400 names its field."""
    check_history(req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice",
                           code="invalid_value")
        return None
    check_tools(req)
    if choice == "none":
        return None
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with tools (the tool-call "
                       "schema is the answer's format)", param="response_format",
                       code="invalid_value")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools",
                           param="tool_choice.function.name", code="invalid_value")
        return ToolPlan("named", tools, schema_of(tools, choice.model_dump(), None), name)
    if choice == "required":
        return ToolPlan("required", tools, schema_of(tools, "required", req.parallel_tool_calls))
    if parse_auto is None:  # "auto", sent or implied by tools without a tool_choice
        raise APIError(400, "tool_choice 'auto' (the default with tools) needs a tool-call "
                       "parser, and this server has none (start it with --tool-call-parser "
                       "NAME); send tool_choice 'required' or a named function instead",
                       param="tool_choice", code="unsupported_value")
    return ToolPlan("auto", tools, parse_auto=parse_auto)


def check_tools(req: ChatCompletionRequest) -> None:
    """Function names unique; each `parameters` a valid JSON Schema."""
    from jsonschema import SchemaError, validators

    seen: set[str] = set()
    for i, tool in enumerate(req.tools or ()):
        fn = tool.function
        if fn.name in seen:
            raise APIError(400, f"function name {fn.name!r} is given twice",
                           param=f"tools[{i}].function.name", code="invalid_value")
        seen.add(fn.name)
        if fn.parameters is None:
            continue
        try:
            validators.validator_for(fn.parameters).check_schema(fn.parameters)
        except SchemaError as exc:
            raise APIError(400, f"not a valid JSON Schema: {exc.message[:200]}",
                           param=f"tools[{i}].function.parameters",
                           code="invalid_value") from None


def check_history(req: ChatCompletionRequest) -> None:
    """Every `tool` message answers a call an earlier assistant message made."""
    calls: set[str] = set()
    for i, m in enumerate(req.messages):
        for call in getattr(m, "tool_calls", None) or ():
            calls.add(call.id)
        if isinstance(m, ToolMessage) and m.tool_call_id not in calls:
            raise APIError(400, f"tool message answers call {m.tool_call_id!r}, which no earlier "
                           "assistant message made", param=f"messages[{i}].tool_call_id",
                           code="invalid_value")


def tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer. Output that does not parse (cut by max_tokens)
    stays text with no tool calls, as vLLM returns it."""
    if plan.mode == "auto":
        assert plan.parse_auto is not None
        return plan.parse_auto(text, plan.tools)
    try:
        value = json.loads(text)
    except ValueError:
        return text, []
    if plan.mode == "named":
        return None, [_call(plan.function or "", value)]
    if not isinstance(value, list) or not all(isinstance(v, dict) and "name" in v
                                              for v in value):
        return text, []
    return None, [_call(v["name"], v.get("parameters", {})) for v in value]


def _call(name: str, arguments: Any) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
