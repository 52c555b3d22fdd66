"""The LSTM controller: reference layout, persistence, reference checkpoints, and the StopPolicy plug-in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from radar.controller.policy import ControllerConfig, ControllerPolicy, LSTMController, load_controller
from radar.controller.state import PAD_LOGPROB, frontier_state
from radar.controller.simulate import controller_depths, policy_depths, threshold_depths
from radar.controller.synthetic import synthetic_records
from radar.decoding.drafters import SmallLMDrafter
from radar.decoding.model import Transformer
from radar.decoding.stop import FixedDepth, ThresholdPolicy
from radar.decoding.tree import TreeConfig, draft_pool

from tiny_models import make_tiny_llama

REFERENCE_SHAPES = {
    "lstm.weight_ih_l0": (512, 10),
    "lstm.weight_hh_l0": (512, 128),
    "lstm.bias_ih_l0": (512,),
    "lstm.bias_hh_l0": (512,),
    "mlp.0.weight": (128, 138),
    "mlp.0.bias": (128,),
    "mlp.3.weight": (2, 128),
    "mlp.3.bias": (2,),
}


class ReferenceLSTMPolicyNet(nn.Module):
    """The reference network as written in minaduki-sora/RADAR (eagle/train/train_hawkeye.py), for comparison."""

    def __init__(self, state_dim=10, lstm_hidden=128, mlp_hidden=128, num_layers=1, dropout=0.1):
        super().__init__()
        self.lstm = nn.LSTM(state_dim, lstm_hidden, num_layers=num_layers, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(lstm_hidden + state_dim, mlp_hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_hidden, 2))

    def forward(self, state_seq, hidden=None):
        lstm_out, hidden = self.lstm(state_seq, hidden)
        return self.mlp(torch.cat((lstm_out, state_seq), dim=-1)), hidden


def seeded_controller(seed: int = 0, **cfg) -> LSTMController:
    torch.manual_seed(seed)
    return LSTMController(ControllerConfig(**cfg)).eval()


def random_states(b: int = 3, t: int = 7, k: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(b, t, k, generator=g).mul(3).cumsum(-1) - torch.arange(t)[None, :, None]


def test_state_dict_keys_and_shapes_match_the_reference():
    sd = LSTMController().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == REFERENCE_SHAPES
    assert {k: tuple(v.shape) for k, v in ReferenceLSTMPolicyNet().state_dict().items()} == REFERENCE_SHAPES


@pytest.mark.parametrize("layers", [1, 2])
def test_forward_shapes_and_step_matches_forward(layers):
    """`step` (the inference fast path, and the module path in training mode) reproduces `forward` step by step."""
    model = seeded_controller(num_layers=layers, dropout=0.0)
    states = random_states()
    logits = model(states)
    assert logits.shape == (3, 7, 2)
    for training in (False, True):
        model.train(training)
        for b in range(3):
            hc = None
            for t in range(7):
                step_logits, hc = model.step(states[b, t], hc)
                torch.testing.assert_close(step_logits, logits[b, t], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="states must be"):
        model(states[..., :9])
    with pytest.raises(ValueError, match="state must have"):
        model.step(states[0, 0, :9])


def test_save_load_round_trip(tmp_path):
    model = seeded_controller(3, hidden_size=32, mlp_hidden=16, dropout=0.2)
    model.save(tmp_path / "ctrl", meta={"alpha": 0.02})
    assert sorted(p.name for p in (tmp_path / "ctrl").iterdir()) == ["controller.json", "model.safetensors"]
    loaded = LSTMController.load(tmp_path / "ctrl")
    assert loaded.config == model.config
    assert LSTMController.read_meta(tmp_path / "ctrl") == {"alpha": 0.02}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    states = random_states()
    torch.testing.assert_close(loaded.eval()(states), model(states), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="load_reference"):
        LSTMController.load(tmp_path)
    assert load_controller(tmp_path / "ctrl").config == model.config


def test_load_rejects_a_newer_format(tmp_path):
    d = seeded_controller().save(tmp_path / "c")
    doc = json.loads((d / "controller.json").read_text())
    doc["format_version"] = 99
    (d / "controller.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="upgrade radar"):
        LSTMController.load(d)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_load_reference_gives_the_reference_outputs(tmp_path, wrap):
    torch.manual_seed(1)
    ref = ReferenceLSTMPolicyNet().eval()
    sd = ref.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "ref.pt")
    model = LSTMController.load_reference(tmp_path / "ref.pt").eval()
    assert model.config == ControllerConfig()
    assert load_controller(tmp_path / "ref.pt").config == model.config
    states = random_states()
    # The head reads concat(h, state) in the reference's order, so outputs agree exactly.
    torch.testing.assert_close(model(states), ref(states)[0], rtol=1e-6, atol=1e-6)


def test_load_reference_infers_sizes(tmp_path):
    ref = ReferenceLSTMPolicyNet(lstm_hidden=64, mlp_hidden=32)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    model = LSTMController.load_reference(tmp_path / "ref.pt")
    assert (model.config.hidden_size, model.config.mlp_hidden, model.config.input_size) == (64, 32, 10)


def test_load_reference_errors(tmp_path):
    sd = ReferenceLSTMPolicyNet().state_dict()
    wrong = dict(sd)
    wrong["head.weight"] = wrong.pop("mlp.3.weight")
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"missing keys \['mlp.3.weight'\], unexpected keys \['head.weight'\]"):
        LSTMController.load_reference(tmp_path / "wrong.pt")

    # The older Hawkeye head (no state skip, Linear-ReLU-Linear) is named in the error.
    old = {k: v for k, v in sd.items() if k.startswith("lstm.")}
    old.update({"mlp.0.weight": torch.zeros(64, 128), "mlp.0.bias": torch.zeros(64),
                "mlp.2.weight": torch.zeros(2, 64), "mlp.2.bias": torch.zeros(2)})
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="older Hawkeye head"):
        LSTMController.load_reference(tmp_path / "old.pt")

    torch.save(sd, tmp_path / "ok.pt")
    with pytest.raises(ValueError, match="shapes do not match"):
        LSTMController.load_reference(tmp_path / "ok.pt", config=ControllerConfig(hidden_size=64))

    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        LSTMController.load_reference(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        LSTMController.load_reference(tmp_path / "missing.pt")


def test_frontier_state_pads_truncates_and_clamps():
    s = frontier_state(torch.tensor([-1.0, -3.0, float("-inf"), -2.0]), 6)
    assert s.tolist() == [-1.0, -2.0, -3.0, PAD_LOGPROB, PAD_LOGPROB, PAD_LOGPROB]
    assert frontier_state(-torch.arange(12.0), 10).tolist() == (-torch.arange(10.0)).tolist()
    assert frontier_state(torch.tensor([-0.5], dtype=torch.float64), 1).dtype == torch.float32


def test_controller_policy_resets_per_cycle_and_counts():
    model = seeded_controller()
    states = random_states(b=1)[0]
    pol = ControllerPolicy(model, greedy=True)
    pol.reset()
    first = [pol.decide(t + 1, states[t]) for t in range(7)]
    pol.reset()
    second = [pol.decide(t + 1, states[t]) for t in range(7)]
    assert first == second  # nothing carried over between cycles
    assert pol.decisions == 14 and pol.cycles == 2 and pol.continues == 2 * sum(first)
    # Greedy decisions are the argmax of the batched forward.
    logits = model(states[None])[0]
    assert first == (logits[:, 1] > logits[:, 0]).tolist()


def test_sampled_policy_is_seeded():
    model = seeded_controller()
    states = random_states(b=1)[0]

    def run(seed):
        pol = ControllerPolicy(model, greedy=False, seed=seed)
        out = []
        for _ in range(20):
            pol.reset()
            out += [pol.decide(t + 1, states[t]) for t in range(7)]
        return out

    assert run(5) == run(5)
    assert 0 < sum(run(5)) < 140  # actually sampled, not constant


def test_policy_depths_agree_with_the_batched_helpers():
    records = synthetic_records(40, seed=3)
    model = seeded_controller(2)
    assert torch.equal(policy_depths(records, ControllerPolicy(model)), controller_depths(model, records.states))
    for thr in (0.0, 0.05, 0.3, 0.9, 1.5):
        assert torch.equal(policy_depths(records, ThresholdPolicy(thr)), threshold_depths(records.states, thr))
    assert policy_depths(records, FixedDepth(3)).eq(3).all()


@pytest.fixture(scope="module")
def tiny_drafter(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("ctrl"), vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, seed=5)
    return Transformer.from_pretrained(path)


@torch.inference_mode()
@pytest.mark.parametrize("bias, expected_calls", [(+20.0, 5), (-20.0, 1)])
def test_controller_policy_drives_draft_pool(tiny_drafter, bias, expected_calls):
    """Plugged into the real tree builder: an always-continue controller reaches max_calls, an always-stop one
    stops after the first call, and the controller sees exactly the pool's frontier scores."""
    model = seeded_controller(0, input_size=4)
    with torch.no_grad():
        model.mlp[3].bias.copy_(torch.tensor([0.0, bias]))
        model.mlp[3].weight.zero_()
    pol = ControllerPolicy(model)
    drafter = SmallLMDrafter(tiny_drafter)
    drafter.begin(128)
    pol.reset()
    pool = draft_pool(drafter, torch.tensor([3, 7, 11]), 2, TreeConfig(branching=4, max_calls=5, total_tokens=20), pol)
    assert pool.draft_calls == expected_calls
    assert pol.decisions == min(expected_calls, 4)
    assert len(pool.frontier_scores) == pol.decisions


