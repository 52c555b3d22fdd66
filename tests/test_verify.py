"""Verification of a draft tree against the target: the sampling distribution, the greedy and sampled walks, and
the exact law of the number of accepted draft tokens.

Trees here are built by hand (`make_tree`) so every expected value can be worked out on paper.
"""

from __future__ import annotations

import math

import pytest
import torch

from radar.decoding.tree import DraftTree
from scipy.stats import chisquare

from radar.decoding import verify
from radar.decoding.verify import Sampling, acceptance_distribution, draw, next_token, target_probs, walk


def make_tree(parents: list[int], tokens: list[int]) -> DraftTree:
    """A DraftTree from parent indices (-1 = root, parents before children) and tokens; draft-side fields are dummies."""
    n = len(parents)
    depths, ancestors = [], torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        assert p < i, "parents must precede children"
        depths.append(1 if p < 0 else depths[p] + 1)
        ancestors[i, i] = True
        if p >= 0:
            ancestors[i] |= ancestors[p]
    return DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        depths=torch.tensor(depths, dtype=torch.long),
        scores=torch.zeros(n),
        ancestors=ancestors,
        draft_slots=[-1] * n,
        draft_base=0,
        draft_calls=max(depths, default=0),
    )


# A tree over a vocabulary of 8 used by several tests:
#
#   root ── 3 (node 0) ── 1 (node 2) ── 6 (node 5)
#        │             └─ 2 (node 3)
#        └─ 5 (node 1) ── 4 (node 4)
TREE = make_tree(parents=[-1, -1, 0, 0, 1, 2], tokens=[3, 5, 1, 2, 4, 6])
VOCAB = 8


def one_hot_logits(argmaxes: list[int], vocab: int = VOCAB) -> torch.Tensor:
    """Logits rows whose argmax is the given token (the other entries random but lower)."""
    logits = torch.rand(len(argmaxes), vocab, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(argmaxes)), argmaxes] = 2.0
    return logits


