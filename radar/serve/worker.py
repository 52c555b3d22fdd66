"""The replica's decoder: up to `max_batch` requests decode together (continuous batching), the rest wait in a
bounded queue; a deadline and cancellation for each.

Each admitted request decodes on a thread of its own through `ModelPair.generate`, with its own KV caches,
drafter state, random generator, stop policy and stop strings; their model calls meet in one
`radar.decoding.batching.Rendezvous` and run as one packed forward per model, so requests join and leave between
cycles and greedy output equals the single-request output. With `max_batch` 1 this is a FIFO of one decoder.
Speculative requests get a `LoadAware` stop policy over the verification curve measured when the replica
starts: their trees shrink as the batch grows (none at all when no node pays).

Admission: a request that finds `max_batch` decoding and `max_queue` waiting is refused at once with 429 (and a
Retry-After), instead of waiting into its timeout. The timeout covers the wait and the decode; on timeout the
caller gets 504 and the request is cancelled, like one whose client went away: its next model call raises, so it
leaves the batch within one cycle.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radar.decoding.batching import LoadAware, Rendezvous, measure_verify_curve
from radar.decoding.methods import Method
from radar.decoding.verify import Sampling
from radar.serve.errors import APIError
from radar.serve.metrics import Metrics

if TYPE_CHECKING:
    from radar.decoding.pair import ModelPair
    from radar.decoding.session import GenerationResult


class Cancelled(Exception):
    """Raised inside a decode thread to abandon a request (timed out or client gone)."""


@dataclass
class Job:
    """One decode request as its decode thread sees it."""

    prompt_ids: list[int]
    method: Method
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_commit: Callable[[list[int]], bool] | None = None  # sees each cycle's tokens; False stops the decode
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    logprobs: int | None = None  # alternatives per token to report (None: no logprobs)
    queued: bool = True  # still counted as waiting
    generated: int = 0  # tokens committed so far


class DecodeWorker:
    """Runs the jobs of one ModelPair, up to `max_batch` at once in one batch, `max_queue` more waiting."""

    def __init__(self, pair: ModelPair, threads: int, timeout_s: float, metrics: Metrics, max_batch: int = 16,
                 max_queue: int = 64, load_aware: bool = True):
        import torch

        self.timeout_s, self.metrics, self.max_batch, self.max_queue = timeout_s, metrics, max_batch, max_queue
        self.executor = ThreadPoolExecutor(max_workers=max_batch, thread_name_prefix="radar-decode",
                                           initializer=torch.set_num_threads, initargs=(threads,))
        self.rendezvous = Rendezvous(pair.target)
        self._local = threading.local()  # the job on each decode thread
        self.pair = pair.batched(self.rendezvous, self._guard)
        # Load awareness only acts in a batch of two or more: a FIFO replica need not time the curve at start-up.
        aware = load_aware and pair.draft is not None and max_batch > 1
        self.curve = measure_verify_curve(pair.target) if aware else None
        if pair.stop_policy is not None:  # loads the controller's compiled decision step now, not in a request
            pair.stop_policy(0, Sampling())
        self.waiting = 0  # admitted, not decoding yet
        self._lock = threading.Lock()
        self.draining = False

    async def run(self, job: Job, t0: float) -> GenerationResult:
        """Queue `job` and wait for its GenerationResult until `timeout_s` after `t0` (then 504, job cancelled);
        429 at once when the queue is full, 503 while the replica drains."""
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", "server_error",
                           "shutting_down", headers={"Retry-After": "1"})
        if self.waiting >= self.max_queue and self.rendezvous.members >= self.max_batch:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at capacity ({self.max_batch} decoding, {self.waiting} waiting); "
                                "retry shortly", "rate_limit_error", "server_busy", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        with self._lock:
            self.waiting += 1
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
        finally:
            if not job.started:  # it may never reach a decode thread (timed out or cancelled in the queue)
                self._dequeue(job)

    def _dequeue(self, job: Job) -> None:
        with self._lock:
            if not job.queued:
                return
            job.queued = False
            self.waiting -= 1
        self.metrics.queue_depth.dec()

    def _decode(self, job: Job) -> GenerationResult:
        """Runs on a decode thread."""
        job.started = time.perf_counter()
        self._dequeue(job)
        if job.cancelled.is_set():
            raise Cancelled()
        sampling = Sampling(job.temperature, job.top_p)
        policy = None
        if job.method.speculative:
            policy = self.pair.stop_rule(job.method, sampling, job.seed)
            if self.curve is not None:
                policy = LoadAware(policy, self.rendezvous, self.curve)
        self._local.job = job
        with self.rendezvous.member():
            try:
                return self.pair.generate(job.prompt_ids, job.method, sampling, job.max_tokens, job.seed,
                                          policy=policy, on_commit=lambda ids: self._commit(job, ids),
                                          logprobs=job.logprobs)
            finally:
                self._local.job = None
                if job.cancelled.is_set():  # timed out or its client left: how far it got before it stopped
                    self.metrics.abandoned.inc()
                    self.metrics.abandoned_tokens.inc(job.generated)

    def _commit(self, job: Job, ids: list[int]) -> bool:
        self.rendezvous.committed(len(ids))
        job.generated += len(ids)
        if job.cancelled.is_set():
            return False
        return job.on_commit(ids) is not False if job.on_commit is not None else True

    def _guard(self) -> None:
        # Before every model call of a decode thread: abandon a cancelled request there.
        job = getattr(self._local, "job", None)
        if job is not None and job.cancelled.is_set():
            raise Cancelled()

    def stalled_s(self) -> float:
        """Seconds the batch has gone without finishing a forward while it has members (0 when idle)."""
        if not self.rendezvous.members:
            return 0.0
        return time.perf_counter() - self.rendezvous.last_progress

    def shutdown(self) -> None:
        """Refuse new requests (503); the ones in flight finish."""
        self.draining = True
        self.executor.shutdown(wait=False)


class Commits:
    """Committed tokens crossing from a decode thread to the event loop, for one streamed job; `stop` goes the
    other way (set it and the decoder ends after its current cycle)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[int]] = asyncio.Queue()
        self.stop = threading.Event()
        self.next = asyncio.ensure_future(self.queue.get())

    def on_commit(self, ids: list[int]) -> bool:
        """The decoder's callback (decode thread): hand the tokens over; False asks it to stop."""
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
