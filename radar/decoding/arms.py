"""Whether drafting pays, measured live: both arms (draft, or run the target alone) timed on this process.

The simulator prices a policy with a cost model measured once; the live speed of drafting can still differ (another
load, another machine, a cost the model misses). Two users of one learner, `DraftOrNot`:
- a batch (`radar.decoding.batching`): per batch size, each cycle drafts or verifies the roots alone;
- a single request (`RequestGate`): a `radar` request drafts or runs the target alone, where the controller's
  simulated margin over the target alone is too small to trust.
"""

from __future__ import annotations

import threading

from radar.decoding.session import GenerationStats

# A controller whose simulated speedup over the target alone is below this is measured live before it is trusted:
# on the default pair the simulator's predicted tokens/s was up to 10% above the live one at T=1
# (benchmarks/README.md, calibration), so a smaller predicted margin does not tell which arm is faster.
TRUST_MARGIN = 1.10


class DraftOrNot:
    """Whether drafting pays at a batch size, learned by measuring both arms (draft, or verify roots only) per
    power-of-two batch size. A drafted cycle scores its batch's tokens/s over what roots-only cycles make at the
    same member count (their running mean per count; the nearest count's, in proportion, for a count without
    one), a roots-only cycle scores 1: so the arms compare like with like while members come and go within a size
    (a re-check drafting at 16 members must not be judged against roots-only cycles run at 9).

    A size measured under both arms keeps the better; a size not yet measured under both follows the nearest size
    that is (the first explores both, `explore` cycles each, roots only first); and `period` cycles after, the
    other arm runs `explore` cycles to re-check. Each re-check that keeps the same winner doubles the wait before
    the next (up to `max_period`), or quadruples it when the loser scored below `clear` times the winner, so a
    server that stays at one load stops paying for a losing arm it already knows, the sooner the more clearly it
    lost; a re-check that flips resets it. A check (the first look at the drafted arm included) ends after `quick`
    cycles once the arm it explores has scored below `clear` times the other: at a load where drafting loses
    clearly each drafted cycle costs a few roots-only ones, and the first `quick` already tell."""

    def __init__(self, explore: int = 6, period: int = 60, max_period: int = 960, clear: float = 0.8,
                 quick: int = 2):
        self.explore, self.period, self.max_period, self.clear, self.quick = explore, period, max_period, clear, quick
        self.rates: dict[tuple[int, bool], float] = {}  # (size, arm) -> running score (1 for roots only)
        self._roots: dict[int, float] = {}  # member count -> running tokens/s of its roots-only cycles
        self.cycles: dict[int, int] = {}
        self._arm: dict[int, bool] = {}
        self._next: dict[int, int] = {}  # per size: the cycle its next re-check starts at
        self._gap: dict[int, int] = {}  # per size: the wait before the one after
        self._winner: dict[int, bool] = {}  # per size: the arm that led when its current re-check began
        self._first: int | None = None  # the size explored first
        self._probe: dict[int, list[float]] = {}  # per size: the scores of the check under way (absent between checks)
        self._cut: dict[int, int] = {}  # per size: the cycle its check under way ends at, when cut short

    @staticmethod
    def bucket(members: int) -> int:
        return 1 << max(members - 1, 0).bit_length()

    def _decider(self, b: int) -> int | None:
        # The size whose measurements decide for b: the nearest measured under both arms.
        known = [c for c in {k for k, _ in self.rates} if (c, True) in self.rates and (c, False) in self.rates]
        return min(known, key=lambda c: (abs(c.bit_length() - b.bit_length()), -c)) if known else None

    def _best(self, b: int) -> bool | None:
        c = self._decider(b)
        return None if c is None else self.rates[(c, True)] >= self.rates[(c, False)]

    def _growth(self, b: int) -> int:
        # How much longer to wait after a re-check that kept the winner: the clearer its lead, the longer.
        c = self._decider(b)
        lo, hi = sorted((self.rates[(c, True)], self.rates[(c, False)]))
        return 4 if lo < self.clear * hi else 2

    def draft(self, members: int) -> bool:
        """The arm to run now at this batch size (the same for every call within one cycle)."""
        b = self.bucket(members)
        n = self.cycles.get(b, 0)
        best = self._best(b)
        self._first = b if self._first is None else self._first
        if best is None or (b == self._first and n < self._end(b, self.explore)):
            # The first size measured explores both, roots only first: so the batch's tokens/s is known when
            # load-aware trees are first cut by it.
            arm = probing = n >= self.explore
            if n == self.explore:
                self._begin(b)
        else:
            start = self._next.setdefault(b, max(self.period, n))
            if n >= self._end(b, start):  # a re-check just ended: wait longer if it changed nothing
                gap = self._gap.get(b, self.period)
                kept = self._winner.get(b) == best
                self._gap[b] = min(self._growth(b) * gap, self.max_period) if kept else self.period
                start = self._next[b] = n + self._gap[b]
            if n == start:
                self._winner[b] = best
                self._begin(b)
            probing = start <= n < self._end(b, start)
            arm = (not best) if probing else best
        if not probing:
            self._probe.pop(b, None)
        self._arm[b] = arm
        return arm

    def _begin(self, b: int) -> None:
        self._probe[b] = []
        self._cut.pop(b, None)

    def _end(self, b: int, start: int) -> int:
        # Where the check starting at `start` ends: after `explore` cycles, or sooner once it was cut short (a
        # cut from an earlier check, the first look at the drafted arm, lies before `start` and does not count).
        cut = self._cut.get(b, start)
        return min(start + self.explore, cut) if cut > start else start + self.explore

    def _judge(self, b: int, arm: bool, score: float) -> None:
        # Cut a check short once the arm it explores has clearly lost over its first `quick` cycles.
        probe, other = self._probe.get(b), self.rates.get((b, not arm))
        if probe is None or other is None:
            return
        probe.append(score)
        if len(probe) >= self.quick and sum(probe) / len(probe) < self.clear * other:
            self._cut[b] = self.cycles[b]

    def observe(self, members: int, tokens_per_s: float, arm: bool | None = None) -> None:
        """A cycle of the batch ended, run under `arm` (by default the arm last chosen for its size)."""
        b = self.bucket(members)
        if b not in self._arm:
            return
        if arm is not None:
            self._arm[b] = arm
        self.cycles[b] = self.cycles.get(b, 0) + 1
        if not self._arm[b]:
            old = self._roots.get(members)
            self._roots[members] = tokens_per_s if old is None else 0.7 * old + 0.3 * tokens_per_s
            score = 1.0
        elif self._roots:
            m = min(self._roots, key=lambda c: (abs(c - members), -c))
            score = tokens_per_s / (self._roots[m] * members / m)
        else:
            return  # nothing to compare with yet (every size runs roots only first)
        key = (b, self._arm[b])
        self.rates[key] = score if key not in self.rates else 0.7 * self.rates[key] + 0.3 * score
        self._judge(b, self._arm[b], score)


