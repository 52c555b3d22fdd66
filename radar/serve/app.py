"""Ray Serve application: an OpenAI-compatible HTTP API in front of the target + draft + RADAR controller decoder.

Routes (under the route prefix): POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).

Concurrency. Each replica holds one ModelPair and decodes one request at a time on a single worker thread
(a one-thread executor, which is also the FIFO queue). The decoder is batch size 1 and its GPU/CPU work does
not overlap, so two decodes at once would only slow both down; serializing them keeps per-request latency
predictable and tau/time-per-token meaningful. Requests still enter the replica concurrently (up to
`max_ongoing_requests`, beyond that they wait in Serve's router, up to `max_queued_requests`, then 503), so the
asyncio event loop stays free for /health and /metrics while a decode runs, and the queue inside the replica is
visible (the `radar_queue_depth` gauge) and covered by the per-request timeout. Nothing is shared between
requests: every request gets its own KV caches, drafter state, random generator and a fresh stop policy
(ModelPair.generate builds one from the request's seed). Scale throughput with replicas, not concurrency.

Timeouts. The per-request timeout covers the wait in the replica's queue and the decode. On timeout the client
gets 504 and the request is cancelled: a forward pre-hook on the target and draft raises at the next model call,
so a timed-out (or disconnected) request frees the decoder within one forward instead of running to the end.

Streaming. The decoder hands each cycle's committed tokens to a callback on the worker thread
(`ModelPair.generate(on_commit=...)`); they cross to the event loop through an asyncio queue and go out as
OpenAI chunks as soon as they are decoded to text (an incomplete UTF-8 tail and a possible stop-string prefix are
held back). The response starts once the first tokens exist, so a request that times out in the queue still gets
a 504; a timeout after that ends the stream with an error event. When a stop string appears, or the client goes
away, the callback tells the decoder to stop. The streamed text equals the non-streamed text.

Stop strings. A non-streamed decode runs to max_tokens or EOS, then the text is cut at the first stop string
(finish_reason "stop"; a streamed one stops decoding there); `usage.completion_tokens` counts the tokens up to the cut, `speculation.generated_tokens`
all decoded tokens.

Prompts. /v1/completions tokenizes the raw prompt as is (exactly like `radar generate --prompt`, BOS included
when the tokenizer adds one). /v1/chat/completions renders the messages with the tokenizer's chat template.
Without a template (the demo pair) it uses the plain one-turn template "Question: ...\\nAnswer:"
(`ModelPair.chat_ids`) for a single user message; a multi-turn conversation must be leading system messages,
then user/assistant turns alternating and ending with a user turn, and renders as the system text and a blank
line, then one "Question: {user}\\nAnswer: {assistant}\\n" block per exchange, ending with
"Question: {last user}\\nAnswer:". Anything else (an assistant turn last, two user turns in a row) is a 400.

Safety. Request bodies over `max_body_bytes` get 413; with an API key configured (`api_key`, or the
RADAR_API_KEY environment variable where the app is built) every route but /health needs
`Authorization: Bearer KEY` (401); every error is OpenAI-style JSON {"error": {"message", "type", "code",
"param"}} and an unexpected exception is logged with its traceback in the replica log and answered with a
generic 500, never a stack trace.

Metrics. Each replica keeps its own Prometheus registry, and Serve routes a GET /metrics to one replica; with
several replicas, scrape each (or use Ray's metrics export). A request without `seed` samples with a random one.
"""

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from radar.serve.schemas import (
    MAX_TREE_DEPTH,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    parse_speculation,
)

log = logging.getLogger("ray.serve")

FALLBACK_SPECULATION = "tree:4"  # the default when no controller can be loaded (best fixed depth on the demo pair)


