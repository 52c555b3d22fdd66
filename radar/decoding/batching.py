"""Continuous batching: concurrent decodes, each on its own thread through the unchanged decoding loop, whose
model calls meet and run as packed forwards.

Every request runs `ModelPair.generate` as it would alone, with its own caches, tree, stop policy, random
generator and stop rules; only its target and draft are `BatchedModel`s, which hand each call to a `Rendezvous`.
When every member decode is waiting in a model call, the last to arrive runs the draft calls as one packed
forward (`radar.decoding.packed`), or, once every member waits on the target, all their verifications (or
prefills) as one; then it wakes the others. Draft calls going first keeps the members in step: one target
forward per cycle, with only cheap draft forwards in between. A request joins by entering `member()` and leaves
when its decode ends, so requests join and leave between cycles, and nothing crosses between them but weights.

Load awareness, in two parts, both measured rather than scheduled by hand:
- `LoadAware` wraps a request's stop policy. A tree node is worth verifying in a batch when the tokens it is
  expected to yield (the drafter's path probability, exp of its cumulative log-prob) exceed what the batch makes
  in the time the node costs: the batch's tokens/s times the verification curve's slope at the tokens the batch
  verifies (`measure_verify_curve`, run on the replica). So trees shrink as the batch grows.
- `DraftOrNot` decides whether drafting pays at all at a batch size: it measures the batch's tokens/s with
  drafting and with roots only (no speculation), keeps the faster and re-checks now and then. On a CPU, where a
  verification is compute-bound from a few tokens, a large batch runs without speculation; alone, a request
  always keeps its policy's own choices, which its cost model priced for batch size 1.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from radar.decoding.arms import DraftOrNot, RequestGate
from radar.decoding.packed import packed_forward, packed_head_forward
from radar.decoding.session import GenerationStats


@dataclass(eq=False)
class _Call:
    model: object
    run: Callable[[object, list[dict]], list]
    args: dict
    done: bool = False
    result: object = None
    error: BaseException | None = None


class Rendezvous:
    """Where the model calls of the member decodes meet; one packed forward per model when all are waiting."""

    def __init__(self, target: torch.nn.Module | None = None):
        self.target = target  # whose forwards are verifications (the rest are draft calls)
        self._cond = threading.Condition()
        self._members = 0
        self.joins = 0  # members that ever joined: a decode that saw it unchanged ran alone
        self._pending: list[_Call] = []
        self._running = False
        self._commits: deque[tuple[float, int]] = deque()  # (time, tokens) of recent commits, for `rate`
        self.target_tokens = 0  # rows in the latest packed target forward
        self.arms = DraftOrNot()
        self._since_verify = [time.perf_counter(), 0]  # when the last verification ended, tokens committed since
        self.last_progress = time.perf_counter()  # when the latest forward ended (or a member joined)
        self.forwards = 0  # packed forwards run
        self.calls = 0  # model calls they held

    @property
    def members(self) -> int:
        """Decodes in the batch now."""
        return self._members

    @contextmanager
    def member(self) -> Iterator[None]:
        """Take part in the batch for the duration (one decode)."""
        with self._cond:
            if not self._members:
                self.last_progress = time.perf_counter()
            self._members += 1
            self.joins += 1
        try:
            yield
        finally:
            with self._cond:
                self._members -= 1
                batch = self._take()
            self._run(batch)

    def call(self, model: object, run: Callable[[object, list[dict]], list], args: dict):
        """`run(model, [args])[0]`, computed together with the other members' calls."""
        call = _Call(model, run, args)
        with self._cond:
            self._pending.append(call)
            batch = self._take()
        self._run(batch)
        with self._cond:
            while not call.done:
                self._cond.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def committed(self, tokens: int) -> None:
        """A member committed `tokens` (for the batch's tokens/s)."""
        now = time.perf_counter()
        with self._cond:
            self._since_verify[1] += tokens
            self._commits.append((now, tokens))
            while self._commits and self._commits[0][0] < now - 2.0:
                self._commits.popleft()

    def rate(self) -> float:
        """Tokens per second the batch committed over the last two seconds (0 before any)."""
        with self._cond:
            if len(self._commits) < 2:
                return 0.0
            span = self._commits[-1][0] - self._commits[0][0]
            return sum(n for _, n in list(self._commits)[1:]) / span if span > 0 else 0.0

    def _take(self) -> list[_Call]:
        # Under the lock: the calls to run now, if every member is waiting and none is being run. Draft calls go
        # first and verifications wait for them: so every member's verification lands in one target forward
        # per cycle, and the rounds in between are draft forwards only, the cheap ones.
        if self._running or not self._pending or len(self._pending) < self._members:
            return []
        drafts = [c for c in self._pending if not self._is_target(c)]
        batch = drafts or self._pending
        self._pending = [c for c in self._pending if self._is_target(c)] if drafts else []
        self._running = True
        return batch

    def _is_target(self, call: _Call) -> bool:
        return call.model is self.target if self.target is not None else call.run is packed_forward

    def _run(self, batch: list[_Call]) -> None:
        while batch:
            groups: dict[int, list[_Call]] = {}
            for c in batch:
                groups.setdefault(id(c.model), []).append(c)
            for calls in groups.values():
                self._run_group(calls)
            with self._cond:
                self.forwards += len(groups)
                self.calls += len(batch)
                self.last_progress = time.perf_counter()
                for c in batch:
                    c.done = True
                self._running = False
                batch = self._take()  # calls that arrived meanwhile, from members that left meanwhile
                self._cond.notify_all()

    def _run_group(self, calls: list[_Call]) -> None:
        try:
            results = calls[0].run(calls[0].model, [c.args for c in calls])
        except Exception as exc:  # noqa: BLE001 - one bad call (a cache overflow) must fail alone: run one by one
            if len(calls) == 1:
                calls[0].error = exc
                return
            for c in calls:
                self._run_group([c])
            return
        for c, r in zip(calls, results):
            c.result = r
        if self._is_target(calls[0]):
            self.target_tokens = sum(c.args["input_ids"].shape[1] for c in calls)
            now = time.perf_counter()
            with self._cond:  # one batch cycle ended: what it yielded per second, for the arm it ran under
                (last, committed), self._since_verify = self._since_verify, [now, 0]
            # A cycle that also prefilled a newcomer's prompt (last_only) is slow whichever arm ran: crediting it
            # would mostly measure when requests arrive, so it is left out.
            if committed and not any(c.args.get("last_only") for c in calls):
                self.arms.observe(self._members, committed / max(now - last, 1e-6))


