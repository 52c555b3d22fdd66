"""One replica of the Serve deployment: its HTTP routes, request checks and OpenAI responses.

Routes (under the route prefix): POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Requests enter the replica concurrently (up to `max_ongoing_requests`; beyond that they wait in Serve's router,
up to `max_queued_requests`, then 503) and queue for the replica's one decoder (`radar.serve.worker`). A request
without `seed` samples with a random one.

A streamed request hands each cycle's committed tokens from the decoder to the event loop, and they go out as
OpenAI chunks as soon as they are decoded to text (`radar.serve.streaming`). The response starts once the first
tokens exist, so a request that times out in the queue still gets a 504; a timeout after that ends the stream
with an error event. When a stop string appears, or the client goes away, the decoder is told to stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from radar.decoding.methods import Method
from radar.serve.config import ServeConfig
from radar.serve.errors import APIError, api_error_handler, validation_message
from radar.serve.guard import Guard, route_error_handler
from radar.serve.metrics import Metrics
from radar.serve.protocol import (
    DEFAULT_MAX_TOKENS,
    MAX_TREE_DEPTH,
    SSE_DONE,
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelCard,
    ModelList,
    Speculation,
    SpeculationChoices,
    parse_speculation,
    sse,
)
from radar.serve.responses import Outcome, chat_logprobs, completion_logprobs, outcome
from radar.serve.streaming import Detokenizer
from radar.serve.worker import Commits, DecodeWorker, Job

if TYPE_CHECKING:
    from radar.decoding.pair import ModelPair
    from radar.decoding.session import GenerationResult

log = logging.getLogger("ray.serve")

Req = CompletionRequest | ChatCompletionRequest
def load_pair_for(cfg: ServeConfig) -> tuple[ModelPair, bool]:
    """The ModelPair for `cfg`, with the given or bundled controller when it has a draft; returns (pair,
    radar_available). A bundled controller missing from the installation is an error, not a quiet fallback."""
    from radar.ops.models import attach_controller, load_pair, model_paths

    target, draft = model_paths(cfg.model, cfg.draft)
    pair = load_pair(target, draft, device=cfg.device, dtype=cfg.dtype, tree_tokens=cfg.tree_tokens)
    if pair.draft is not None:
        attach_controller(pair, cfg.controller)
    return pair, pair.draft is not None


def json_response(body: BaseModel) -> JSONResponse:
    """A 200 response with `body` as JSON."""
    return JSONResponse(body.model_dump(mode="json"))


class RadarServer:
    """One replica: the decoder, its worker thread, its metrics and its FastAPI app (deployed by radar.serve.app)."""

    def __init__(self, cfg: ServeConfig):
        import torch

        self.cfg = cfg
        threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
        torch.set_num_threads(threads)
        self.pair, self.radar_ok = load_pair_for(cfg)
        self.model_name = cfg.served_model_name
        self.speculation = cfg.speculation
        if cfg.speculation == "radar" and not self.radar_ok:
            self.speculation = "off"  # a target without a draft has nothing to speculate with
            log.warning("no draft model: default speculation off")
        self.context = self.pair.target.config.max_position_embeddings
        self.metrics = Metrics()
        self.worker = DecodeWorker(self.pair, threads, cfg.timeout_s, self.metrics, max_batch=cfg.max_batch_size,
                                   max_queue=cfg.max_queue, load_aware=cfg.load_aware)
        self.created = int(time.time())
        log.info("radar replica ready: model %s, default speculation %s", self.model_name, self.speculation)

    def check_health(self) -> None:
        """Serve's health probe: a replica whose batch has made no progress for `stuck_s` is restarted."""
        stalled = self.worker.stalled_s()
        if stalled > self.cfg.stuck_s:
            raise RuntimeError(f"the decode batch has made no progress for {stalled:.0f}s")

    def __del__(self) -> None:
        # Serve stops sending requests, waits up to graceful_shutdown_timeout_s for those in flight, then this.
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.shutdown()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The replica's ASGI app (Serve calls this after the constructor, see `serve.ingress`)."""
        api = FastAPI(title="RADAR speculative decoding", version="1", docs_url="/docs", redoc_url=None)
        routes = [("GET", "/health", self.health), ("GET", "/v1/models", self.models),
                  ("GET", "/metrics", self.prometheus), ("POST", "/v1/completions", self.completions),
                  ("POST", "/v1/chat/completions", self.chat_completions)]
        for method, path, endpoint in routes:
            api.add_api_route(path, endpoint, methods=[method], response_model=None)  # bodies are built here
        api.add_exception_handler(APIError, api_error_handler)
        api.add_exception_handler(HTTPException, route_error_handler)
        api.add_middleware(Guard, routes=frozenset(path for _, path, _ in routes), api_key=self.cfg.api_key or None,
                           max_body_bytes=self.cfg.max_body_bytes, count=self.metrics.count_request,
                           body_timeout_s=self.cfg.body_timeout_s)
        return api

    # ---- routes ----

    async def health(self) -> JSONResponse:
        """Liveness: 200 once the models are loaded (never needs the API key)."""
        return json_response(Health(model=self.model_name))

    async def models(self) -> JSONResponse:
        """The one served model, OpenAI style, with the speculation choices as an extension."""
        methods = (["radar"] if self.radar_ok else []) + ([f"tree:1..{MAX_TREE_DEPTH}"] if self.pair.draft else [])
        card = ModelCard(id=self.model_name, created=self.created, context_length=self.context,
                         speculation=SpeculationChoices(default=self.speculation, methods=methods + ["off"]))
        return json_response(ModelList(data=[card]))

    async def prometheus(self) -> PlainTextResponse:
        """Prometheus text exposition of this replica's metrics."""
        self.metrics.batch_size.set(self.worker.rendezvous.members)
        return PlainTextResponse(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, request: Request) -> JSONResponse | StreamingResponse:
        """OpenAI text completion of a raw prompt."""
        t0 = time.perf_counter()
        req = await self._parse(request, CompletionRequest)
        ids = await self._encode(lambda: self.pair.encode(req.prompt))
        return await self._respond(req, ids, t0, chat=False)

    async def chat_completions(self, request: Request) -> JSONResponse | StreamingResponse:
        """OpenAI chat completion of a conversation (`ModelPair.chat_ids` renders it)."""
        t0 = time.perf_counter()
        req = await self._parse(request, ChatCompletionRequest)
        ids = await self._encode(lambda: self.pair.chat_ids(req.conversation()))
        return await self._respond(req, ids, t0, chat=True)

    # ---- request handling ----

    async def _parse(self, request: Request, schema: type[Req]) -> Req:
        # Parsed by hand (not as a FastAPI body parameter) so any content type is read as JSON (curl -d works)
        # and every mistake gets one OpenAI-style 400 naming the field.
        try:
            req = schema.model_validate_json(await request.body())
        except ValidationError as exc:
            message, param = validation_message(exc)
            raise APIError(400, message, code="invalid_value", param=param) from None
        refused = req.refused()
        if refused is None and req.stream and req.top_logprobs_count is not None:
            refused = ("logprobs", "logprobs are not streamed by this server; ask without stream")
        if refused is None and getattr(req, "echo", False) and req.top_logprobs_count is not None:
            refused = ("echo", "echo with logprobs would need the prompt's logprobs, which this server does not return")
        if refused is not None:
            raise APIError(400, refused[1], code="unsupported_parameter", param=refused[0])
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")
        return req

    async def _encode(self, encode: Callable[[], list[int]]) -> list[int]:
        try:  # in a helper thread: a long prompt must not stall the event loop (or queue behind a decode)
            ids = await asyncio.to_thread(encode)
        except ValueError as exc:  # an empty prompt, a chat template refusing the messages
            raise APIError(400, str(exc), code="invalid_value") from None
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the model's context is {self.context} tokens "
                                "(prompt plus at least one new token)", code="context_length_exceeded")
        return ids

    def _max_tokens(self, req: Req, prompt_tokens: int) -> int:
        """The tokens to generate: what the request asks if the context has room for it (else 400), or the
        default cut to what the context leaves."""
        room, asked = self.context - prompt_tokens, req.requested_tokens
        if asked is None:
            return min(DEFAULT_MAX_TOKENS, room)
        if asked > room:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"the prompt is {prompt_tokens} tokens and {name} is {asked}, but the model's "
                                f"context is {self.context} tokens: ask for at most {room}",
                           code="context_length_exceeded", param=name)
        return asked

    def _method(self, speculation: str | None) -> Method:
        name = speculation or self.speculation
        method = parse_speculation(name)
        if method.speculative and self.pair.draft is None:
            raise APIError(400, f"speculation {name!r} needs a draft model, which this server has none of: "
                                "use 'off'", code="speculation_unavailable", param="speculation")
        return method

    @staticmethod
    def _request_id(chat: bool) -> str:
        """The response id: Serve's request id (its X-Request-Id response header) behind OpenAI's prefix."""
        try:
            from ray.serve.context import _get_serve_request_context

            rid = _get_serve_request_context().request_id
        except Exception:  # noqa: BLE001 - outside Serve (or a Serve without it): a fresh id
            rid = ""
        return ("chatcmpl-" if chat else "cmpl-") + (rid or uuid.uuid4().hex)

    async def _respond(self, req: Req, ids: list[int], t0: float, chat: bool) -> JSONResponse | StreamingResponse:
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        job = Job(ids, self._method(req.speculation), req.sampling_temperature, req.nucleus,
                  self._max_tokens(req, len(ids)), seed, logprobs=req.top_logprobs_count)
        rid = self._request_id(chat)
        if req.stream:
            return await self._start_stream(rid, req, job, t0, chat)
        if req.stop_list:  # stop decoding where a stop string appears, not at max_tokens
            job.on_commit = Detokenizer(self.pair.tokenizer, req.stop_list).push_stops
        self.metrics.in_flight.inc()
        try:
            result = await self.worker.run(job, t0)
        finally:
            self.metrics.in_flight.dec()
        o = self._finish(req, job, result, t0)
        head = {"id": rid, "created": int(time.time()), "model": self.model_name}
        n = req.top_logprobs_count
        if chat:
            lp = chat_logprobs(self.pair.decode, result, o.tokens) if n is not None else None
            choice = ChatChoice(message=ChatChoiceMessage(content=o.text), finish_reason=o.finish_reason, logprobs=lp)
            body = ChatCompletionResponse(**head, choices=[choice], usage=o.usage, speculation=o.speculation)
        else:
            lp = completion_logprobs(self.pair.decode, result, o.tokens) if n is not None else None
            text = (req.prompt if req.echo else "") + o.text
            choice = CompletionChoice(text=text, finish_reason=o.finish_reason, logprobs=lp)
            body = CompletionResponse(**head, choices=[choice], usage=o.usage, speculation=o.speculation)
        return json_response(body)

    def _finish(self, req: Req, job: Job, result: GenerationResult, t0: float) -> Outcome:
        """The outcome of a finished decode (its text cut at the first stop string), recorded in the metrics."""
        o = outcome(self.pair.decode, req.stop_list, job, result)
        self.metrics.record(o.usage.prompt_tokens, o.speculation, time.perf_counter() - t0, result.stats)
        return o

    # ---- streaming ----

    async def _start_stream(self, rid: str, req: Req, job: Job, t0: float, chat: bool) -> StreamingResponse:
        """Queue `job` with a commit callback; answer once its first tokens exist (errors before that keep their
        status code), then stream the rest."""
        commits = Commits()
        job.on_commit = commits.on_commit
        self.metrics.in_flight.inc()
        decode = asyncio.ensure_future(self.worker.run(job, t0))
        try:
            await commits.first(decode)
        except BaseException:  # failed, or the client left before the first token: stop its decode too
            job.cancelled.set()
            decode.cancel()
            self.metrics.in_flight.dec()
            raise
        events = self._events(rid, req, job, t0, chat, decode, commits)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, rid: str, req: Req, job: Job, t0: float, chat: bool, decode: asyncio.Future,
                      commits: Commits) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, one chunk per released piece of text as the decoder commits
        tokens, then the finish chunk (with the speculation statistics), the usage chunk if asked for, [DONE]."""
        head = {"id": rid, "created": int(time.time()), "model": self.model_name}
        try:
            if chat:
                yield sse(ChatCompletionChunk(**head, choices=[ChatChunkChoice(delta=ChatDelta(role="assistant",
                                                                                              content=""))]))
            elif req.echo:
                yield sse(self._chunk(head, chat, req.prompt))
            detok = Detokenizer(self.pair.tokenizer, req.stop_list)
            async for ids in commits.until_done(decode):
                piece = detok.push(ids)
                if piece:
                    yield sse(self._chunk(head, chat, piece))
                if detok.stopped:
                    commits.stop.set()
            try:
                result = await decode
            except APIError as exc:  # a timeout after the response started: end the stream with the error
                yield sse(exc.body)
                yield SSE_DONE
                return
            tail = detok.finish()
            if tail:
                yield sse(self._chunk(head, chat, tail))
            o = self._finish(req, job, result, t0)
            yield sse(self._chunk(head, chat, None, o.finish_reason, o.speculation))
            if req.stream_options and req.stream_options.include_usage:
                yield sse((ChatCompletionChunk if chat else CompletionChunk)(**head, choices=[], usage=o.usage))
            yield SSE_DONE
        finally:
            if not decode.done():  # the client went away mid-stream
                job.cancelled.set()
            self.metrics.in_flight.dec()

    @staticmethod
    def _chunk(head: dict, chat: bool, text: str | None, finish: str | None = None,
               speculation: Speculation | None = None) -> BaseModel:
        """A chunk of new text (None: the finish chunk, which has no text)."""
        if chat:
            choice = ChatChunkChoice(delta=ChatDelta(content=text), finish_reason=finish)
            return ChatCompletionChunk(**head, choices=[choice], speculation=speculation)
        choice = CompletionChoice(text=text or "", finish_reason=finish)
        return CompletionChunk(**head, choices=[choice], speculation=speculation)
