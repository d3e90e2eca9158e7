"""OpenAI API responses, shaped as the official OpenAPI spec says (tests validate real ones
against it): keys the spec requires are always present (`null` where it allows), keys it
only allows are left out rather than sent as `null`."""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_serializer


class Shape(BaseModel):
    omit_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def leave_out_unset(self, handler):
        data = handler(self)
        for key in self.omit_if_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class CachedTokens(Shape):
    cached_tokens: int


class Usage(Shape):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens | None = None

    omit_if_none = ("prompt_tokens_details",)

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> Usage:
        details = CachedTokens(cached_tokens=cached) if cached else None
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=details)


class ResponseBase(Shape):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str  # which weights answered: the resident and the packs' fingerprints


class TopLogprob(Shape):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Shape):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class CompletionLogprobs(Shape):
    tokens: list[str]
    token_logprobs: list[float | None]  # the first prompt token's is None (echo), as OpenAI's
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(Shape):
    """vLLM's prompt_logprobs entry, per token id: the prompt token's and its top alternatives."""

    logprob: float
    rank: int | None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class FunctionCall(Shape):
    name: str
    arguments: str


class ToolCall(Shape):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(Shape):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None

    omit_if_none = ("tool_calls",)


class ChatChoice(Shape):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(ResponseBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's

    omit_if_none = ("prompt_logprobs",)


class ToolCallChunk(Shape):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict | None = None  # {"name"?, "arguments"?}

    omit_if_none = ("id", "type", "function")


class ChatDelta(Shape):
    role: Literal["assistant"] | None = None  # the first chunk only
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None

    omit_if_none = ("role", "content", "tool_calls")


class ChatChunkChoice(Shape):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(ResponseBase):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None

    omit_if_none = ("usage", "prompt_logprobs")


class CompletionChoice(Shape):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None

    omit_if_none = ("prompt_logprobs",)


class Completion(ResponseBase):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None

    omit_if_none = ("usage",)


class ModelCard(Shape):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None  # vLLM's

    omit_if_none = ("root", "parent", "max_model_len")


class ModelList(Shape):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(Shape):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Shape):
    error: ErrorDetail


class TokenizeResponse(Shape):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None

    omit_if_none = ("token_strs",)


class DetokenizeResponse(Shape):
    prompt: str