class BatchedModel:
    """A model whose calls go through a `Rendezvous`; everything else is the wrapped model's. `guard()` runs
    before every call (it raises to abandon a cancelled request)."""

    def __init__(self, model: torch.nn.Module, rendezvous: Rendezvous, guard: Callable[[], None] | None = None):
        from radar.decoding.eagle3 import Eagle3Head

        self.wrapped, self.rendezvous, self.guard = model, rendezvous, guard
        self._run = packed_head_forward if isinstance(model, Eagle3Head) else packed_forward
        self._signature = inspect.signature(model.forward)

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)

    def __call__(self, *args, **kwargs):
        if self.guard is not None:
            self.guard()
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return self.rendezvous.call(self.wrapped, self._run, dict(bound.arguments))


@dataclass
class VerifyCurve:
    """Seconds of one packed target forward by the tokens it verifies (measured points, linear in between and
    beyond)."""

    tokens: list[int]
    seconds: list[float]

    def __call__(self, t: float) -> float:
        pts = list(zip(self.tokens, self.seconds))
        for (t0, s0), (t1, s1) in zip(pts, pts[1:]):
            if t <= t1 or (t1, s1) == pts[-1]:
                return s0 + (s1 - s0) * (t - t0) / (t1 - t0)
        return self.seconds[0]

    def slope(self, t: float) -> float:
        """Seconds one more verified token adds at `t` tokens."""
        return max(self(t + 1) - self(t), 0.0)


