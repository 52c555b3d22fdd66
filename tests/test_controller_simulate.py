"""Offline simulation: per-record and aggregate speedups, the oracles, the tuned threshold, the plot."""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest
import torch

from radar.controller.dataset import SCHEMA_VERSION, RecordSet
from radar.controller.synthetic import synthetic_records
from radar.controller.mdp import LLAMA31_8B, CostModel, expected_speedup
from radar.controller.policy import ControllerConfig, LSTMController
from radar.controller.plots import plot
from radar.controller.simulate import (
    evaluate_depths,
    oracle_depths,
    simulate,
    threshold_depths,
    throughput_oracle_depths,
    tune_threshold,
)

CPU_COST = CostModel(T_0=1.0, T_f=0.25, T_eye=0.01, t_max=8, ar_step=1.0)


def make_records(dists: torch.Tensor, states: torch.Tensor | None = None) -> RecordSet:
    n, t_max, _ = dists.shape
    if states is None:
        states = -torch.arange(1.0, t_max + 1)[None, :, None].expand(n, t_max, 2).clone()
    meta = pd.DataFrame({"prompt_id": [str(i) for i in range(n)], "position": 0, "target": "t", "draft": "d",
                         "temperature": 1.0, "schema_version": SCHEMA_VERSION})
    return RecordSet(states, dists, meta)


def random_records(n: int, t_max: int, seed: int) -> RecordSet:
    """Arbitrary valid records: every d_i a random distribution on 0..i."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, t_max, t_max + 1, generator=g) ** 3
    w = w * (torch.arange(t_max + 1)[None, :] <= torch.arange(1, t_max + 1)[:, None])
    states = (-torch.rand(n, t_max, 4, generator=g) * 4).sort(-1, descending=True).values
    return make_records(w / w.sum(-1, keepdim=True), states)


@pytest.mark.parametrize("records", [synthetic_records(300, seed=5), random_records(300, 8, seed=6)],
                         ids=["synthetic", "random"])
@pytest.mark.parametrize("cost", [LLAMA31_8B, CPU_COST], ids=["llama", "cpu"])
def test_oracle_is_at_least_every_fixed_depth_on_every_record(records, cost):
    per_depth = expected_speedup(records.dists, cost)  # (N, t_max), no controller cost, as fixed depths are priced
    chosen = per_depth.gather(1, (oracle_depths(records, cost) - 1)[:, None])
    assert (chosen >= per_depth - 1e-12).all()
    torch.testing.assert_close(chosen.squeeze(1), per_depth.max(1).values)


@pytest.mark.parametrize("seed", range(3))
def test_throughput_oracle_is_the_exhaustive_optimum(seed):
    records = random_records(5, 3, seed)
    cost = CostModel(T_0=0.5, T_f=0.3, T_eye=0.0, t_max=3, ar_step=1.0)
    depths, rate = throughput_oracle_depths(records, cost)
    best = max(evaluate_depths(records, torch.tensor(c), cost, "x").speedup
               for c in itertools.product([1, 2, 3], repeat=5))
    assert evaluate_depths(records, depths, cost, "x").speedup == pytest.approx(best)
    assert rate * cost.ar_time == pytest.approx(best)


def test_ratio_oracle_can_lose_to_a_fixed_depth_in_aggregate():
    """Why `oracle-throughput` exists: per-cycle ratio maximisation is not sum-tokens / sum-time maximisation."""
    dists = torch.tensor([
        [[1.0, 0.0, 0.0], [0.4, 0.0, 0.6]],  # A: tokens 1.0 with one call, 2.2 with two
        [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],  # B: tokens 2.0 either way
    ])
    cost = CostModel(T_0=0.0, T_f=1.0, T_eye=0.0, t_max=2, ar_step=1.0)  # T_gen(i) = i
    res = simulate(make_records(dists), cost)
    assert oracle_depths(make_records(dists), cost).tolist() == [2, 1]
    assert res.policies["oracle"].speedup == pytest.approx((2.2 + 2.0) / 3)
    assert res.policies["fixed-1"].speedup == pytest.approx(1.5)
    assert res.policies["oracle-throughput"].speedup == pytest.approx(1.5)


def test_ratio_of_means_by_hand():
    dists = torch.tensor([
        [[0.5, 0.5, 0.0], [0.5, 0.25, 0.25]],
        [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    ])
    cost = CostModel(T_0=1.0, T_f=1.0, T_eye=0.5, t_max=2, ar_step=2.0)
    r = evaluate_depths(make_records(dists), torch.tensor([1, 2]), cost, "x")
    # tokens: 1.5 and 3.0; times (no T_eye): 2.0 and 3.0
    assert r.speedup == pytest.approx(2.0 * 4.5 / 5.0)
    assert r.speedup_mean_of_ratios == pytest.approx(2.0 * (1.5 / 2.0 + 3.0 / 3.0) / 2)
    assert (r.mean_calls, r.mean_tokens, r.depth_hist) == (1.5, 2.25, [1, 1])
    r_eye = evaluate_depths(make_records(dists), torch.tensor([1, 2]), cost, "x", controller=True)
    assert r_eye.speedup == pytest.approx(2.0 * 4.5 / (3.0 + 4.0))  # T_gen(1) = 3, T_gen(2) = 3 + 1


def test_tuned_threshold_beats_or_ties_both_extremes_on_its_data():
    records = synthetic_records(400, seed=8)
    thr = tune_threshold(records, CPU_COST)
    score = lambda t: evaluate_depths(records, threshold_depths(records.states, t), CPU_COST, "t").speedup
    assert score(thr) >= max(score(0.0), score(1.01), score(0.5)) - 1e-12
    assert threshold_depths(records.states, 0.0).eq(8).all() and threshold_depths(records.states, 1.01).eq(1).all()


def test_simulate_report_and_plot(tmp_path):
    records = synthetic_records(240, seed=9)
    train, test = records[:160], records[160:]
    torch.manual_seed(0)
    ctrl = LSTMController(ControllerConfig(hidden_size=16, mlp_hidden=16))
    res = simulate(test, CPU_COST, controller=ctrl, train_records=train)
    names = list(res.policies)
    assert names == [f"fixed-{i}" for i in range(1, 9)] + ["threshold", "controller", "oracle", "oracle-throughput"]
    for i in range(1, 9):
        assert res.policies[f"fixed-{i}"].mean_calls == i
    for p in res.policies.values():
        assert sum(p.depth_hist) == 80
    assert res.policies["controller"].charged_eye and not res.policies["fixed-8"].charged_eye
    top = res.policies["oracle-throughput"].speedup
    assert all(p.speedup <= top + 1e-9 for n, p in res.policies.items() if n != "controller")
    assert res.best_fixed.name == max((p for n, p in res.policies.items() if n.startswith("fixed-")),
                                      key=lambda p: p.speedup).name
    json.dumps(res.to_dict())
    assert "oracle-throughput" in res.table()
    plot(res, tmp_path / "sim.png")
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="t_max"):
        simulate(test, CostModel(T_0=1.0, T_f=1.0, T_eye=0.0, t_max=4))