class RequestGate:
    """Whether a `radar` request drafts or runs the target alone, settled by measuring both on this process: one
    `DraftOrNot` per gated regime (greedy or sampled), stepped once per request instead of once per cycle, scoring
    a request by its decode tokens/s (its prefill left out: both arms pay it alike, and prompts differ in length).
    A request shorter than `min_tokens` is too short to time and does not count. Safe across threads."""

    def __init__(self, greedy: bool = True, sampled: bool = True, explore: int = 3, period: int = 20,
                 max_period: int = 320, min_tokens: int = 16):
        regimes = [g for g, gated in ((True, greedy), (False, sampled)) if gated]
        self._arms = {g: DraftOrNot(explore=explore, period=period, max_period=max_period) for g in regimes}
        self.min_tokens = min_tokens
        self._lock = threading.Lock()

    def gates(self, greedy: bool) -> bool:
        """Whether requests of this regime are measured (else they draft as their controller says)."""
        return greedy in self._arms

    def drafts(self, greedy: bool) -> bool:
        """The arm for the next request of this regime: True to draft."""
        if greedy not in self._arms:
            return True
        with self._lock:
            return self._arms[greedy].draft(1)

    def observe(self, greedy: bool, drafted: bool, stats: GenerationStats) -> None:
        """A request of this regime ended, run under arm `drafted`."""
        decode_s = stats.wall_s - stats.prefill_s
        if greedy not in self._arms or stats.new_tokens < self.min_tokens or decode_s <= 0:
            return
        with self._lock:
            self._arms[greedy].observe(1, stats.new_tokens / decode_s, drafted)
