"""Request and response shapes of the OpenAI-compatible API (the subset a batch-size-1 decoder can honour).

Requests are validated strictly (JSON types as OpenAI documents them: no "10" for 10), unknown fields are
ignored as OpenAI clients send many optional ones. The one extension is `speculation`: how to decode,
`radar` (learned stop policy), `tree:D` (fixed D draft calls per cycle) or `off` (the target alone).
Every choice decodes losslessly, so at temperature 0 all three give the same text.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS_LIMIT = 4096  # per request; the model's context may allow fewer (checked per prompt)
DEFAULT_MAX_TOKENS = 128
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TREE_DEPTH = 16  # draft calls per cycle for `tree:D`
SPECULATION_PATTERN = re.compile(r"radar|off|tree:([1-9][0-9]*)")


def parse_speculation(value: str) -> str:
    """Check a `speculation` value and return the decoder method it names (`off` -> `ar`)."""
    m = SPECULATION_PATTERN.fullmatch(value)
    if not m:
        raise ValueError(f"speculation must be 'radar', 'off' or 'tree:D' (D = 1..{MAX_TREE_DEPTH}), got {value!r}")
    if m.group(1) and int(m.group(1)) > MAX_TREE_DEPTH:
        raise ValueError(f"speculation tree:D allows D up to {MAX_TREE_DEPTH}, got {value!r}")
    return "ar" if value == "off" else value


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    # strict: a JSON string is not a number; extra fields (user, logprobs, ...) are accepted and ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = Field(None, description="Served model id (GET /v1/models); omitted = the served model.")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="Sampling seed; omitted = random.")
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    speculation: Optional[str] = Field(None, description="radar | tree:D | off; omitted = the server's default.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("speculation")
    @classmethod
    def _check_speculation(cls, v):
        if v is not None:
            parse_speculation(v)
        return v

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    """POST /v1/completions: the prompt is raw text, tokenized as is (like `radar generate`)."""

    prompt: str = Field(..., min_length=1)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions: messages rendered with the tokenizer's chat template (or the plain template)."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)


# ---- responses (built as dicts by the app; these document and check the shapes) -------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    speculation: Optional[Speculation] = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    speculation: Speculation


class ErrorBody(BaseModel):
    message: str
    type: str
    code: Optional[str] = None
    param: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error, OpenAI style: {"error": {"message", "type", "code", "param"}}."""

    error: ErrorBody
