"""The dynamic draft tree: the pool the draft calls grow, the rerank to the verification budget, and the stop hook.

Most tests use `ScriptedDrafter`, which returns seeded random log-probs and records what it was fed, so tree shapes
are generic and cheap; one test runs a real tiny model to check the scores against plain causal log-probs.
"""

from __future__ import annotations

import pytest
import torch

from radar.decoding.drafters import Drafter, SmallLMDrafter
from radar.decoding.model import Transformer
from radar.decoding.stop import FixedDepth, ThresholdPolicy
from radar.decoding.tree import DraftPool, TreeConfig, build_tree, draft_pool, select_tree

from tiny_models import make_tiny_llama


VOCAB = 32
PENDING = torch.tensor([5, 9, 2])  # committed tokens the drafter has not seen, root (2) last
ROOT_POSITION = 2


class ScriptedDrafter(Drafter):
    """Random next-token log-probs (seeded), with a record of every call's tokens, positions and tree mask."""

    def __init__(self, vocab: int = VOCAB, seed: int = 0, sharp: float = 3.0):
        self.vocab_size = vocab
        self.gen = torch.Generator().manual_seed(seed)
        self.sharp = sharp
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._length = 0

    def begin(self, max_len: int) -> None:
        self._length, self.calls = 0, []

    @property
    def length(self) -> int:
        return self._length

    def forward(self, tokens, positions, tree_mask):
        self.calls.append((tokens.clone(), positions.clone(), None if tree_mask is None else tree_mask.clone()))
        self._length += tokens.numel()
        return torch.log_softmax(self.sharp * torch.randn(tokens.numel(), self.vocab_size, generator=self.gen), -1)

    def keep(self, start, slots):
        self._length = start + len(slots)


class Recorder:
    """A stop policy that records what it is shown and stops after `stop_after` calls."""

    def __init__(self, stop_after: int):
        self.stop_after = stop_after
        self.seen: list[tuple[int, torch.Tensor]] = []

    def reset(self) -> None:
        self.seen = []

    def decide(self, calls: int, frontier_scores: torch.Tensor) -> bool:
        self.seen.append((calls, frontier_scores.clone()))
        return calls < self.stop_after


def pool_for(
    k: int, calls: int, seed: int = 0, policy=None, max_calls: int | None = None
) -> tuple[DraftPool, ScriptedDrafter]:
    """The pool of one cycle on a ScriptedDrafter: `calls` draft calls (FixedDepth) unless `policy` says otherwise."""
    drafter = ScriptedDrafter(seed=seed)
    drafter.begin(1024)
    cfg = TreeConfig(branching=k, max_calls=max_calls or calls, total_tokens=1)
    return draft_pool(drafter, PENDING, ROOT_POSITION, cfg, policy or FixedDepth(calls)), drafter


def assert_parents_precede_children(parents: torch.Tensor) -> None:
    for i, p in enumerate(parents.tolist()):
        assert -1 <= p < i, f"node {i} has parent {p}"


def assert_ancestors_consistent(parents: torch.Tensor, ancestors: torch.Tensor) -> None:
    """ancestors[i, j] holds exactly when j is i or on i's parent chain."""
    n = parents.numel()
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            expected[i, j] = True
            j = int(parents[j])
    assert torch.equal(ancestors, expected)


K_D = [(1, 1), (1, 5), (2, 1), (2, 4), (3, 3), (4, 2), (4, 6), (10, 3)]


# -------------------------------------------------------------------------------------------------- the pool


@pytest.mark.parametrize("k, d", K_D)
def test_pool_after_d_calls_has_k_plus_d_minus_1_times_k_squared_nodes(k, d):
    pool, _ = pool_for(k, d)
    assert len(pool.tokens) == k + (d - 1) * k * k == TreeConfig(k, d, 1).max_nodes
    assert pool.draft_calls == d


@pytest.mark.parametrize("k, d", K_D)
def test_pool_nodes_of_each_depth_are_k_children_of_each_frontier_node(k, d):
    pool, _ = pool_for(k, d)
    assert torch.equal(pool.depths[:k], torch.ones(k, dtype=torch.long))
    for depth in range(2, d + 1):
        at_depth = (pool.depths == depth).nonzero().flatten()
        assert at_depth.numel() == k * k
        parents = pool.parents[at_depth]
        assert (pool.depths[parents] == depth - 1).all()
        assert sorted(parents.bincount().tolist()[p] for p in set(parents.tolist())) == [k] * k