@torch.inference_mode()
def test_controller_policy_decisions_match_its_view_of_the_pool(tiny_drafter):
    """A random controller in draft_pool decides exactly as the batched forward on the frontier scores it saw."""
    for seed in range(4):
        model = seeded_controller(seed, input_size=4)
        with torch.no_grad():
            model.mlp[3].bias.copy_(torch.tensor([0.0, 0.3]))
        pol = ControllerPolicy(model)
        drafter = SmallLMDrafter(tiny_drafter)
        drafter.begin(128)
        pol.reset()
        pool = draft_pool(drafter, torch.tensor([1, 2, 5]), 2, TreeConfig(4, 6, 20), pol)
        seen = torch.stack([frontier_state(s, 4) for s in pool.frontier_scores])
        logits = model(seen[None])[0]
        cont = (logits[:, 1] > logits[:, 0]).tolist()
        expected = cont.index(False) + 1 if False in cont else 6
        assert pool.draft_calls == expected


@pytest.mark.parametrize("layers", [1, 2])
def test_cpu_step_matches_the_torch_step_over_a_cycle(layers):
    from radar.controller.cpu_step import CpuStep

    torch.manual_seed(layers)
    controller = LSTMController(ControllerConfig(input_size=4, hidden_size=24, mlp_hidden=12, num_layers=layers)).eval()
    cpu = CpuStep(controller)
    hc = None
    for step in range(6):
        scores = torch.randn(3 + step) * 3 - 4  # fewer and more scores than k
        scores[0] = float("-inf")
        if step == 2:
            scores[1] = float("nan")
        with torch.no_grad():
            logits, hc = controller.step(frontier_state(scores, 4), hc)
        margin = cpu.decide(scores.numpy(), fresh=step == 0)
        assert margin == pytest.approx(float(logits[1] - logits[0]), abs=1e-5)
        assert np.allclose(cpu.h, hc[0][:, 0].numpy(), atol=1e-6)
        assert np.allclose(cpu.c, hc[1][:, 0].numpy(), atol=1e-6)


def test_cpu_step_starts_a_fresh_cycle_from_zero_state():
    from radar.controller.cpu_step import CpuStep

    cpu = CpuStep(seeded_controller(3, input_size=4))
    scores = np.array([-0.1, -0.7, -2.0], np.float32)
    first = cpu.decide(scores, fresh=True)
    cpu.decide(scores, fresh=False)
    assert cpu.decide(scores, fresh=True) == first
