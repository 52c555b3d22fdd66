"""The RADAR controller: a small LSTM that decides, before every draft call after the first, whether to continue.

Shape (reference code minaduki-sora/RADAR, branch `cm`, `LSTMPolicyNet` in eagle/train/train_hawkeye.py, the
network the paper calls the prediction model and the code calls Hawkeye):

    state s_t (k=10): the top-k cumulative draft log-probs of the frontier after t draft calls, sorted descending
    LSTM(k -> 128, one layer, batch_first)                         -> h_t
    MLP(concat(h_t, s_t): 138 -> 128, ReLU, Dropout, 128 -> 2)     -> logits, index 0 = stop, 1 = continue

Optional budget head (ours, `ControllerConfig.budgets`): Linear(concat(h_t, s_t) -> len(budgets)), read once per
cycle when drafting ends, after the stop decision (or after one more LSTM step on the last frontier when drafting
ran to t_max): it picks how many tree tokens the target verifies. Without budgets the network is the reference's.

The head sees the LSTM output *and* the raw state. The reference concatenates in the order (h_t, s_t); we keep
that order so a reference state dict loads with identical outputs (the key names and shapes alone could not tell
the two orders apart). State-dict keys are exactly `lstm.weight_ih_l0`, `lstm.weight_hh_l0`, `lstm.bias_ih_l0`,
`lstm.bias_hh_l0`, `mlp.0.weight`, `mlp.0.bias`, `mlp.3.weight`, `mlp.3.bias`.

`ControllerPolicy` plugs the network into `radar.decoding.tree.draft_pool` through the
`radar.decoding.stop.StopPolicy` protocol, like the rules that need no learning (`FixedDepth`, `ThresholdPolicy`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from radar.controller.state import frontier_state

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "controller.json"
FORMAT = "radar-controller"
FORMAT_VERSION = 1
# The meta key training sets to False when, under its cost model, the trained policy decodes slower than the target
# alone: then `radar` does not draft at all (the decision before a cycle's first call, which the LSTM cannot make
# since its state starts fresh each cycle, is one constant per controller). Absent means True.
DRAFTS_KEY = "drafts"

STOP, CONTINUE = 0, 1


@dataclass
class ControllerConfig:
    """Sizes of the LSTM controller; the defaults are the reference network."""

    input_size: int = 10  # k: frontier scores per state
    hidden_size: int = 128  # LSTM hidden size
    mlp_hidden: int = 128
    dropout: float = 0.1  # in the head (and between LSTM layers when num_layers > 1)
    num_layers: int = 1
    budgets: list[int] = field(default_factory=list)  # verification budgets the budget head picks among; [] = none

    def __post_init__(self) -> None:
        if min(self.input_size, self.hidden_size, self.mlp_hidden, self.num_layers) < 1:
            raise ValueError("input_size, hidden_size, mlp_hidden and num_layers must all be >= 1")
        self.budgets = [int(b) for b in self.budgets]
        if any(b < 1 for b in self.budgets) or self.budgets != sorted(set(self.budgets)):
            raise ValueError(f"budgets must be increasing tree sizes >= 1, got {self.budgets}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, d: dict) -> "ControllerConfig":
        """Build from a saved config; unknown keys are a one-line error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown controller config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