@pytest.mark.parametrize("k, d", K_D)
def test_siblings_carry_distinct_tokens(k, d):
    pool, _ = pool_for(k, d)
    pairs = list(zip(pool.parents.tolist(), pool.tokens.tolist()))
    assert len(set(pairs)) == len(pairs)


@pytest.mark.parametrize("k, d", K_D)
def test_pool_parents_precede_children_and_ancestors_match_parents(k, d):
    pool, _ = pool_for(k, d)
    assert_parents_precede_children(pool.parents)
    assert_ancestors_consistent(pool.parents, pool.ancestors)


@pytest.mark.parametrize("k, d", K_D)
def test_child_score_is_parent_score_plus_its_draft_logprob_so_never_higher(k, d):
    pool, _ = pool_for(k, d)
    for i, p in enumerate(pool.parents.tolist()):
        if p >= 0:
            assert pool.scores[i] <= pool.scores[p]


def test_drafter_sees_each_frontier_node_with_exactly_its_ancestors_at_parent_depth_positions():
    k, d = 3, 4
    pool, drafter = pool_for(k, d)
    assert len(drafter.calls) == d  # the pending tokens (call 1) and d - 1 frontier calls
    tokens, positions, mask = drafter.calls[0]
    assert torch.equal(tokens, PENDING) and torch.equal(positions, torch.arange(3)) and mask is None
    fed = [int(i) for i in pool.draft_slots.argsort() if pool.draft_slots[i] >= 0]  # pool indices in slot order
    for call, (tokens, positions, mask) in enumerate(drafter.calls[1:]):
        frontier, before = fed[call * k : (call + 1) * k], fed[: call * k]
        assert (pool.depths[frontier] == call + 1).all()
        assert torch.equal(tokens, pool.tokens[frontier])
        assert torch.equal(positions, ROOT_POSITION + pool.depths[frontier])
        # Columns: the nodes fed in earlier calls, then this call's nodes; each row sees its ancestors and itself.
        assert torch.equal(mask, pool.ancestors[frontier][:, before + frontier])


def test_nodes_fed_to_the_drafter_have_consecutive_slots_after_the_prefix_and_last_call_leaves_have_none():
    k, d = 3, 3
    pool, drafter = pool_for(k, d)
    assert pool.draft_base == PENDING.numel()
    fed = pool.draft_slots[pool.draft_slots >= 0]
    assert sorted(fed.tolist()) == list(range(pool.draft_base, pool.draft_base + (d - 1) * k))
    assert (pool.draft_slots[pool.depths == d] == -1).all()
    assert drafter.length == pool.draft_base + (d - 1) * k


@pytest.mark.parametrize("k, d", [(2, 3), (4, 4), (10, 2)])
def test_frontier_is_the_k_best_scored_nodes_of_the_newest_depth(k, d):
    policy = Recorder(stop_after=d)
    pool, _ = pool_for(k, d, policy=policy)
    for calls, frontier_scores in policy.seen:
        newest = pool.scores[pool.depths == calls]
        torch.testing.assert_close(frontier_scores, newest.topk(k).values)


# ---------------------------------------------------------------------------------------------- stop policies


@pytest.mark.parametrize("d", range(1, 9))
def test_fixed_depth_d_makes_exactly_d_draft_calls(d):
    pool, drafter = pool_for(3, d, max_calls=8)
    assert pool.draft_calls == d == len(drafter.calls)
    assert int(pool.depths.max()) == d


def test_max_calls_caps_a_policy_that_never_stops():
    pool, drafter = pool_for(2, 3, policy=FixedDepth(100), max_calls=3)
    assert pool.draft_calls == 3 == len(drafter.calls)