def reference_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Independent top-p: per row, keep the most likely tokens until their mass first reaches top_p, renormalise."""
    out = torch.zeros_like(probs)
    for r, row in enumerate(probs.tolist()):
        mass = 0.0
        for i in sorted(range(len(row)), key=lambda i: -row[i]):
            if mass >= top_p:
                break
            out[r, i] = row[i]
            mass += row[i]
    return out / out.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------------------- Sampling


def test_sampling_rejects_negative_temperature():
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-0.1)


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.01])
def test_sampling_rejects_top_p_outside_zero_one(top_p):
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=top_p)


def test_temperature_zero_is_greedy():
    assert Sampling().greedy and Sampling(0.0, 0.5).greedy and not Sampling(0.7).greedy


# ------------------------------------------------------------------------------------------- target_probs


def test_target_probs_is_softmax_of_logits_over_temperature():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))
    for t in (1.0, 0.7, 2.5):
        torch.testing.assert_close(target_probs(logits, Sampling(t)), torch.softmax(logits / t, -1))


def test_top_p_keeps_the_smallest_nucleus_reaching_top_p_and_renormalises():
    # Tokens deliberately not in probability order: p = [0.15, 0.5, 0.05, 0.3].
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    cases = {
        0.45: [0.0, 1.0, 0.0, 0.0],  # 0.5 alone reaches 0.45
        0.79: [0.0, 0.625, 0.0, 0.375],  # 0.5 + 0.3 = 0.8 reaches 0.79
        0.81: [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95],  # needs the third token
        0.99: [0.15, 0.5, 0.05, 0.3],  # needs all four
    }
    for top_p, expected in cases.items():
        got = target_probs(logits, Sampling(1.0, top_p))
        torch.testing.assert_close(got, torch.tensor(expected), msg=f"top_p={top_p}")


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert target_probs(logits, Sampling(1.0, 1e-6)).tolist() == [[0.0, 1.0, 0.0]]


def test_top_p_matches_an_independent_nucleus_row_by_row():
    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(2)) * 2
    for t, top_p in ((1.0, 0.9), (0.7, 0.5), (1.3, 0.95)):
        expected = reference_nucleus(torch.softmax(logits / t, -1), top_p)
        torch.testing.assert_close(target_probs(logits, Sampling(t, top_p)), expected)


def test_next_token_draws_only_from_the_nucleus():
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    gen = torch.Generator().manual_seed(0)
    draws = {next_token(logits, Sampling(1.0, 0.79), gen) for _ in range(300)}
    assert draws == {1, 3}


def test_draw_follows_its_distribution():
    probs = torch.tensor([0.05, 0.0, 0.4, 0.25, 0.0, 0.3])
    gen = torch.Generator().manual_seed(3)
    observed = torch.bincount(torch.tensor([draw(probs, gen) for _ in range(4000)]), minlength=6)
    assert observed[1] == observed[4] == 0
    support = probs > 0
    assert chisquare(observed[support].numpy(), (probs[support] * 4000).numpy()).pvalue > 1e-3


def test_draw_never_lands_past_the_last_likely_token_when_the_uniform_rounds_up(monkeypatch):
    monkeypatch.setattr(verify.torch, "rand", lambda *a, **k: torch.ones(1, dtype=torch.float64))
    assert draw(torch.tensor([0.5, 0.5, 0.0, 0.0]), None) == 1


def test_greedy_next_token_is_the_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert next_token(logits, Sampling(), None) == 1


# ---------------------------------------------------------------------------------------------- greedy walk


def test_greedy_walk_accepts_the_longest_argmax_matching_path():
    # Rows: after root, then after nodes 0..5. Root's argmax 3 -> node 0; node 0's argmax 1 -> node 2;
    # node 2's argmax 6 -> node 5; node 5's argmax 7 has no child: bonus 7.
    logits = one_hot_logits([3, 1, 0, 6, 0, 0, 7])
    assert walk(TREE, logits, Sampling()) == ([0, 2, 5], 7)


def test_greedy_walk_takes_the_second_root_child_when_the_argmax_is_there():
    logits = one_hot_logits([5, 0, 4, 0, 0, 2, 0])  # root -> 5 (node 1) -> 4 (node 4) -> argmax 2: bonus
    assert walk(TREE, logits, Sampling()) == ([1, 4], 2)


def test_greedy_walk_stops_at_the_first_mismatch_with_the_argmax_as_bonus():
    logits = one_hot_logits([3, 7, 0, 0, 0, 0, 0])  # node 0 expects 1 or 2, the target says 7
    assert walk(TREE, logits, Sampling()) == ([0], 7)


def test_greedy_walk_accepts_nothing_when_the_root_argmax_is_not_drafted():
    logits = one_hot_logits([0, 1, 4, 6, 0, 0, 0])
    assert walk(TREE, logits, Sampling()) == ([], 0)


# ------------------------------------------------------------------------------------ acceptance_distribution


def random_probs(rows: int, vocab: int, seed: int, sharp: float = 2.0) -> torch.Tensor:
    return torch.softmax(sharp * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)), -1)


def test_acceptance_distribution_matches_a_hand_worked_tree():
    # root children a=3 (p 0.5) and b=5 (p 0.2); a's child c=1 (p_a 0.6); b's child d=4 (p_b 0.25).
    tree = make_tree(parents=[-1, -1, 0, 1], tokens=[3, 5, 1, 4])
    probs = torch.zeros(5, VOCAB)
    probs[0, [3, 5, 0]] = torch.tensor([0.5, 0.2, 0.3])  # after root
    probs[1, [1, 0]] = torch.tensor([0.6, 0.4])  # after a
    probs[2, [4, 0]] = torch.tensor([0.25, 0.75])  # after b
    probs[3, 0] = probs[4, 0] = 1.0  # after c, d (leaves)
    # P(0) = 1 - 0.5 - 0.2 = 0.3
    # P(1) = stop at a + stop at b = 0.5 * (1 - 0.6) + 0.2 * (1 - 0.25) = 0.2 + 0.15 = 0.35
    # P(2) = reach c + reach d = 0.5 * 0.6 + 0.2 * 0.25 = 0.3 + 0.05 = 0.35
    torch.testing.assert_close(acceptance_distribution(tree, probs), torch.tensor([0.3, 0.35, 0.35]))


@pytest.mark.parametrize("seed", range(5))
def test_acceptance_distribution_sums_to_one(seed):
    probs = random_probs(1 + len(TREE), VOCAB, seed)
    dist = acceptance_distribution(TREE, probs)
    assert dist.shape == (int(TREE.depths.max()) + 1,)
    assert (dist >= 0).all()
    assert math.isclose(float(dist.sum()), 1.0, abs_tol=1e-5)


@pytest.mark.parametrize(
    "argmaxes, accepted",
    [([3, 1, 0, 6, 0, 0, 7], 3), ([5, 0, 4, 0, 0, 2, 0], 2), ([3, 7, 0, 0, 0, 0, 0], 1), ([0, 1, 4, 6, 0, 0, 0], 0)],
)
def test_acceptance_distribution_is_one_hot_at_the_greedy_walk_length_for_one_hot_probs(argmaxes, accepted):
    logits = one_hot_logits(argmaxes)
    probs = torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float()
    path, _ = walk(TREE, logits, Sampling())
    assert len(path) == accepted
    expected = torch.zeros(int(TREE.depths.max()) + 1)
    expected[accepted] = 1.0
    assert acceptance_distribution(TREE, probs).tolist() == expected.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.8, 0.95)], ids=["T1", "T0.8-top_p0.95"])
def test_acceptance_distribution_matches_monte_carlo_walks(sampling):
    """20000 sampled walks on one tree; the empirical law of len(path) is within TV 0.02 of the exact one.

    Bound: for m outcomes and n draws E[TV] <= 0.5 * sqrt((m - 1) / n) = 0.0061 (m = 4 depths, n = 20000), and one
    draw moves TV by at most 1/n, so by McDiarmid P(TV > E[TV] + 0.0139) <= exp(-2 n 0.0139^2) < 5e-4. With the
    generator seeded the outcome is deterministic anyway; a wrong law (e.g. forgetting renormalisation) is off by
    far more than 0.02 on this tree.
    """
    logits = 1.5 * torch.randn(1 + len(TREE), VOCAB, generator=torch.Generator().manual_seed(3))
    # Make the drafted children likely so every depth has real mass.
    for p, t in zip(TREE.parents.tolist(), TREE.tokens.tolist()):
        logits[p + 1, t] += 2.5
    probs = target_probs(logits, sampling)
    exact = acceptance_distribution(TREE, probs).double()
    assert (exact > 0.05).all(), exact  # every outcome occurs, so the comparison means something

    n, gen = 20000, torch.Generator().manual_seed(4)
    counts = torch.zeros_like(exact)
    for _ in range(n):
        path, _ = walk(TREE, logits, sampling, gen)
        counts[len(path)] += 1
    tv = 0.5 * (counts / n - exact).abs().sum().item()
    assert tv < 0.02, (counts / n, exact)


def test_sampled_walk_bonus_is_never_a_child_token_of_the_node_it_stops_at():
    # When the walk stops at a node, its bonus is a token none of that node's children carry (else it would descend).
    logits = torch.randn(1 + len(TREE), VOCAB, generator=torch.Generator().manual_seed(5))
    children = TREE.children()
    gen = torch.Generator().manual_seed(6)
    for _ in range(500):
        path, bonus = walk(TREE, logits, Sampling(1.0), gen)
        last = path[-1] if path else -1
        assert bonus not in children[last]
        for parent, child in zip([-1] + path[:-1], path):
            assert TREE.parents[child] == parent
