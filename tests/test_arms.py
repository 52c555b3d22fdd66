"""Whether drafting pays, measured live: `DraftOrNot` keeps the faster arm per batch size and re-checks the other
now and then; `RequestGate` steps it once per request for single `radar` requests whose controller's simulated
margin is too small to trust."""

from __future__ import annotations

from radar.decoding.arms import DraftOrNot, RequestGate
from radar.decoding.batching import AloneGate, Rendezvous
from radar.decoding.pair import ModelPair
from radar.decoding.session import GenerationStats


def test_draft_or_not_measures_both_arms_then_keeps_the_faster_and_rechecks():
    arms = DraftOrNot(explore=2, period=10)
    seen = []
    for _ in range(30):
        draft = arms.draft(16)
        seen.append(draft)
        arms.observe(16, 20.0 if draft else 40.0)  # not drafting yields more at this size
    assert seen[:4] == [False, False, True, True]  # each arm measured first, roots only first
    assert seen[4:10].count(False) > seen[4:10].count(True)
    assert True in seen[10:]  # drafting is tried again now and then
    assert arms.draft(8) is False  # a size not measured yet follows the nearest one that was
    for _ in range(14):
        arms.observe(8, 30.0 if arms.draft(8) else 10.0)  # ... until its own re-check finds drafting faster there
    assert arms.draft(8) is True


def test_draft_or_not_waits_longer_between_rechecks_that_change_nothing_and_resets_when_one_does():
    arms = DraftOrNot(explore=2, period=10, max_period=40, clear=0.0)  # every lead counts as close: doubling
    drafted = []
    for cycle in range(250):
        draft = arms.draft(16)
        drafted.append(draft)
        pays = cycle >= 150  # drafting is the slower arm until cycle 150, then the faster
        arms.observe(16, 40.0 if draft == pays else 20.0)

    def windows(arm: bool, cycles: range) -> list[int]:  # where each run of `arm` starts
        return [c for c in cycles if drafted[c] == arm and drafted[c - 1] != arm]

    assert windows(True, range(1, 150)) == [2, 10, 32, 74, 116]  # explored, then waits 10, 20, 40, the cap
    assert windows(False, range(162, 250))[:2] == [170, 192]  # the winner flipped: back to 10, then 20


def _drafted_runs(rate_of_cycle, cycles: int = 200, **settings) -> list[tuple[int, int]]:
    """(start, length) of every run of drafted cycles under DraftOrNot(**settings) at 16 members, roots only
    yielding 40 tokens/s and drafting `rate_of_cycle(cycle)`."""
    arms = DraftOrNot(**{"explore": 6, "period": 30, "max_period": 1000, "clear": 0.8, "quick": 2, **settings})
    drafted = []
    for cycle in range(cycles):
        drafted.append(arms.draft(16))
        arms.observe(16, rate_of_cycle(cycle) if drafted[-1] else 40.0)
    starts = [c for c in range(cycles) if drafted[c] and (c == 0 or not drafted[c - 1])]
    return [(s, next((c for c in range(s, cycles) if not drafted[c]), cycles) - s) for s in starts]


def test_draft_or_not_waits_four_times_longer_after_a_recheck_the_loser_lost_clearly():
    def recheck_starts(drafted_rate: float) -> list[int]:
        runs = _drafted_runs(lambda c: drafted_rate, 300, explore=2, period=10)
        return [start for start, _ in runs]

    assert recheck_starts(20.0) == [2, 10, 52, 214]  # at half the winner's rate: waits 10, 40, 160
    assert recheck_starts(38.0) == [2, 10, 32, 74, 156]  # a close loser: waits 10, 20, 40, 80


def test_draft_or_not_compares_drafted_cycles_with_roots_only_ones_at_the_same_member_count():
    arms = DraftOrNot(explore=2, period=100)
    rate = {(16, False): 128.0, (16, True): 115.0, (9, False): 100.0}  # drafting loses at 16 members
    for cycle in range(103):
        members = 9 if 4 <= cycle < 100 else 16  # the re-check at cycle 100 runs as the batch refills to 16
        arms.observe(members, rate[(members, arms.draft(members))])
    # Judged against the roots-only cycles at 9 members (100 tokens/s), its 115 would have looked like a win.
    assert arms.draft(16) is False


