"""Offline training of the controller: config checks, determinism, every variant runs, and it learns a
state-dependent depth on synthetic records."""

from __future__ import annotations

import pytest
import torch

from radar.controller.dataset import train_test_split
from radar.controller.synthetic import synthetic_records
from radar.controller.mdp import CostModel
from radar.controller.policy import ControllerConfig
from radar.controller.simulate import controller_depths, simulate
from radar.controller.train import TrainConfig, auto_beta, policy_loss, train

# Draft calls expensive relative to the fixed cost (as on a CPU), so depth matters and fixed depths are poor.
CPU_COST = CostModel(T_0=1.0, T_f=0.25, T_eye=0.01, t_max=8, ar_step=1.0)
SMALL = ControllerConfig(hidden_size=16, mlp_hidden=16)


def test_config_validation_and_presets():
    for bad in ({"variant": "a2c"}, {"baseline": "critic"}, {"schedule": "step"}, {"reward": "x"},
                {"baseline": "group", "group_size": 1}, {"epochs": 0}, {"gamma": 1.5}, {"beta": 0.0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    eff = TrainConfig(variant="improved").effective()
    assert (eff.expected_reward, eff.baseline) == (True, "group")
    assert TrainConfig(variant="improved", baseline="mean").effective().baseline == "mean"
    paper = TrainConfig()
    assert (paper.expected_reward, paper.baseline, paper.entropy_coef) == (False, "none", 0.0)
    assert (paper.gamma, paper.lr, paper.weight_decay, paper.batch_size, paper.grad_clip) == (0.99, 1e-4, 1e-4, 64, 1.0)
    cfg = TrainConfig(alpha=0.05, cost=CPU_COST)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown train config keys"):
        TrainConfig.from_dict({"alhpa": 1})


def test_auto_beta_normalises_the_deepest_schedule():
    records = synthetic_records(100, seed=0)
    beta = auto_beta(records, CPU_COST)
    rate = (records.dists[:, -1] * torch.arange(9)).sum(-1).double() / CPU_COST.t_gen(8)
    assert beta * float(rate.mean()) == pytest.approx(1.0)


def test_policy_loss_gradient_sign():
    """With identical states everywhere, a reward that only pays for stopping at once pushes P(stop) up."""
    records = synthetic_records(64, seed=1)
    dists = torch.zeros_like(records.dists)
    dists[:, 0, 1] = 1.0  # one call: l = 1 for sure
    dists[:, 1:, 0] = 1.0  # more calls: nothing accepted
    torch.manual_seed(0)
    from radar.controller.policy import LSTMController

    ctrl = LSTMController(SMALL)
    cfg = TrainConfig(cost=CPU_COST, alpha=0.0, expected_reward=True)
    loss, stats = policy_loss(ctrl, records.states, dists, cfg, 1.0, torch.Generator().manual_seed(0))
    loss.backward()
    # d loss / d (continue bias - stop bias) > 0: gradient descent lowers P(continue).
    g = ctrl.mlp[3].bias.grad
    assert g[1] - g[0] > 0
    assert 1 <= stats["calls"] <= 8


@pytest.mark.parametrize("overrides", [
    {},  # the reference: one sampled l_acc, no baseline
    {"expected_reward": True, "baseline": "mean", "entropy_coef": 0.01},
    {"variant": "improved", "group_size": 3, "bonus_in_reward": True},
    {"reward": "throughput", "schedule": "constant"},
])
def test_every_variant_trains(overrides):
    records = synthetic_records(48, seed=2)
    seen = []
    ctrl, hist = train(records, TrainConfig(epochs=2, batch_size=16, cost=CPU_COST, **overrides), SMALL,
                       progress=False, on_epoch=lambda m, _: seen.append(m), eval_records=records[:16])
    assert len(hist) == 2 and seen == hist.epochs
    for key in ("loss", "return", "terminal", "calls", "entropy", "lr", "grad_norm", "eval_speedup", "eval_calls"):
        assert all(torch.isfinite(torch.tensor(e[key])) for e in hist.epochs), key
    assert hist.beta > 0 and not ctrl.training


def test_training_is_deterministic_under_seed_and_early_stop():
    records = synthetic_records(64, seed=3)
    cfg = TrainConfig(epochs=2, batch_size=16, cost=CPU_COST, lr=1e-3)
    rng_before = torch.get_rng_state()
    a, ha = train(records, cfg, SMALL, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's global RNG is left alone
    b, hb = train(records, cfg, SMALL, progress=False)
    c, _ = train(records, TrainConfig(epochs=2, batch_size=16, cost=CPU_COST, lr=1e-3, seed=1), SMALL, progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert ha.epochs == hb.epochs
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    _, hs = train(records, TrainConfig(epochs=5, batch_size=16, cost=CPU_COST), SMALL, progress=False,
                  on_epoch=lambda m, _: m["epoch"] >= 2)
    assert len(hs) == 2


def test_mismatches_are_clear_errors():
    records = synthetic_records(16, t_max=6)
    with pytest.raises(ValueError, match="t_max=6 but the cost model has t_max=8"):
        train(records, TrainConfig(epochs=1, cost=CPU_COST), SMALL, progress=False)
    with pytest.raises(ValueError, match="k=10"):
        train(synthetic_records(16), TrainConfig(epochs=1, cost=CPU_COST), ControllerConfig(input_size=4),
              progress=False)


def test_learns_a_state_dependent_depth_and_beats_every_fixed_depth():
    """Half the prefixes are hopeless (one call is best), half are easy (deep trees pay): no fixed depth suits
    both, the first state already tells them apart, and the trained controller (reference shape) must use it."""
    records = synthetic_records(400, seed=1)
    train_set, test_set = train_test_split(records, seed=1)
    cfg = TrainConfig(variant="improved", group_size=4, lr=3e-3, epochs=4, alpha=0.0, cost=CPU_COST, seed=1)
    ctrl, _ = train(train_set, cfg, progress=False)
    res = simulate(test_set, CPU_COST, controller=ctrl, train_records=train_set)
    learned, fixed = res.policies["controller"], res.best_fixed
    assert learned.speedup > 1.15 * fixed.speedup, res.table()
    assert learned.speedup > 0.85 * res.policies["oracle-throughput"].speedup, res.table()
    depths = controller_depths(ctrl, test_set.states).double()
    conf = test_set.states[:, 0, 0].exp()
    assert depths[conf < 0.4].mean() < 2.5 and depths[conf > 0.8].mean() > 5, res.table()
