"""The OpenAI-compatible wire format: request and response models (the subset a batch-size-1 decoder honours).

Requests are validated strictly (JSON types as OpenAI documents them: no "10" for 10); unknown fields are
ignored, as OpenAI clients send many optional ones. The one extension is `speculation`: how to decode, `radar`
(learned stop policy), `tree:D` (fixed D draft calls per cycle) or `off` (the target alone). Every choice decodes
losslessly, so at temperature 0 all three give the same text. Responses carry the extension `speculation` too:
how the request was decoded and how well drafting went.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from radar.decoding.methods import Method

MAX_TOKENS_LIMIT = 4096  # per request; the model's context may allow fewer (checked per prompt)
DEFAULT_MAX_TOKENS = 128
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TREE_DEPTH = 16  # draft calls per cycle for `tree:D`


def parse_speculation(value: str) -> Method:
    """The decoder method a `speculation` value names: `radar`, `off` (the target alone) or `tree:D`, D <= 16."""
    try:
        method = Method.parse(value)
    except ValueError:
        method = None
    # Only the canonical spellings: the value is reported back and used as a metrics label, so " radar",
    # "tree:04" or the engine's "ar" and "chain:D" stay refused.
    # threshold:P and budgets (tree:D@B) stay bench methods: any number would become a metrics label.
    if (method is None or method.kind in ("chain", "threshold") or method.budget is not None
            or speculation_name(method) != value):
        raise ValueError(f"speculation must be 'radar', 'off' or 'tree:D' (D = 1..{MAX_TREE_DEPTH}), got {value!r}")
    if method.depth > MAX_TREE_DEPTH:
        raise ValueError(f"speculation tree:D allows D up to {MAX_TREE_DEPTH}, got {value!r}")
    return method


def speculation_name(method: Method) -> str:
    """How Serve spells `method`: the engine's `ar` is `off`."""
    return "off" if method.kind == "ar" else str(method)


def _check_speculation(value: str) -> str:
    parse_speculation(value)
    return value


SpeculationName = Annotated[str, AfterValidator(_check_speculation)]
FinishReason = Literal["stop", "length"]


# ---- requests ------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    # strict: a JSON string is not a number; extra fields (user, logprobs, ...) are accepted and ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = Field(None, description="Served model id (GET /v1/models); omitted = the served model.")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Sampling seed; omitted = random.")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculation: SpeculationName | None = Field(None, description="radar | tree:D | off; omitted = the default.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def stop_list(self) -> list[str]:
        """The stop strings as a list (OpenAI also accepts one string)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    """POST /v1/completions: the prompt is raw text, tokenized as is (like `radar generate --raw`, BOS included when
    the tokenizer adds one)."""

    prompt: str = Field(..., min_length=1)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions: messages rendered with the tokenizer's chat template, or without one the plain
    Question/Answer layout (`radar.decoding.chat`); OpenAI's developer role is a system message."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)

    def conversation(self) -> list[dict[str, str]]:
        """The messages as role/content dicts for `ModelPair.chat_ids`."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages]


# ---- responses -----------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int  # up to a stop-string cut
    total_tokens: int


class AcceptLengths(BaseModel):
    """Tokens committed per target call (accepted drafts + the bonus token), over the request's cycles."""

    mean: float
    min: int
    max: int
    cycles: int


class Speculation(BaseModel):
    """RADAR extension: how the request was decoded and how well drafting went."""

    method: str  # radar, tree:D or off
    tau: float  # mean tokens per target call (1.0 when off)
    draft_calls_per_cycle: float
    accept_lengths: AcceptLengths
    target_calls: int
    generated_tokens: int  # decoded before stop-string truncation
    decode_s: float
    queue_s: float


class _Head(BaseModel):
    id: str
    created: int
    model: str


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(_Head):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage
    speculation: Speculation


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_Head):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    speculation: Speculation


def _absent_if_none(value: object) -> bool:
    return value is None


class _Chunk(_Head):
    """A server-sent event; only the last chunks carry `speculation` (finish) and `usage` (include_usage)."""

    usage: Usage | None = Field(None, exclude_if=_absent_if_none)
    speculation: Speculation | None = Field(None, exclude_if=_absent_if_none)


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_absent_if_none)
    content: str | None = Field(None, exclude_if=_absent_if_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class SpeculationChoices(BaseModel):
    default: str
    methods: list[str]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "radar"
    context_length: int
    speculation: SpeculationChoices


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every error, OpenAI style: {"error": {"message", "type", "code", "param"}}."""

    error: ErrorBody


def sse(event: BaseModel) -> str:
    """One server-sent event carrying `event` as JSON."""
    return f"data: {event.model_dump_json()}\n\n"


SSE_DONE = "data: [DONE]\n\n"