@torch.inference_mode()
def measure_verify_curve(target: torch.nn.Module, sizes: tuple[int, ...] = (1, 4, 16, 64), context: int = 128,
                         repeats: int = 3) -> VerifyCurve:
    """Time one forward of t new tokens after `context` cached ones, for each t (best of `repeats`); monotone."""
    from radar.decoding.session import sync

    cache = target.new_cache(context + max(sizes))
    device = target.device
    target(torch.ones(1, context, dtype=torch.long, device=device), cache=cache, last_only=True)
    seconds = []
    for t in sizes:
        best = math.inf
        for _ in range(repeats):
            cache.length = context
            start = time.perf_counter()
            target(torch.ones(1, t, dtype=torch.long, device=device), cache=cache)
            sync(device)
            best = min(best, time.perf_counter() - start)
        seconds.append(max([best, *seconds[-1:]]))
    return VerifyCurve(list(sizes), seconds)


class AloneGate:
    """A pair's `RequestGate` in a batch: it decides for a request that starts alone, and learns only from one that
    stayed alone (a request's speed in a batch measures the load, not its arm); with company, the request drafts
    and the batch's `DraftOrNot` decides per cycle."""

    def __init__(self, gate: RequestGate, rendezvous: Rendezvous):
        self.gate, self.rendezvous = gate, rendezvous
        self._local = threading.local()  # per decode thread: the joins count when its request started alone

    def gates(self, greedy: bool) -> bool:
        return self.gate.gates(greedy)

    def drafts(self, greedy: bool) -> bool:
        alone = self.rendezvous.members <= 1
        self._local.joins = self.rendezvous.joins if alone else None
        return self.gate.drafts(greedy) if alone else True

    def observe(self, greedy: bool, drafted: bool, stats: GenerationStats) -> None:
        if getattr(self._local, "joins", None) == self.rendezvous.joins:
            self.gate.observe(greedy, drafted, stats)


@dataclass
class LoadAware:
    """A stop policy's decisions, cut to what pays at the batch's load (see the module docstring)."""

    inner: object  # the request's own StopPolicy
    rendezvous: Rendezvous
    curve: VerifyCurve
    own_tokens: int = field(default=0, init=False)  # what this request verified last cycle
    drafted: bool = field(default=True, init=False)

    def reset(self) -> None:
        self.inner.reset()

    @property
    def drafts(self) -> bool:
        """Whether the request drafts at all: its own policy's say (`ControllerPolicy.drafts`)."""
        return getattr(self.inner, "drafts", True)

    def _bar(self, extra: int) -> float:
        # The draft probability a node needs: batch tokens/s times the seconds its verification adds. Alone, a
        # request keeps its policy's own choices, which its cost model already priced for batch size 1.
        if self.rendezvous.members <= 1:
            return 0.0
        others = max(self.rendezvous.target_tokens - self.own_tokens, 0)
        return self.rendezvous.rate() * self.curve.slope(others + 1 + extra)

    def skip_draft(self) -> bool:
        """Whether this cycle verifies the root alone: in a batch, when the batch measured that drafting does not
        pay at its size (`DraftOrNot`); alone, never."""
        self.drafted = self.rendezvous.members <= 1 or self.rendezvous.arms.draft(self.rendezvous.members)
        if not self.drafted:
            self.own_tokens = 1
        return not self.drafted

    def decide(self, calls: int, frontier_scores: torch.Tensor) -> bool:
        # A further call only yields nodes less likely than the frontier's best: stop once that is below the bar.
        if not self.inner.decide(calls, frontier_scores):
            return False
        return math.exp(float(frontier_scores.max())) >= self._bar(0)

    def choose_budget(self, calls: int, frontier_scores: torch.Tensor) -> int | None:
        choose = getattr(self.inner, "choose_budget", None)
        return choose(calls, frontier_scores) if choose is not None else None

    def cap_budget(self, ranked_scores: torch.Tensor, budget: int) -> int:
        """How many of the best-ranked nodes to verify (at most `budget`): those whose probability clears the bar."""
        if self.rendezvous.members <= 1:
            self.own_tokens = 1 + budget
            return budget
        probs = ranked_scores[:budget].exp().tolist()
        keep = 0
        while keep < len(probs) and probs[keep] >= self._bar(keep):
            keep += 1
        self.own_tokens = 1 + keep
        return keep