def test_a_policy_that_stops_at_call_1_gives_a_depth_1_tree():
    policy = Recorder(stop_after=1)
    drafter = ScriptedDrafter()
    drafter.begin(64)
    tree = build_tree(drafter, PENDING, ROOT_POSITION, TreeConfig(4, 8, 60), policy)
    assert tree.draft_calls == 1 and len(drafter.calls) == 1
    assert tree.depths.tolist() == [1, 1, 1, 1] and tree.parents.tolist() == [-1] * 4
    assert [calls for calls, _ in policy.seen] == [1]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_policy_sees_calls_so_far_and_frontier_scores_sorted_descending_of_width_k(k):
    policy = Recorder(stop_after=6)
    pool_for(k, 6, policy=policy, max_calls=8)
    assert [calls for calls, _ in policy.seen] == [1, 2, 3, 4, 5, 6]  # asked before calls 2..7; says no at 6
    for _, scores in policy.seen:
        assert scores.shape == (k,)
        assert torch.equal(scores, scores.sort(descending=True).values)


def test_policy_is_not_asked_before_the_first_call_nor_after_max_calls():
    policy = Recorder(stop_after=100)
    pool_for(2, 4, policy=policy, max_calls=4)
    assert [calls for calls, _ in policy.seen] == [1, 2, 3]


def test_fixed_depth_rejects_depth_below_one():
    with pytest.raises(ValueError):
        FixedDepth(0)


def test_threshold_policy_continues_while_the_best_frontier_path_is_likely_enough():
    policy = ThresholdPolicy(0.5)
    assert policy.decide(1, torch.tensor([0.6, 0.1]).log())
    assert not policy.decide(1, torch.tensor([0.4, 0.3]).log())


@pytest.mark.parametrize("threshold, continues", [(0.0, True), (-1.0, True), (1.5, False)])
def test_threshold_policy_at_most_zero_never_stops_and_above_one_always_stops(threshold, continues):
    policy = ThresholdPolicy(threshold)
    for scores in (torch.tensor([0.0]), torch.tensor([float("-inf")])):  # a certain and an impossible path
        assert policy.decide(1, scores) == continues


@pytest.mark.parametrize("bad", [dict(branching=0), dict(max_calls=0), dict(total_tokens=0)])
def test_tree_config_rejects_non_positive_sizes(bad):
    with pytest.raises(ValueError):
        TreeConfig(**bad)


# ------------------------------------------------------------------------------------------- select_tree


SELECT_CASES = [(k, d, n) for k, d in [(2, 4), (3, 3), (4, 6)] for n in (1, 3, 7, 20, 1000)]


@pytest.mark.parametrize("k, d, n", SELECT_CASES)
def test_select_tree_keeps_the_min_of_total_tokens_and_pool_size(k, d, n):
    pool, _ = pool_for(k, d)
    assert len(select_tree(pool, n)) == min(n, len(pool.tokens))


@pytest.mark.parametrize("k, d, n", SELECT_CASES)
def test_select_tree_is_closed_under_parents(k, d, n):
    pool, _ = pool_for(k, d)
    tree = select_tree(pool, n)
    # Map each kept node back to the pool by (depth, score, token) and check its pool parent was kept too.
    kept = {(int(dp), float(s), int(t)) for dp, s, t in zip(tree.depths, tree.scores, tree.tokens)}
    for i in range(len(pool.tokens)):
        key = (int(pool.depths[i]), float(pool.scores[i]), int(pool.tokens[i]))
        p = int(pool.parents[i])
        if key in kept and p >= 0:
            assert (int(pool.depths[p]), float(pool.scores[p]), int(pool.tokens[p])) in kept
    # And within the tree: every parent index points at a kept node one level up.
    for i, p in enumerate(tree.parents.tolist()):
        assert (p == -1) == (tree.depths[i] == 1)
        if p >= 0:
            assert tree.depths[p] == tree.depths[i] - 1


@pytest.mark.parametrize("k, d, n", SELECT_CASES)
def test_select_tree_keeps_the_best_scored_nodes(k, d, n):
    pool, _ = pool_for(k, d)
    tree = select_tree(pool, n)
    best = pool.scores.sort(descending=True).values[: len(tree)]
    torch.testing.assert_close(tree.scores.sort(descending=True).values, best)


@pytest.mark.parametrize("k, d, n", SELECT_CASES)
def test_select_tree_parents_precede_children_and_ancestors_match_parents(k, d, n):
    tree = select_tree(pool_for(k, d)[0], n)
    assert_parents_precede_children(tree.parents)
    assert_ancestors_consistent(tree.parents, tree.ancestors)


