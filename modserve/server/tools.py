"""Tool calls through structured outputs: the functions' parameter schemas constrain what the
model writes, and what it wrote is answered in OpenAI's `tool_calls` shape.

`tool_choice` {"type": "function", "function": {"name": N}}: the model writes N's arguments.
`required`: it writes a list of calls, each one of the tools with its arguments (one call
when `parallel_tool_calls` is false). `none`: tools are ignored. `auto` needs the model to
decide between text and a call, which no grammar decides for it: refused.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from modserve.engine.base import InvalidRequestError, StructuredOutput
from modserve.server.protocol import ChatCompletionRequest, NamedToolChoice, check_json_schema
from modserve.server.responses import FunctionCall, ToolCall

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    constraint: StructuredOutput
    function: str | None  # the named function; None: `required`

    def calls(self, text: str) -> list[ToolCall] | None:
        """What the model wrote, as tool calls; None when it is not whole (cut by max_tokens)."""
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return None
        if self.function is not None:
            return [call(self.function, text)]
        return [call(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in parsed]


def call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


def tool_plan(body: ChatCompletionRequest) -> ToolPlan | None:
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice: there are no tools to choose from", "tool_choice")
        return None
    if choice == "none":
        return None
    if choice in (None, "auto"):
        raise InvalidRequestError(
            "tool_choice: 'auto' is not supported (the default when tools are given); use 'none', "
            "'required', or {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice",
        )
    if body.structured() is not None:
        raise InvalidRequestError("tools: a tool call is already a structured output; drop response_format", "tools")
    parameters = {tool.function.name: tool.function.parameters or EMPTY_PARAMETERS for tool in body.tools}
    for schema in parameters.values():
        check_json_schema(schema, "tools")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in parameters:
            raise InvalidRequestError(f"tool_choice: no tool is named {name!r}", "tool_choice")
        return ToolPlan(StructuredOutput("json", json.dumps(parameters[name]), "tools"), name)
    one_of = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
            "required": ["name", "parameters"],
        }
        for name, schema in parameters.items()
    ]
    calls: dict = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if not body.parallel_tool_calls:
        calls["maxItems"] = 1
    return ToolPlan(StructuredOutput("json", json.dumps(calls), "tools"), None)
