"""Cost model, rewards and returns against hand-worked values of the paper's formulas (Eqs. 4-6)."""

from __future__ import annotations

import json

import pytest
import torch

from radar.controller.mdp import (
    LLAMA31_8B,
    CostModel,
    batch_returns,
    decision_count,
    discounted_returns,
    expected_accepted,
    expected_speedup,
    rewards,
    terminal_reward,
    trajectory_returns,
)


def test_t_gen_matches_eq6_by_hand():
    c = CostModel.preset("llama3.1-8b")
    assert (c.T_0, c.T_f, c.T_eye, c.t_max) == (0.07067, 0.002684, 0.0004, 8)
    # t < t_max: T_0 + T_f t + T_eye (t + 1)
    assert c.t_gen(1) == pytest.approx(0.07067 + 0.002684 + 0.0008)
    assert c.t_gen(3) == pytest.approx(0.07067 + 3 * 0.002684 + 4 * 0.0004)
    assert c.t_gen(7) == pytest.approx(0.07067 + 7 * 0.002684 + 8 * 0.0004)
    # t = t_max: T_0 + T_f t + T_eye t
    assert c.t_gen(8) == pytest.approx(0.07067 + 8 * 0.002684 + 8 * 0.0004)
    assert c.t_gen(8) == pytest.approx(0.095342)
    # Without the controller, no T_eye at all.
    assert c.t_gen(3, controller=False) == pytest.approx(0.07067 + 3 * 0.002684)
    torch.testing.assert_close(c.t_gen_table(), torch.tensor([c.t_gen(t) for t in range(1, 9)], dtype=torch.float64))
    for bad in (0, 9):
        with pytest.raises(ValueError, match="1..8"):
            c.t_gen(bad)


def test_small_integer_cost_model():
    c = CostModel(T_0=1.0, T_f=0.5, T_eye=0.25, t_max=3)
    assert [c.t_gen(t) for t in (1, 2, 3)] == [1.0 + 0.5 + 0.5, 1.0 + 1.0 + 0.75, 1.0 + 1.5 + 0.75]


def test_cost_file_round_trip_and_errors(tmp_path):
    c = CostModel(T_0=0.01, T_f=0.002, T_eye=0.0001, t_max=6, ar_step=0.009, meta={"device": "cpu"})
    path = c.save(tmp_path / "costs" / "cost.json")
    assert CostModel.load(path) == c
    assert CostModel.resolve(path) == c
    assert CostModel.resolve("llama3.1-8b") == LLAMA31_8B
    assert json.loads(path.read_text())["T_f"] == 0.002

    (tmp_path / "bad.json").write_text(json.dumps({"T_0": 1.0, "Tf": 2.0}))
    with pytest.raises(ValueError, match=r"missing keys \['T_f', 'T_eye'\], unknown keys \['Tf'\]"):
        CostModel.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CostModel.load(tmp_path / "junk.json")
    with pytest.raises(FileNotFoundError, match="preset"):
        CostModel.resolve(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="unknown cost preset"):
        CostModel.preset("gpt-5")
    with pytest.raises(ValueError):
        CostModel(T_0=-1.0, T_f=0.1, T_eye=0.0)


def test_preset_is_a_copy():
    c = CostModel.preset("llama3.1-8b")
    c.meta["x"] = 1
    assert "x" not in LLAMA31_8B.meta


def test_ar_time_falls_back_to_t0():
    assert LLAMA31_8B.ar_time == 0.07067 and "T_0" in LLAMA31_8B.speedup_basis
    c = CostModel(T_0=1.0, T_f=0.1, T_eye=0.0, ar_step=0.5)
    assert c.ar_time == 0.5 and c.speedup_basis == "ar_step"


def test_rewards_and_returns_by_hand():
    c = CostModel(T_0=1.0, T_f=0.5, T_eye=0.25, t_max=4)
    # T = 3 calls, l_acc = 2: terminal = 2 / T_gen(3) = 2 / (1 + 1.5 + 1.0) = 4/7
    term = terminal_reward(2, 3, c)
    assert term == pytest.approx(2 / 3.5)
    assert terminal_reward(2, 3, c, beta=0.5, bonus=True) == pytest.approx(0.5 * 3 / 3.5)
    assert rewards(3, term, alpha=0.1) == [-0.1, -0.1, term]
    # G_3 = term, G_2 = -0.1 + 0.9 term, G_1 = -0.1 + 0.9 (-0.1 + 0.9 term)
    g = trajectory_returns(3, term, alpha=0.1, gamma=0.9, t_max=4)
    expected = [-0.1 - 0.09 + 0.81 * term, -0.1 + 0.9 * term, term]
    torch.testing.assert_close(g, torch.tensor(expected, dtype=torch.float64))
    # Forced stop at t_max = 4: decisions 1..3 all "continue"; the terminal reward comes at step 4.
    g4 = trajectory_returns(4, 1.0, alpha=0.1, gamma=0.9, t_max=4)
    torch.testing.assert_close(g4, torch.tensor([-0.1 - 0.09 - 0.081 + 0.729, -0.1 - 0.09 + 0.81, -0.1 + 0.9],
                                                dtype=torch.float64))
    # One call: a single decision, "stop", worth the terminal reward.
    torch.testing.assert_close(trajectory_returns(1, 0.7, 0.1, 0.9, 4), torch.tensor([0.7], dtype=torch.float64))
    assert [decision_count(t, 4) for t in (1, 2, 3, 4)] == [1, 2, 3, 3]


def test_discounted_returns_gamma_one_is_a_reverse_cumsum():
    r = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(discounted_returns(r, 1.0), torch.tensor([6.0, 5.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(discounted_returns(r, 0.0), r.double())


def test_batch_returns_match_single_trajectories():
    t_max, alpha, gamma = 6, 0.05, 0.97
    calls = torch.tensor([1, 2, 3, 4, 5, 6, 6, 2])
    terminal = torch.linspace(0.1, 2.0, 8, dtype=torch.float64)
    g, mask = batch_returns(calls, terminal, alpha, gamma, t_max)
    assert g.shape == mask.shape == (8, t_max - 1)
    for b in range(8):
        expected = trajectory_returns(int(calls[b]), float(terminal[b]), alpha, gamma, t_max)
        n = expected.numel()
        assert mask[b].tolist() == [True] * n + [False] * (t_max - 1 - n)
        torch.testing.assert_close(g[b, :n], expected)
        assert (g[b, n:] == 0).all()


def test_expected_speedup_by_hand():
    c = CostModel(T_0=1.0, T_f=0.5, T_eye=0.25, t_max=2, ar_step=0.8)
    # d_1 = (0.5, 0.5, 0): E[l|1] = 0.5; d_2 = (0.25, 0.25, 0.5): E[l|2] = 1.25
    d = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    torch.testing.assert_close(expected_accepted(d), torch.tensor([0.5, 1.25]))
    s = expected_speedup(d, c)  # fixed-depth pricing: T_gen without T_eye = 1.5, 2.0
    torch.testing.assert_close(s, torch.tensor([0.8 * 1.5 / 1.5, 0.8 * 2.25 / 2.0], dtype=torch.float64))
    s_eye = expected_speedup(d, c, controller=True)  # T_gen(1) = 2.0, T_gen(2) = 2.0 + 0.5 = 2.5
    torch.testing.assert_close(s_eye, torch.tensor([0.8 * 1.5 / 2.0, 0.8 * 2.25 / 2.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="t_max"):
        expected_speedup(torch.zeros(3, 4), c)