def test_draft_or_not_cuts_a_check_short_once_drafting_clearly_loses():
    assert [n for _, n in _drafted_runs(lambda c: 20.0)] == [2, 2, 2]  # half the rate: two cycles tell
    assert [n for _, n in _drafted_runs(lambda c: 36.0)] == [6, 6, 6]  # a close loss is measured in full


def test_draft_or_not_still_switches_to_drafting_once_it_pays():
    runs = _drafted_runs(lambda c: 20.0 if c < 60 else 80.0)
    assert runs[0] == (6, 2)  # cut short while it lost
    assert sum(min(s + n, 200) - max(s, 160) for s, n in runs if s + n > 160) >= 36  # then drafts 90% of cycles




def _stats(tokens: int, decode_s: float, prefill_s: float = 0.2) -> GenerationStats:
    return GenerationStats(new_tokens=tokens, wall_s=prefill_s + decode_s, prefill_s=prefill_s)


def _gated_arms(gate: RequestGate, rate, requests: int, greedy: bool = False, **stats) -> list[bool]:
    """The arm of each of `requests` 64-token requests, drafting decoding at `rate(True)` tokens/s and the target
    alone at `rate(False)`."""
    arms = []
    for _ in range(requests):
        arms.append(gate.drafts(greedy))
        gate.observe(greedy, arms[-1], _stats(64, 64 / rate(arms[-1]), **stats))
    return arms


def test_request_gate_runs_the_target_alone_once_it_measured_it_faster():
    arms = _gated_arms(RequestGate(explore=3, period=20), lambda d: 90.0 if d else 100.0, 30)
    assert arms[:6] == [False] * 3 + [True] * 3  # both measured, the target alone first
    assert not any(arms[6:20])  # then the faster arm
    assert any(arms[20:])  # and drafting re-checked later


def test_request_gate_keeps_drafting_where_drafting_measured_faster():
    arms = _gated_arms(RequestGate(explore=3, period=20), lambda d: 110.0 if d else 100.0, 20)
    assert all(arms[3:])


def test_request_gate_scores_decoding_and_leaves_the_prefill_out():
    # A long prefill (both arms pay it alike) must not make the faster decoder look slower.
    gate = RequestGate(explore=3, period=20)
    for _ in range(6):
        drafted = gate.drafts(True)
        gate.observe(True, drafted, _stats(64, 0.5 if drafted else 0.6, prefill_s=5.0 if drafted else 0.0))
    assert gate.drafts(True) is True


def test_request_gate_does_not_count_a_request_too_short_to_time():
    gate = RequestGate(explore=3, period=20, min_tokens=16)
    for _ in range(10):
        assert gate.drafts(False) is False  # still exploring its first arm: no request counted
        gate.observe(False, False, _stats(4, 0.01))


def test_request_gate_leaves_a_regime_it_does_not_gate_to_its_controller():
    gate = RequestGate(greedy=False, sampled=True)
    assert not gate.gates(True) and gate.gates(False)
    assert all(gate.drafts(True) for _ in range(8))


def test_in_a_batch_the_gate_decides_for_a_request_that_starts_alone_and_lets_the_batch_decide_otherwise():
    rv = Rendezvous()
    gate = AloneGate(RequestGate(explore=3), rv)
    with rv.member():
        assert gate.drafts(False) is False  # alone: the gate's first arm, the target alone
        with rv.member():
            assert gate.drafts(False) is True  # with company: drafting, cut per cycle by the batch's DraftOrNot


def test_in_a_batch_the_gate_learns_only_from_a_request_that_stayed_alone():
    rv = Rendezvous()
    gate = AloneGate(RequestGate(explore=1), rv)
    with rv.member():
        drafted = gate.drafts(True)
        with rv.member():  # another request came and went while this one decoded
            pass
        gate.observe(True, drafted, _stats(64, 1.0))
        assert gate.drafts(True) is False  # not counted: still exploring the target alone
        gate.observe(True, False, _stats(64, 1.0))
        assert gate.drafts(True) is True  # counted: on to the drafted arm


def test_a_batched_pair_wraps_its_gate(tiny_pair):
    gated = ModelPair.load(*tiny_pair, device="cpu", dtype="float32")
    gated.gate = RequestGate()
    wrapped = gated.batched(Rendezvous(gated.target)).gate
    assert isinstance(wrapped, AloneGate) and wrapped.gate is gated.gate