class LSTMController(nn.Module):
    """LSTM over the per-step frontier scores, with an MLP head on concat(h_t, s_t) giving (stop, continue) logits."""

    def __init__(self, config: ControllerConfig | None = None):
        super().__init__()
        self.config = config = config or ControllerConfig()
        self.lstm = nn.LSTM(
            input_size=config.input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size + config.input_size, config.mlp_hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.mlp_hidden, 2),
        )
        if config.budgets:
            self.budget_head = nn.Linear(config.hidden_size + config.input_size, len(config.budgets))

    @property
    def k(self) -> int:
        """Frontier scores per state."""
        return self.config.input_size

    @property
    def budgets(self) -> list[int]:
        """The verification budgets the budget head chooses among ([] without one)."""
        return self.config.budgets

    def heads(
        self, states: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stop logits (B, T, 2) and budget logits (B, T, len(budgets)), or None without a budget head, for state
        sequences (B, T, k); step t sees states 1..t only."""
        if states.dim() != 3 or states.shape[-1] != self.k:
            raise ValueError(f"states must be (B, T, {self.k}), got {tuple(states.shape)}")
        out, _ = self.lstm(states, hc)
        both = torch.cat((out, states), dim=-1)
        return self.mlp(both), (self.budget_head(both) if self.budgets else None)

    def forward(
        self, states: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Logits (B, T, 2) for a batch of state sequences (B, T, k); decision t sees states 1..t only."""
        return self.heads(states, hc)[0]

    def step(
        self, state: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One decision at inference: state (k,) and the LSTM state so far (None at a cycle's first decision)
        -> (logits (2,), new LSTM state)."""
        x = state.reshape(-1)
        if x.numel() != self.k:
            raise ValueError(f"state must have {self.k} scores, got {state.numel()}")
        if self.training:  # dropout active: go through the modules
            out, hc = self.lstm(x.view(1, 1, -1), hc)
            return self.mlp(torch.cat((out, x.view(1, 1, -1)), dim=-1))[0, 0], hc
        # Inference fast path: the same arithmetic as nn.LSTM / the head in eval mode, as matrix-vector products,
        # which skip most of the per-call overhead of running the modules on a batch of one.
        n, hidden = self.config.num_layers, self.config.hidden_size
        if hc is None:
            hc = (x.new_zeros(n, 1, hidden), x.new_zeros(n, 1, hidden))
        hs, cs, inp = [], [], x
        for i in range(n):
            lstm = self.lstm
            gates = torch.addmv(getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}"),
                                getattr(lstm, f"weight_ih_l{i}"), inp)
            gates = torch.addmv(gates, getattr(lstm, f"weight_hh_l{i}"), hc[0][i, 0])
            g_i, g_f, g_g, g_o = gates.chunk(4)  # PyTorch's gate order: input, forget, cell, output
            c = torch.sigmoid(g_f) * hc[1][i, 0] + torch.sigmoid(g_i) * torch.tanh(g_g)
            inp = torch.sigmoid(g_o) * torch.tanh(c)
            hs.append(inp)
            cs.append(c)
        first, last = self.mlp[0], self.mlp[3]
        z = torch.addmv(first.bias, first.weight, torch.cat((inp, x))).relu_()
        logits = torch.addmv(last.bias, last.weight, z)
        return logits, (torch.stack(hs)[:, None], torch.stack(cs)[:, None])

    # ---- persistence -------------------------------------------------------------------------------------

    def save(self, directory: str | Path, meta: dict | None = None) -> Path:
        """Write `model.safetensors` and `controller.json` (config, format, optional `meta`) into `directory`."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(d / WEIGHTS_FILE), metadata={"format": FORMAT})
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "head_input": "concat(h, state)",
               "config": asdict(self.config), "meta": meta or {}}
        (d / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "LSTMController":
        """Load a controller written by `save`."""
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path, weights_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if not cfg_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"{d} is not a saved controller (needs {CONFIG_FILE} and {WEIGHTS_FILE}); for a reference "
                "PyTorch checkpoint (.pt) use LSTMController.load_reference"
            )
        doc = json.loads(cfg_path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{cfg_path} is not a {FORMAT} config (format={doc.get('format')!r})")
        if doc.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{cfg_path} has format version {doc['format_version']}, this radar reads <= {FORMAT_VERSION}; "
                "upgrade radar"
            )
        model = cls(ControllerConfig.from_dict(doc["config"]))
        model._load_checked(load_file(str(weights_path)), str(weights_path))
        return model.to(map_location)

    @staticmethod
    def read_meta(directory: str | Path) -> dict:
        """The `meta` dict stored by `save` (training config, cost model, metrics ...)."""
        return json.loads((Path(directory) / CONFIG_FILE).read_text()).get("meta", {})

    @staticmethod
    def drafts_at(directory: str | Path) -> bool:
        """Whether the controller saved in `directory` should draft at all (its meta's `DRAFTS_KEY`; True if unset)."""
        return bool(LSTMController.read_meta(directory).get(DRAFTS_KEY, True))

    @classmethod
    def load_reference(
        cls, path: str | Path, config: ControllerConfig | None = None, map_location: str | torch.device = "cpu"
    ) -> "LSTMController":
        """Load a reference-format PyTorch state dict (`torch.save(model.state_dict())` of the reference
        `LSTMPolicyNet`), or a checkpoint dict holding it under 'state_dict' or 'model'. Loaded with
        `weights_only=True`. Without `config`, sizes are read off the tensor shapes (dropout stays 0.1)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no reference checkpoint at {path}")
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            for key in ("state_dict", "model"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(
                f"{path} does not hold a state dict (got {type(obj).__name__}); save the reference model with "
                "torch.save(model.state_dict(), path)"
            )
        sd = {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel / DDP wrappers
        if config is None:
            config = _config_from_shapes(sd, str(path))
        model = cls(config)
        model._load_checked(sd, str(path))
        return model.to(map_location)

    def _load_checked(self, sd: dict[str, torch.Tensor], source: str) -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            hint = ""
            if any(k.startswith("mlp.2.") for k in unexpected):
                hint = (" (this looks like the older Hawkeye head without the state skip-connection, "
                        "Linear(128->64)-ReLU-Linear(64->2); only the LSTMPolicyNet layout is supported)")
            raise ValueError(
                f"{source} does not match the RADAR controller layout{hint}: missing keys {missing}, "
                f"unexpected keys {unexpected}; expected {sorted(expected)}"
            )
        bad = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
        if bad:
            raise ValueError(f"{source}: tensor shapes do not match the controller config {self.config}: {bad}")
        self.load_state_dict({k: v.float() for k, v in sd.items()})


def _config_from_shapes(sd: dict[str, torch.Tensor], source: str) -> ControllerConfig:
    try:
        hidden = sd["lstm.weight_hh_l0"].shape[1]
        input_size = sd["lstm.weight_ih_l0"].shape[1]
        mlp_hidden = sd["mlp.0.weight"].shape[0]
    except KeyError as e:
        raise ValueError(
            f"{source} does not match the RADAR controller layout: missing key {e.args[0]!r}; present keys "
            f"{sorted(sd)}; expected lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0, "
            "mlp.0.weight, mlp.0.bias, mlp.3.weight, mlp.3.bias"
        ) from None
    layers = sum(1 for k in sd if k.startswith("lstm.weight_ih_l"))
    return ControllerConfig(input_size=input_size, hidden_size=hidden, mlp_hidden=mlp_hidden, num_layers=layers)


def load_controller(path: str | Path, map_location: str | torch.device = "cpu") -> LSTMController:
    """A saved controller directory (`LSTMController.save`) or a reference PyTorch checkpoint file."""
    p = Path(path)
    if p.is_dir():
        return LSTMController.load(p, map_location)
    return LSTMController.load_reference(p, map_location=map_location)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))  # no overflow either way


class ControllerPolicy:
    """`StopPolicy` backed by an `LSTMController`: one LSTM step per decision, LSTM state reset every cycle.

    `greedy=True` takes the argmax action (continue when logit[1] > logit[0]); `greedy=False` samples it, as the
    reference does at inference, from its own generator seeded with `seed`. On the CPU a decision is one compiled
    call (`CpuStep`), elsewhere the PyTorch step. Puts the controller in eval mode. Counters: `decisions`,
    `continues`, `cycles`. `drafts=False` asks the decoder not to draft at all (`DRAFTS_KEY`).
    """

    def __init__(self, controller: LSTMController, greedy: bool = True, seed: int = 0, drafts: bool = True):
        self.controller = controller.eval()
        self.greedy = greedy
        self.drafts = drafts
        self.device = next(controller.parameters()).device
        self.rng = random.Random(seed)  # far cheaper per draw than a torch.rand inside the draft loop
        if self.device.type == "cpu":
            from radar.controller.cpu_step import CpuStep  # pulls in Numba: only when a CPU policy is built

            self.cpu = CpuStep(controller)
        else:
            self.cpu = None
        self.hc = None
        self.decisions = self.continues = self.cycles = 0
        self.last_calls = 0  # the calls of the newest decision, so the budget head knows whether it saw the frontier
        self.budget_sum = 0
        if controller.budgets:
            head = controller.budget_head
            self.budget_w = head.weight.detach().float().cpu().numpy()
            self.budget_b = head.bias.detach().float().cpu().numpy()

    def reset(self) -> None:
        """Start a cycle: fresh LSTM state."""
        self.hc = None
        self.last_calls = 0
        self.cycles += 1

    def decide(self, calls: int, frontier_scores: torch.Tensor) -> bool:
        """One LSTM step on the frontier's scores: True to make one more draft call."""
        margin = self._margin(calls, frontier_scores)
        cont = margin > 0 if self.greedy else self.rng.random() < _sigmoid(margin)
        self.decisions += 1
        self.continues += cont
        return cont

    def choose_budget(self, calls: int, frontier_scores: torch.Tensor) -> int | None:
        """The budget head's tree size for this cycle (None without a head), read once drafting has ended: on the
        state of the stop decision, or after one more LSTM step on the last frontier when drafting ran to t_max."""
        if not self.controller.budgets:
            return None
        if calls != self.last_calls:
            self._margin(calls, frontier_scores)
        if self.hc is None:  # the CPU path keeps its LSTM state in the compiled step
            h = self.cpu.h[-1]
        else:
            h = self.hc[0][-1, 0].float().cpu().numpy()
        x = frontier_state(frontier_scores.detach().cpu(), self.controller.k).numpy()
        logits = self.budget_w @ np.concatenate((h, x)) + self.budget_b
        if self.greedy:
            pick = int(logits.argmax())
        else:
            p = np.exp(logits - logits.max())
            pick = min(int(np.searchsorted(np.cumsum(p / p.sum()), self.rng.random())), len(p) - 1)
        budget = self.controller.budgets[pick]
        self.budget_sum += budget
        return budget

    def _margin(self, calls: int, frontier_scores: torch.Tensor) -> float:
        """Continue-minus-stop logit of one LSTM step."""
        self.last_calls = calls
        # Every line here is paid before every draft call (T_eye), so the CPU path avoids torch calls altogether.
        if self.cpu is not None and frontier_scores.is_cpu:
            scores = frontier_scores.detach() if frontier_scores.requires_grad else frontier_scores
            return self.cpu.decide(scores.numpy(), calls <= 1)
        return self._torch_margin(calls, frontier_scores)

    @torch.inference_mode()
    def _torch_margin(self, calls: int, frontier_scores: torch.Tensor) -> float:
        if calls <= 1:  # a cycle's first decision: never carry LSTM state over from the previous cycle
            self.hc = None
        state = frontier_state(frontier_scores, self.controller.k).to(self.device)
        logits, self.hc = self.controller.step(state, self.hc)
        values = logits.float().tolist()
        return values[CONTINUE] - values[STOP]

    @property
    def stats(self) -> dict[str, float]:
        """Decision counters and the continue rate."""
        out = {"decisions": self.decisions, "continues": self.continues, "cycles": self.cycles,
               "continue_rate": self.continues / self.decisions if self.decisions else math.nan}
        if self.controller.budgets:
            out["mean_budget"] = self.budget_sum / self.cycles if self.cycles else math.nan
        return out
