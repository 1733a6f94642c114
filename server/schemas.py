"""Pydantic models of the OpenAI API subset that lckv-serve speaks (requests and responses).

Requests validate everything that can be checked without the model (types, ranges, empty prompts); what needs the
model (context length, vocabulary, the engine's logprob limit) is checked in `generation.py`.  Unknown fields are
ignored, as OpenAI-compatible servers commonly do, so clients that send newer fields keep working; fields we cannot
honour (`suffix`, `tools`, ...) are declared so that asking for them is an error rather than being silently dropped.
`response_format` is checked here as far as it can be without the engine (its shape, and that a `json_schema`'s
schema is a valid JSON Schema); whether the structured-output backend can compile the schema is asked of the engine
in `generation.py`.

Requests are validated strictly, from the JSON text (`model_validate_json`): a field declared as an integer takes a
JSON integer only (not `true`, `2.5` or `"2"`), a boolean only `true`/`false`, a string only a string.  What the
schema accepts is what the published OpenAPI document (`/openapi.json`) says.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_N = 128  # choices per request; more is almost certainly a client bug (--max-n lowers it)
MAX_STOP = 16
MAX_PROMPTS = 256  # prompts in one batched /v1/completions request
MAX_TOP_K = 2**31 - 1  # past the int32 the engine's tensors use; larger means "all tokens" anyway

Prob = Annotated[float, Field(allow_inf_nan=False)]


def _integral(v):
    """JSON Schema counts 2.0 as an integer, and so do we; 2.5, "2" and true stay errors (strict mode)."""
    if type(v) is float and v.is_integer() and abs(v) < 2.0**64:
        return int(v)
    return v


def Int(**constraints):  # noqa: N802 - used as a type
    """An integer field (constraints as for `Field`); the constraints must come before the validator for them to
    reach the JSON schema as minimum/maximum."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


MAX_SCHEMA_NESTING = 64  # vLLM's MAX_STRUCTURED_OUTPUT_JSON_NESTING: objects and arrays in a JSON Schema

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def _nesting_exceeds(node: Any, limit: int) -> bool:
    level = [node]
    for _ in range(limit):
        level = [c for n in level for c in (n.values() if isinstance(n, dict) else n) if isinstance(c, (dict, list))]
        if not level:
            return False
    return True


class JsonSchemaSpec(_Request):
    """`response_format.json_schema` (OpenAI's shape): the schema the generated text must follow."""

    name: str
    description: str | None = None
    # `schema` is a BaseModel attribute, hence the alias; the request's field is `schema`.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # accepted; the backend always enforces the schema (constrained decoding)

    @field_validator("schema_", mode="before")
    @classmethod
    def _an_object(cls, v):
        if not isinstance(v, dict):
            raise ValueError(f"the schema must be a JSON Schema object, got {_JSON_TYPES.get(type(v), 'a value')}")
        return v

    @field_validator("schema_")
    @classmethod
    def _valid_json_schema(cls, v: dict[str, Any]):
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for

        if _nesting_exceeds(v, MAX_SCHEMA_NESTING):
            raise ValueError(f"the schema nests objects and arrays more than {MAX_SCHEMA_NESTING} levels deep")
        # Against the draft its `$schema` names (Draft 2020-12 when it names none or one jsonschema does not know): a
        # schema that is not valid JSON Schema would otherwise reach the backend, which compiles what it makes of it.
        validator = validator_for(v, default=Draft202012Validator)
        try:
            validator.check_schema(v)
        except SchemaError as e:
            where = f" (at {e.json_path})" if e.path else ""
            draft = validator.__name__.removesuffix("Validator").replace("Draft", "Draft ")
            draft = {"Draft 202012": "Draft 2020-12", "Draft 201909": "Draft 2019-09"}.get(draft, draft)
            raise ValueError(f"not a valid JSON Schema ({draft}): {e.message}{where}") from None
        except RecursionError:
            raise ValueError("the schema nests too deeply to be checked") from None
        return v


class ResponseFormat(_Request):
    """`response_format`, as `vllm serve` takes it: `text` (the default), `json_object` (any JSON object) or
    `json_schema` (JSON that follows `json_schema.schema`), enforced by vLLM's structured-output backend."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = Field(default=None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_with_its_type(cls, v, info):
        kind = info.data.get("type")
        if kind == "json_schema" and v is None:
            raise ValueError("required when response_format.type is 'json_schema'")
        if kind is not None and kind != "json_schema" and v is not None:
            raise ValueError(f"only allowed when response_format.type is 'json_schema' (it is '{kind}')")
        return v


class SamplingFields(_Request):
    """Sampling fields shared by completions and chat (OpenAI names, plus vLLM's extras)."""

    model: str | None = None
    n: Int(ge=1, le=MAX_N) = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Int(ge=-1, le=MAX_TOP_K) | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[Int()] | None = None
    seed: Int(ge=-(2**63), lt=2**64) | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None  # on /v1/completions too, as in vLLM
    # vLLM extras (OpenAI clients send them through `extra_body`)
    ignore_eos: bool = False
    min_tokens: Int(ge=0) = 0

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v):
        if v is None:
            return v
        items = [v] if isinstance(v, str) else v
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptInput = Union[
    StrictStr,
    Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)],
    Annotated[list[int], Field(min_length=1)],
    Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)],
]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: Int(ge=1) | None = 16
    logprobs: Int(ge=0) | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Int(ge=1) | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, v):
        # Checked by hand before the union: pydantic's per-member errors for a four-way union read as noise.
        forms = "a string, a list of strings, a list of token ids or a list of token-id lists"
        if isinstance(v, str):
            if v == "":
                raise ValueError("the prompt is empty")
            return v
        if not isinstance(v, list):
            raise ValueError(f"the prompt must be {forms}, got {type(v).__name__}")
        if not v:
            raise ValueError("the prompt list is empty")
        if len(v) > MAX_PROMPTS and not all(type(x) is int for x in v):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        if all(isinstance(x, str) for x in v):
            empty = next((i for i, x in enumerate(v) if x == ""), None)
            if empty is not None:
                raise ValueError(f"prompt {empty} is empty")
            return v
        v = [[_integral(t) for t in x] if isinstance(x, list) else _integral(x) for x in v]
        if all(type(x) is int for x in v):
            return v
        if all(isinstance(x, list) for x in v):
            for i, ids in enumerate(v):
                if not ids or not all(type(t) is int for t in ids):
                    raise ValueError(f"prompt {i} must be a non-empty list of token ids (integers)")
            return v
        raise ValueError(f"the prompt must be {forms}; this list mixes types")

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        return self


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Int(ge=1) | None = None
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: Int(ge=0) | None = None
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if not any(m.text() for m in self.messages):
            raise ValueError("all messages are empty")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses -----------------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache (not computed for this request)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        # OpenAI sends the role in the first delta only; a `"role": null` in later ones confuses some clients.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lckv-vllm"
    root: str
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int
    layer_types: str | None = None  # the active LCKV plan
    checkpoint_layer_types: str | None = None  # the checkpoint's own (differs under --hf-overrides)
    kv_bytes_per_token: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx answer of the server (OpenAI's error shape)."""

    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["ok"]


class VersionResponse(BaseModel):
    version: str
    lckv_vllm: str
    vllm: str