class ServeConfig(BaseModel):
    """Everything `build_app` needs; also the `args` of the Serve config YAML (`radar.serve.app:app_builder`)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, description="Target checkpoint directory; None = the demo pair.")
    draft: Optional[str] = Field(None, description="Draft checkpoint directory (None with model=None: demo draft).")
    controller: Optional[str] = Field(None, description="Controller dir, .pt or models:/ URI; None = bundled.")
    model_name: Optional[str] = Field(None, description="Model id clients send; default: radar-demo or the dir name.")
    device: str = "auto"
    dtype: str = "auto"
    tree_tokens: Optional[int] = Field(None, ge=1, description="Tree nodes verified per cycle (default per device).")
    speculation: str = Field("radar", description="Default speculation: radar, tree:D or off.")
    # None: taken from $RADAR_API_KEY when the app is built; "": no key even when that variable is set.
    api_key: Optional[str] = Field(None, description="Bearer key required on every route but /health.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request limit (queue wait + decode) -> 504.")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: Optional[int] = Field(None, ge=1, description="Intra-op threads; default: the replica's CPUs.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests inside one replica (queued or decoding).")
    max_queued_requests: int = Field(256, ge=-1, description="Requests waiting in Serve's router (-1 = no limit).")
    max_constructor_retry_count: int = Field(3, ge=1, description="Replica start attempts (a bad path never heals).")
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "radar"

    @field_validator("speculation")
    @classmethod
    def _check_speculation(cls, v: str) -> str:
        parse_speculation(v)
        return v


# ---- errors -------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


class Cancelled(Exception):
    """Raised inside the decoder thread to abandon a request (timed out or client gone)."""


def error_json(status: int, message: str, type: str, code: Optional[str] = None, param: Optional[str] = None,
               headers: Optional[dict] = None) -> JSONResponse:
    """The OpenAI error body {"error": {...}} with `status`."""
    body = {"error": {"message": message, "type": type, "code": code, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(exc: ValidationError) -> tuple[str, Optional[str]]:
    """One readable line from a pydantic error, and the first offending field."""
    parts, param = [], None
    for e in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "json_invalid":
            parts.append(f"the body is not valid JSON ({e['msg']})")
            continue
        param = param or loc or None
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else f"the body must be a JSON object ({msg})")
    return "; ".join(parts) or "invalid request", param


# ---- the ASGI guard: body size, API key, catch-all, request counts ----------------------------------------------

KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_replica: Optional["RadarServer"] = None  # the deployment instance of this replica process (one per process)


class Guard:
    """Pure ASGI middleware, outermost in the app: body size limit (413), bearer key (401), a generic 500 for any
    unhandled exception (traceback logged, never sent) and the radar_requests_total counter."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _replica is None:  # fail closed: without the replica's settings the API key cannot be checked
            return await error_json(503, "the server is starting", "server_error", "unavailable")(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        route = (path[len(root):] if root and path.startswith(root) else path).rstrip("/") or "/"
        status = {"code": 500, "started": False}

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            rejection = self._check_key(scope, route)
            if rejection is None:
                receive, rejection = await self._buffer_body(scope, receive)
            if rejection is not None:
                await rejection(scope, receive, send_tracked)
            else:
                await self.app(scope, receive, send_tracked)
        except Exception:  # noqa: BLE001 - last line of defence: log it, answer a generic 500
            log.error("unhandled error on %s %s\n%s", scope.get("method"), path, traceback.format_exc())
            if not status["started"]:
                await error_json(500, "internal server error (details are in the server log)", "server_error",
                                 "internal_error")(scope, receive, send_tracked)
        finally:
            label = route if route in KNOWN_ROUTES else "other"
            _replica.metrics.requests.labels(label, str(status["code"])).inc()

    def _check_key(self, scope, route: str) -> Optional[JSONResponse]:
        key = _replica.api_key
        if key and route != "/health":
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error_json(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                  "authentication_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _buffer_body(self, scope, receive) -> tuple[Callable, Optional[JSONResponse]]:
        """Read the whole body (bounded) before the app sees it: (a `receive` that replays it, None), or
        (receive, a 413 response)."""
        limit = _replica.cfg.max_body_bytes
        too_big = error_json(413, f"request body exceeds {limit} bytes", "invalid_request_error",
                             "request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return receive, too_big
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return receive, None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return receive, too_big
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


api = FastAPI(title="RADAR speculative decoding", version="1", docs_url="/docs", redoc_url=None)
api.add_middleware(Guard)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return error_json(exc.status, exc.message, exc.type, exc.code, exc.param)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # Unknown routes (404) and wrong methods (405) in the OpenAI shape too.
    message = {404: f"no route {request.url.path}", 405: f"{request.method} not allowed on {request.url.path}"}
    return error_json(exc.status_code, message.get(exc.status_code, str(exc.detail)), "invalid_request_error",
                      {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))


# ---- text helpers ------------------------------------------------------------------------------------------


def cut_at_stop(text: str, stops: list[str]) -> Optional[int]:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def tokens_covering(decode: Callable[[list[int]], str], ids: list[int], text: str) -> int:
    """The fewest leading tokens whose text starts with `text` (binary search; len(ids) if none shorter does)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if decode(ids[:mid]).startswith(text):
            hi = mid
        else:
            lo = mid + 1
    return lo


class Detokenizer:
    """Token ids in, text deltas out, for streaming: decodes a sliding window (so each token costs O(1) decodes),
    holds back an incomplete UTF-8 tail and any suffix that could be the start of a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # decoded so far (stable part)
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the newly releasable text."""
        for t in ids:
            self.ids.append(t)
            prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
            new = self.decode(self.ids[self.prefix_offset:])
            if len(new) > len(prefix) and not new.endswith("\ufffd"):
                self.text += new[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is held back (the decode has ended)."""
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        self.text += self.decode(self.ids[self.prefix_offset:])[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = cut_at_stop(self.text, self.stops)
        if cut is not None:
            self.stopped = True
            end = max(cut, self.sent)
        elif final:
            end = len(self.text)
        else:  # keep back the longest tail that a stop string starts with
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = max(len(self.text) - hold, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out


# ---- metrics -----------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one replica (its own registry; each replica answers /metrics for itself)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series only double the output
        r = self.registry = CollectorRegistry()
        self.requests = Counter("radar_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("radar_prompt_tokens", "Prompt tokens decoded", ["speculation"], registry=r)
        self.completion_tokens = Counter("radar_completion_tokens", "Tokens generated", ["speculation"], registry=r)
        self.tau = Histogram("radar_tau", "Mean tokens per target call, per request", ["speculation"], registry=r,
                             buckets=(1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10))
        self.draft_calls = Histogram("radar_draft_calls_per_cycle", "Mean draft calls per cycle, per request",
                                     ["speculation"], registry=r, buckets=(0, 1, 2, 3, 4, 5, 6, 8, 12, 16))
        self.time_per_token = Histogram(
            "radar_time_per_token_seconds", "Decode time per generated token, per request", ["speculation"],
            registry=r, buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1))
        self.latency = Histogram("radar_request_latency_seconds", "Completion latency (queue + decode)", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.queue_wait = Histogram("radar_queue_wait_seconds", "Wait for the decoder", registry=r,
                                    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60))
        self.queue_depth = Gauge("radar_queue_depth", "Requests waiting for the decoder", registry=r)
        self.in_flight = Gauge("radar_in_flight", "Completion requests inside this replica (waiting or decoding)",
                               registry=r)
        self.timeouts = Counter("radar_timeouts", "Requests that hit the timeout", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---- the deployment ----------------------------------------------------------------------------------------


@dataclass
class Job:
    """One decode request as the worker thread sees it."""

    prompt_ids: list[int]
    method: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_commit: Optional[Callable[[list[int]], bool]] = None  # streaming: sees each cycle's tokens
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0


@dataclass
class Outcome:
    """A finished request: the text to return and everything the response reports."""

    text: str
    token_ids: list[int]  # all decoded tokens
    completion_tokens: int  # up to a stop-string cut
    finish_reason: str
    prompt_tokens: int
    speculation: dict


def load_decoder_for(cfg: ServeConfig):
    """The ModelPair for `cfg`, with a controller when one is given or bundled; returns (pair, radar_available)."""
    from radar.ops.models import BUNDLED_CONTROLLER, bundled_controller_available, load_decoder

    controller = cfg.controller
    if controller is None and not bundled_controller_available():
        log.warning("no --controller and no bundled controller at %s: method radar is unavailable", BUNDLED_CONTROLLER)
        pair = load_decoder(cfg.model, cfg.draft, device=cfg.device, dtype=cfg.dtype)
    else:
        pair = load_decoder(cfg.model, cfg.draft, controller or str(BUNDLED_CONTROLLER), device=cfg.device,
                            dtype=cfg.dtype)
    if cfg.tree_tokens is not None:
        from dataclasses import replace

        pair.tree = replace(pair.tree, total_tokens=cfg.tree_tokens)
    return pair, pair.stop_policy is not None and pair.draft is not None


class RadarServer:
    """One replica: the decoder, its worker thread, its metrics (deployed as `RadarDeployment`, see below)."""

    def __init__(self, cfg: ServeConfig):
        import torch

        self.cfg = cfg
        self.api_key = cfg.api_key or None
        threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
        torch.set_num_threads(threads)
        self.pair, self.radar_ok = load_decoder_for(cfg)
        self.model_name = cfg.model_name or ("radar-demo" if cfg.model is None else Path(cfg.model).name)
        self.speculation = cfg.speculation
        if cfg.speculation == "radar" and not self.radar_ok:
            self.speculation = FALLBACK_SPECULATION if self.pair.draft is not None else "off"
            log.warning("default speculation radar unavailable: using %s", self.speculation)
        self.context = self.pair.target.config.max_position_embeddings
        self.metrics = Metrics()
        # One worker thread = one decode at a time, FIFO (see the module docstring).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radar-decode",
                                           initializer=torch.set_num_threads, initargs=(threads,))
        self._current: Optional[Job] = None  # the job on the worker thread
        for model in (self.pair.target, self.pair.draft):
            if model is not None:
                model.register_forward_pre_hook(self._check_cancelled)
        self.created = int(time.time())
        global _replica
        _replica = self
        log.info("radar replica ready: model %s, default speculation %s", self.model_name, self.speculation)

    # ---- routes ----

    @api.get("/health")
    async def health(self) -> dict:
        """Liveness: 200 once the models are loaded (never needs the API key)."""
        return {"status": "ok", "model": self.model_name}

    @api.get("/v1/models")
    async def models(self) -> dict:
        """The one served model, OpenAI style, with the speculation choices as an extension."""
        methods = (["radar"] if self.radar_ok else []) + ([f"tree:1..{MAX_TREE_DEPTH}"] if self.pair.draft else [])
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "radar",
            "context_length": self.context, "speculation": {"default": self.speculation, "methods": methods + ["off"]},
        }]}

    @api.get("/metrics")
    async def prometheus(self) -> PlainTextResponse:
        """Prometheus text exposition of this replica's metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return PlainTextResponse(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        """OpenAI text completion of a raw prompt."""
        t0 = time.perf_counter()
        req = await self._parse(request, CompletionRequest)
        ids = await self._encode(lambda: self.pair.encode(req.prompt))
        return await self._respond(req, ids, t0, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI chat completion (messages rendered as described in the module docstring)."""
        t0 = time.perf_counter()
        req = await self._parse(request, ChatCompletionRequest)
        ids = await self._encode(lambda: render_chat(self.pair, req.messages))
        return await self._respond(req, ids, t0, chat=True)

    # ---- request handling ----

    async def _parse(self, request: Request, schema: type[BaseModel]):
        # Parsed by hand (not as a FastAPI body parameter) so any content type is read as JSON (curl -d works)
        # and every mistake gets one OpenAI-style 400 naming the field.
        try:
            req = schema.model_validate_json(await request.body())
        except ValidationError as exc:
            message, param = validation_message(exc)
            raise APIError(400, message, code="invalid_value", param=param) from None
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")
        return req

    async def _encode(self, encode: Callable[[], list[int]]) -> list[int]:
        try:  # in a helper thread: a long prompt must not stall the event loop (or queue behind a decode)
            ids = await asyncio.to_thread(encode)
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the model's context is {self.context} tokens "
                                "(prompt plus at least one new token)", code="context_length_exceeded")
        return ids

    def _method(self, speculation: Optional[str]) -> tuple[str, str]:
        name = speculation or self.speculation
        method = parse_speculation(name)
        if method != "ar" and self.pair.draft is None:
            raise APIError(400, f"speculation {name!r} needs a draft model, which this server has none of: "
                                "use 'off'", code="speculation_unavailable", param="speculation")
        if method == "radar" and not self.radar_ok:
            raise APIError(400, "speculation 'radar' needs a controller, which this server was started without: "
                                "use 'tree:D' or 'off' (or restart it with --controller)",
                           code="speculation_unavailable", param="speculation")
        return name, method

    async def _respond(self, req, ids: list[int], t0: float, chat: bool):
        name, method = self._method(req.speculation)
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        job = Job(ids, method, req.temperature, req.top_p, req.max_tokens, seed)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if req.stream:
            return await self._start_stream(rid, req, job, name, t0, chat)
        self.metrics.in_flight.inc()
        try:
            result = await self._run(job, deadline=t0 + self.cfg.timeout_s)
        finally:
            self.metrics.in_flight.dec()
        outcome = self._outcome(req, job, result, name)
        self._record(outcome, name, time.perf_counter() - t0)
        return self._body(rid, outcome, chat)

    async def _start_stream(self, rid: str, req, job: Job, name: str, t0: float, chat: bool):
        """Queue `job` with a commit callback; answer once its first tokens exist (errors before that keep their
        status code), then stream the rest."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()  # set by the stream when a stop string appeared or the client left

        def on_commit(ids: list[int]) -> bool:
            loop.call_soon_threadsafe(tokens.put_nowait, list(ids))
            return not stop.is_set()

        job.on_commit = on_commit
        self.metrics.in_flight.inc()
        decode = asyncio.ensure_future(self._run(job, deadline=t0 + self.cfg.timeout_s))
        first = asyncio.ensure_future(tokens.get())
        await asyncio.wait({decode, first}, return_when=asyncio.FIRST_COMPLETED)
        if decode.done() and decode.exception() is not None and not first.done():
            first.cancel()
            self.metrics.in_flight.dec()
            raise decode.exception()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = self._sse(rid, req, job, name, t0, chat, include_usage, decode, first, tokens, stop)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _run(self, job: Job, deadline: float):
        """Queue `job` on the decoder thread and wait for it until `deadline` (-> 504, and the job is cancelled)."""
        loop = asyncio.get_running_loop()
        self.metrics.queue_depth.inc()
        future = loop.run_in_executor(self.executor, self._decode, job)
        # Retrieve the exception of a future nobody waits for any more (timed out), so asyncio does not log it.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(deadline - time.perf_counter(), 0.0))
        except (asyncio.TimeoutError, TimeoutError):
            job.cancelled.set()
            self.metrics.timeouts.inc()
            raise APIError(504, f"the request did not finish within the server's timeout of {self.cfg.timeout_s:g}s "
                                "(lower max_tokens, or try again when the server is less busy)",
                           type="timeout_error", code="timeout") from None
        except asyncio.CancelledError:  # the client went away: stop decoding for it
            job.cancelled.set()
            raise
        except Cancelled:  # cancelled by the flag we set above in a race; same as a timeout
            raise APIError(504, "the request was cancelled", type="timeout_error", code="timeout") from None
        except ValueError as exc:  # the decoder's own checks (context, empty prompt): the caller's mistake
            raise APIError(400, str(exc), code="invalid_value") from None

    def _decode(self, job: Job):
        """Runs on the worker thread."""
        from radar.decoding.verify import Sampling

        self.metrics.queue_depth.dec()
        if job.cancelled.is_set():
            raise Cancelled()
        job.started = time.perf_counter()
        self._current = job
        try:
            return self.pair.generate(job.prompt_ids, job.method, Sampling(job.temperature, job.top_p),
                                      job.max_tokens, job.seed, on_commit=job.on_commit)
        finally:
            self._current = None

    def _check_cancelled(self, module, args) -> None:
        # Forward pre-hook on the target and draft: abandon a cancelled request at its next model call.
        job = self._current
        if job is not None and job.cancelled.is_set():
            raise Cancelled()

    def _outcome(self, req, job: Job, result, name: str) -> Outcome:
        s, ids = result.stats, result.token_ids
        text = self.pair.decode(ids)
        cut = cut_at_stop(text, req.stop_list)
        if cut is not None:
            text, reason = text[:cut], "stop"
            completion_tokens = tokens_covering(self.pair.decode, ids, text)
        else:
            reason, completion_tokens = ("stop" if s.finish_reason == "eos" else "length"), len(ids)
        lengths = s.accept_lengths or [1] * s.target_calls  # off: one token per target call
        spec = {
            "method": name, "tau": round(s.tau, 4), "draft_calls_per_cycle": round(s.mean_draft_calls, 4),
            "accept_lengths": {"mean": round(sum(lengths) / max(len(lengths), 1), 4), "min": min(lengths, default=0),
                               "max": max(lengths, default=0), "cycles": len(lengths)},
            "target_calls": s.target_calls, "generated_tokens": s.new_tokens, "decode_s": round(s.wall_s, 4),
            "queue_s": round(job.started - job.enqueued, 4),
        }
        return Outcome(text, ids, completion_tokens, reason, len(job.prompt_ids), spec)

    def _record(self, o: Outcome, name: str, latency: float) -> None:
        m, spec = self.metrics, o.speculation
        label = name  # radar, off or tree:D with D <= 16: a bounded label set
        m.prompt_tokens.labels(label).inc(o.prompt_tokens)
        m.completion_tokens.labels(label).inc(spec["generated_tokens"])
        m.tau.labels(label).observe(spec["tau"])
        if name != "off":
            m.draft_calls.labels(label).observe(spec["draft_calls_per_cycle"])
        if spec["generated_tokens"]:
            m.time_per_token.labels(label).observe(spec["decode_s"] / spec["generated_tokens"])
        m.latency.observe(latency)
        m.queue_wait.observe(spec["queue_s"])

    def _usage(self, o: Outcome) -> dict:
        return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                "total_tokens": o.prompt_tokens + o.completion_tokens}

    def _body(self, rid: str, o: Outcome, chat: bool) -> dict:
        head = {"id": rid, "created": int(time.time()), "model": self.model_name}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                      "finish_reason": o.finish_reason}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": self._usage(o),
                    "speculation": o.speculation}
        choice = {"index": 0, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
        return {**head, "object": "text_completion", "choices": [choice], "usage": self._usage(o),
                "speculation": o.speculation}

    async def _sse(self, rid: str, req, job: Job, name: str, t0: float, chat: bool, include_usage: bool,
                   decode: asyncio.Future, first: asyncio.Future, tokens: asyncio.Queue,
                   stop: threading.Event) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, one chunk per released piece of text as the decoder commits
        tokens, then the finish chunk (with the speculation statistics) and [DONE]."""
        head = {"id": rid, "created": int(time.time()), "model": self.model_name,
                "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: Optional[str], finish: Optional[str] = None, **extra) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"

        async def committed() -> AsyncIterator[list[int]]:
            # Every put happens before the decode's own completion is signalled to the loop, so once `decode` is
            # done the queue already holds the last tokens.
            nxt = first
            while True:
                await asyncio.wait({decode, nxt}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    while not tokens.empty():
                        yield tokens.get_nowait()
                    return
                yield nxt.result()
                nxt = asyncio.ensure_future(tokens.get())

        try:
            if chat:
                first_delta = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}
                yield f"data: {json.dumps({**head, 'choices': [first_delta]})}\n\n"
            detok = Detokenizer(self.pair.decode, req.stop_list)
            async for ids in committed():
                piece = detok.push(ids)
                if piece:
                    yield chunk(piece)
                if detok.stopped:
                    stop.set()  # the decoder ends after its current cycle
            try:
                result = await decode
            except APIError as exc:  # a timeout after the response started: end the stream with the error
                error = {"message": exc.message, "type": exc.type, "code": exc.code, "param": exc.param}
                yield f"data: {json.dumps({'error': error})}\n\n"
                yield "data: [DONE]\n\n"
                return
            tail = detok.finish()
            if tail:
                yield chunk(tail)
            outcome = self._outcome(req, job, result, name)
            self._record(outcome, name, time.perf_counter() - t0)
            yield chunk(None, outcome.finish_reason, speculation=outcome.speculation)
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': self._usage(outcome)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not decode.done():  # the client went away mid-stream
                job.cancelled.set()
            self.metrics.in_flight.dec()


# The class stays importable under its own name, so Ray pickles it by reference and replicas run this module's
# code with its real globals (a class decorated in place is shipped by value, with a partial copy of them).
RadarDeployment = serve.deployment(name="RadarServer")(serve.ingress(api)(RadarServer))


def render_chat(pair, messages: list[ChatMessage]) -> list[int]:
    """Prompt token ids for a conversation (`ModelPair.chat_ids`; OpenAI's developer role is a system message)."""
    return pair.chat_ids([{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                          for m in messages])


# ---- building and running ----------------------------------------------------------------------------------


def build_app(config: "ServeConfig | dict | None" = None) -> Application:
    """The Serve application for `config`: `serve.run(build_app(cfg), route_prefix=cfg.route_prefix)`."""
    cfg = config if isinstance(config, ServeConfig) else ServeConfig.model_validate(config or {})
    # Resolved here (the driver, or Serve's controller for `serve deploy`), so replicas need no environment.
    # api_key None means "from $RADAR_API_KEY"; an empty string means "no key" even when the variable is set.
    key = cfg.api_key if cfg.api_key is not None else os.environ.get("RADAR_API_KEY")
    cfg = cfg.model_copy(update={"api_key": key or ""})
    return RadarDeployment.options(
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        max_constructor_retry_count=cfg.max_constructor_retry_count,
    ).bind(cfg)


def app_builder(args: dict) -> Application:
    """Builder for a Serve config file: `import_path: radar.serve.app:app_builder`, `args:` = ServeConfig fields."""
    return build_app(ServeConfig.model_validate(args or {}))


def run(cfg: ServeConfig) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port and deploy the app; returns its base URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def startup_error(app_name: str) -> Optional[str]:
    """The last line of a failed deployment's message (its exception), after serve.run raised; None if unknown."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - only a nicer message is at stake
        return None
    for d in (app.deployments.values() if app else []):
        lines = [line.strip() for line in (d.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return None


def config_fields_from_file(path: "str | Path") -> dict:
    """ServeConfig fields from a YAML file: either the fields themselves, or a Serve config file (the first
    application's `args` and `route_prefix`, and `http_options` host/port), like serve_config.yaml."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    if "applications" not in doc:
        return dict(doc)
    apps = doc["applications"] or []
    if not apps:
        raise ValueError(f"{path}: no applications")
    fields = dict(apps[0].get("args") or {})
    if apps[0].get("route_prefix"):
        fields.setdefault("route_prefix", apps[0]["route_prefix"])
    if apps[0].get("name"):
        fields.setdefault("app_name", apps[0]["name"])
    http = doc.get("http_options") or {}
    fields.update({k: http[k] for k in ("host", "port") if k in http and k not in fields})
    return fields
