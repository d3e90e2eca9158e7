"""OpenAI API requests (chat and legacy completions) and vLLM's extensions to them.

Every field OpenAI defines is known here. A field modserve honours takes effect; one it
cannot honour is accepted only at its neutral value and otherwise refused with a 400
naming it; a field no one defines is refused too (as OpenAI does). An explicit `null`
means the default, wherever the spec marks a field nullable. Responses are in
`responses.py`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modserve.engine.base import (
    MAX_LOGPROBS,
    SEED_RANGE,
    InvalidRequestError,
    SamplingParams,
    StructuredOutput,
)

TokenId = Annotated[int, Field(ge=0)]
MAX_STOP_STRINGS = 16


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def null_means_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage so far on every chunk
    include_obfuscation: Literal[False] = False


class ContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIModel):
    name: str
    arguments: str


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool's answer
    refusal: str | None = None

    def for_template(self) -> dict:
        """The message as chat templates read it (text parts joined)."""
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message


class JsonSchemaFormat(OpenAIModel):
    name: str
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool = False


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self


class StructuredOutputs(OpenAIModel):
    """vLLM's structured-output fields: exactly one constraint."""

    json_: str | dict | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: Literal[True] | None = None  # modserve's JSON is always compact

    @model_validator(mode="after")
    def exactly_one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


def check_json_schema(schema: dict, param: str) -> None:
    """A schema that is not a JSON Schema is a 400 naming its field."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as err:
        raise InvalidRequestError(f"{param}: not a valid JSON Schema: {err.message}", param) from None


class SamplingFields(OpenAIModel):
    """What chat and completions requests share."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = None  # logged with the request, as an operator's handle on abuse
    safety_identifier: str | None = None  # likewise
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None  # completions too, as vLLM allows
    # Extensions (vLLM's names where vLLM has them).
    language: str | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    structured_outputs: StructuredOutputs | None = None

    # OpenAI fields modserve cannot honour: accepted at these values only.
    neutral: ClassVar[dict[str, tuple]] = {}

    def refuse_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed with stream: true", "stream_options")
        for name, allowed in self.neutral.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise InvalidRequestError(f"{name}: {value!r} is not supported by modserve", name)

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS or not all(stop):
            raise InvalidRequestError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings", "stop")
        return tuple(stop)

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
        structured: StructuredOutput | None = None,
    ) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=self.seed,
            stop=self.stop_strings(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            n=self.n,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=self.token_biases(),
            min_tokens=self.min_tokens or 0,
            min_p=self.min_p or 0.0,
            structured=structured if structured is not None else self.structured(),
        )

    def token_biases(self) -> tuple[tuple[int, float], ...]:
        biases = []
        for token, bias in (self.logit_bias or {}).items():
            if not (token.isascii() and token.isdigit()):
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {token!r}", "logit_bias")
            biases.append((int(token), bias))
        return tuple(biases)

    def structured(self) -> StructuredOutput | None:
        """response_format or vLLM's structured_outputs (not both) as the engine's constraint."""
        if self.response_format is not None and self.response_format.type != "text" and self.structured_outputs:
            raise InvalidRequestError("give response_format or structured_outputs, not both", "structured_outputs")
        if self.structured_outputs is not None:
            return self.structured_outputs_constraint()
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutput("json_object", param="response_format")
        schema = fmt.json_schema.schema_
        check_json_schema(schema, "response_format")
        return StructuredOutput("json", json.dumps(schema), "response_format")

    def structured_outputs_constraint(self) -> StructuredOutput:
        so, param = self.structured_outputs, "structured_outputs"
        if so.json_ is not None:
            schema = json.loads(so.json_) if isinstance(so.json_, str) else so.json_
            check_json_schema(schema, param)
            return StructuredOutput("json", json.dumps(schema), param)
        if so.json_object:
            return StructuredOutput("json_object", param=param)
        if so.choice is not None:
            return StructuredOutput("choice", json.dumps(so.choice), param)
        if so.regex is not None:
            return StructuredOutput("regex", so.regex, param)
        return StructuredOutput("grammar", so.grammar, param)


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # OpenAI's, not honoured: accepted at their neutral values only (see refuse_unsupported).
    audio: Any = None
    modalities: Any = None
    functions: Any = None
    function_call: Any = None
    metadata: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    store: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    neutral: ClassVar[dict[str, tuple]] = {
        "audio": (), "functions": (), "function_call": (), "metadata": ({},), "moderation": (), "prediction": (),
        "prompt_cache_key": (), "prompt_cache_options": (), "prompt_cache_retention": (), "reasoning_effort": (),
        "verbosity": (), "web_search_options": (),
        "modalities": (["text"],), "service_tier": ("auto", "default"), "store": (False,),
    }

    def logprobs_wanted(self) -> int | None:
        """Alternatives per token to report (OpenAI: top_logprobs only with logprobs); None: off."""
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequestError("top_logprobs requires logprobs: true", "top_logprobs")
            return None
        return self.top_logprobs or 0

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int = Field(16, ge=0)  # OpenAI's default; 0 with echo: the prompt alone, scored
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: Any = None

    neutral: ClassVar[dict[str, tuple]] = {"suffix": ("",)}

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.best_of not in (None, self.n):
            raise InvalidRequestError("best_of other than n is not supported", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens: 0 generates nothing; it needs echo: true", "max_tokens")

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_wanted(self) -> int | None:
        """echo + logprobs: the prompt's tokens scored too (lm-eval's loglikelihood); or vLLM's field."""
        if self.echo and self.logprobs is not None:
            return self.logprobs
        return self.prompt_logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("prompt is empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)


class TokenizeCompletionRequest(OpenAIModel):
    """vLLM's POST /tokenize for a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIModel):
    """vLLM's POST /tokenize for chat messages, through the served chat template."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[TokenId]
