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

DEFAULT_MAX_TOKENS = 128  # when a request gives none (cut to what the context leaves)
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 256  # characters: every commit scans the text's tail for them
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API
MIN_TEMPERATURE = 1e-5  # below it, greedy (vLLM's rule): logits / T would overflow
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
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool | None = False


def _unsupported(name: str, why: str) -> str:
    return f"{name} is not supported by this server ({why})"


class _Request(BaseModel):
    # strict: a JSON string is not a number. Every OpenAI field is honoured or refused with a 400 naming it
    # (`refused`); fields OpenAI does not know are refused too, as OpenAI does. `null` means "the default".
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = Field(None, description="Served model id (GET /v1/models); omitted = the served model.")
    max_tokens: int | None = Field(None, ge=1, description="Omitted: 128, or what the context leaves if less.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy (below 1e-5 too, as vLLM).")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=1, description="One choice per request.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Sampling seed; omitted = random.")
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    speculation: SpeculationName | None = Field(None, description="radar | tree:D | off; omitted = the default.")
    user: str | None = None  # an end-user id for abuse tracking: accepted, nothing to do with it here
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop strings must be at most {MAX_STOP_LENGTH} characters")
        return value

    def refused(self) -> tuple[str, str] | None:
        """(field, why) for the first field set to something this server cannot do losslessly, else None."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, _unsupported(name, "a penalty changes the target's distribution; only 0 is served")
        if self.logit_bias:
            return "logit_bias", _unsupported("logit_bias", "it changes the target's distribution; only {} is served")
        return None

    @property
    def stop_list(self) -> list[str]:
        """The stop strings as a list (OpenAI also accepts one string)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def sampling_temperature(self) -> float:
        """The temperature to sample at: 1 when omitted, 0 (greedy) below 1e-5, where softmax(logits / T) would
        overflow."""
        t = 1.0 if self.temperature is None else self.temperature
        return 0.0 if t < MIN_TEMPERATURE else t

    @property
    def nucleus(self) -> float:
        """top_p, 1 when omitted."""
        return 1.0 if self.top_p is None else self.top_p

    @property
    def requested_tokens(self) -> int | None:
        """The max_tokens the client asked for (None: omitted)."""
        return self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        """Alternatives per token to report with logprobs, None when logprobs are not asked for."""
        return None


class CompletionRequest(_Request):
    """POST /v1/completions: the prompt is raw text, tokenized as is (like `radar generate --raw`, BOS included when
    the tokenizer adds one)."""

    prompt: str = Field(..., min_length=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token (0-20).")
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)

    def refused(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", _unsupported("suffix", "no insertion mode; the model only continues the prompt")
        return super().refused()

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions: messages rendered with the tokenizer's chat template, or without one the plain
    Question/Answer layout (`radar.decoding.chat`); OpenAI's developer role is a system message."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None  # stored nowhere: accepted as OpenAI does without `store`
    store: bool | None = None

    def refused(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", _unsupported("tools", "no tool calling")
        if self.tool_choice not in (None, "none"):
            return "tool_choice", _unsupported("tool_choice", "no tool calling")
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", _unsupported(f"response_format {self.response_format.type!r}",
                                                   "no constrained decoding; only 'text'")
        if self.store:
            return "store", _unsupported("store", "completions are not stored")
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            return "max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one"
        return super().refused()

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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


class CompletionLogprobs(BaseModel):
    """Legacy completions' logprobs: per token its text, log-prob, the likeliest alternatives and its offset."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