@pytest.mark.parametrize("k, d, n", SELECT_CASES)
def test_select_tree_remaps_parents_onto_the_same_pool_nodes(k, d, n):
    pool, _ = pool_for(k, d)
    tree = select_tree(pool, n)
    pool_index = {(float(s), int(t), int(dp)): i for i, (s, t, dp) in enumerate(zip(pool.scores, pool.tokens, pool.depths))}
    idx = [pool_index[(float(s), int(t), int(dp))] for s, t, dp in zip(tree.scores, tree.tokens, tree.depths)]
    for i, p in enumerate(tree.parents.tolist()):
        assert int(pool.parents[idx[i]]) == (idx[p] if p >= 0 else -1)
        assert tree.draft_slots[i] == int(pool.draft_slots[idx[i]])


class CertainDrafter(ScriptedDrafter):
    """After token t it is certain of t + 1 (log-prob exactly 0.0 in float32), then t + 2, t + 3, ... far behind."""

    def forward(self, tokens, positions, tree_mask):
        super().forward(tokens, positions, tree_mask)
        ranks = (torch.arange(self.vocab_size) - tokens[:, None] - 1) % self.vocab_size
        return torch.log_softmax(-200.0 * ranks.float(), -1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_a_child_tied_with_its_parent_is_kept_only_after_the_parent(n):
    drafter = CertainDrafter()
    drafter.begin(64)
    pool = draft_pool(drafter, PENDING, ROOT_POSITION, TreeConfig(2, 5, n), FixedDepth(5))
    certain = (pool.scores == 0).nonzero().flatten()
    assert certain.numel() == 5  # the chain 3, 4, 5, 6, 7 after root 2 all score exactly 0
    tree = select_tree(pool, n)
    assert tree.tokens.tolist() == list(range(3, 3 + n))
    assert tree.parents.tolist() == list(range(-1, n - 1))


@pytest.mark.parametrize("d", range(1, 9))
def test_chain_with_branching_1_is_a_path(d):
    drafter = ScriptedDrafter()
    drafter.begin(64)
    tree = build_tree(drafter, PENDING, ROOT_POSITION, TreeConfig(1, d, d), FixedDepth(d))
    assert tree.parents.tolist() == list(range(-1, d - 1))
    assert tree.depths.tolist() == list(range(1, d + 1))
    assert torch.equal(tree.ancestors, torch.ones(d, d, dtype=torch.bool).tril())


def test_children_maps_each_node_to_its_child_tokens():
    drafter = ScriptedDrafter()
    drafter.begin(64)
    tree = build_tree(drafter, PENDING, ROOT_POSITION, TreeConfig(3, 3, 10), FixedDepth(3))
    children = tree.children()
    assert set(children) == {-1, *range(len(tree))}
    for parent, kids in children.items():
        for token, child in kids.items():
            assert int(tree.parents[child]) == parent and int(tree.tokens[child]) == token


# ------------------------------------------------------------------------------------- with a real drafter


@pytest.fixture(scope="module")
def tiny_drafter_model(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("tree"), vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, seed=7)
    return Transformer.from_pretrained(path)


@torch.inference_mode()
def test_node_scores_are_the_drafters_causal_logprob_of_the_nodes_path(tiny_drafter_model):
    """Tree attention in the drafter (masks, positions, slots) gives the same log-probs as running each path alone."""
    model, k, d = tiny_drafter_model, 3, 4
    drafter = SmallLMDrafter(model)
    drafter.begin(128)
    pool = draft_pool(drafter, PENDING, ROOT_POSITION, TreeConfig(k, d, 1), FixedDepth(d))
    for i in range(len(pool.tokens)):
        chain = pool.ancestors[i].nonzero().flatten()  # ancestors in pool order = root-down
        seq = torch.cat((PENDING, pool.tokens[chain]))
        logp = torch.log_softmax(model(seq[None])[0].float(), -1)
        expected = sum(float(logp[PENDING.numel() - 1 + j, seq[PENDING.numel() + j]]) for j in range(chain.numel()))
        assert abs(float(pool.scores[i]) - expected) < 1e-4, (i, float(pool.scores[i]), expected)
