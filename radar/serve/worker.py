"""The replica's decoder: one request at a time on one worker thread, with a deadline and cancellation.

The decoder is batch size 1 and its GPU/CPU work does not overlap, so two decodes at once would only slow both
down; a one-thread executor (which is also the FIFO queue) keeps per-request latency predictable and
tau/time-per-token meaningful, while the event loop stays free for /health and /metrics. Nothing is shared
between requests: every request gets its own KV caches, drafter state, random generator and a fresh stop policy
(`ModelPair.generate` builds one from the request's seed). Scale throughput with replicas, not concurrency.

The timeout covers the wait in the queue and the decode. On timeout the caller gets 504 and the request is
cancelled: a forward pre-hook on the target and draft raises at the next model call, so a timed-out (or
disconnected) request frees the decoder within one forward instead of running to the end.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radar.decoding.methods import Method
from radar.serve.errors import APIError
from radar.serve.metrics import Metrics

if TYPE_CHECKING:
    from radar.decoding.pair import ModelPair
    from radar.decoding.session import GenerationResult


class Cancelled(Exception):
    """Raised inside the decoder thread to abandon a request (timed out or client gone)."""


@dataclass
class Job:
    """One decode request as the worker thread sees it."""

    prompt_ids: list[int]
    method: Method
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_commit: Callable[[list[int]], bool] | None = None  # streaming: sees each cycle's tokens
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0


class DecodeWorker:
    """Runs the jobs of one ModelPair one at a time, first come first served."""

    def __init__(self, pair: ModelPair, threads: int, timeout_s: float, metrics: Metrics):
        import torch

        self.pair, self.timeout_s, self.metrics = pair, timeout_s, metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radar-decode",
                                           initializer=torch.set_num_threads, initargs=(threads,))
        self._current: Job | None = None  # the job on the worker thread
        for model in (pair.target, pair.draft):
            if model is not None:
                model.register_forward_pre_hook(self._check_cancelled)

    async def run(self, job: Job, t0: float) -> GenerationResult:
        """Queue `job` and wait for its GenerationResult until `timeout_s` after `t0` (then 504, job cancelled)."""
        loop = asyncio.get_running_loop()
        self.metrics.queue_depth.inc()
        future = loop.run_in_executor(self.executor, self._decode, job)
        # Retrieve the exception of a future nobody waits for any more (timed out), so asyncio does not log it.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(t0 + self.timeout_s - time.perf_counter(), 0.0))
        except (asyncio.TimeoutError, TimeoutError):
            job.cancelled.set()
            self.metrics.timeouts.inc()
            raise APIError(504, f"the request did not finish within the server's timeout of {self.timeout_s:g}s "
                                "(lower max_tokens, or try again when the server is less busy)",
                           type="timeout_error", code="timeout") from None
        except asyncio.CancelledError:  # the client went away: stop decoding for it
            job.cancelled.set()
            raise
        except Cancelled:  # cancelled by the flag we set above in a race; same as a timeout
            raise APIError(504, "the request was cancelled", type="timeout_error", code="timeout") from None
        except ValueError as exc:  # the decoder's own checks (context, empty prompt): the caller's mistake
            raise APIError(400, str(exc), code="invalid_value") from None

    def _decode(self, job: Job) -> GenerationResult:
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


class Commits:
    """Committed tokens crossing from the worker thread to the event loop, for one streamed job; `stop` goes the
    other way (set it and the decoder ends after its current cycle)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[int]] = asyncio.Queue()
        self.stop = threading.Event()
        self.next = asyncio.ensure_future(self.queue.get())

    def on_commit(self, ids: list[int]) -> bool:
        """The decoder's callback (worker thread): hand the tokens over; False asks it to stop."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, list(ids))
        return not self.stop.is_set()

    async def first(self, decode: asyncio.Future) -> None:
        """Wait until the first tokens exist or `decode` has ended; raise its error if it failed before any
        token."""
        await asyncio.wait({decode, self.next}, return_when=asyncio.FIRST_COMPLETED)
        if decode.done() and decode.exception() is not None and not self.next.done():
            self.next.cancel()
            raise decode.exception()

    async def until_done(self, decode: asyncio.Future) -> AsyncIterator[list[int]]:
        """Each commit's tokens, until `decode` has ended."""
        # Every put happens before the decode's own completion is signalled to the loop, so once `decode` is done
        # the queue already holds the last tokens.
        while True:
            await asyncio.wait({decode, self.next}, return_when=asyncio.FIRST_COMPLETED)
            if not self.next.done():
                self.next.cancel()
                while not self.queue.empty():
                    yield self.queue.get_nowait()
                return
            yield self.next.result()
            self.next = asyncio.ensure_future(self.queue.get())
