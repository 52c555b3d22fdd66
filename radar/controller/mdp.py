"""The RADAR MDP (paper Eqs. 1-7): cost model T_gen, rewards, discounted returns, and expected speedup.

Timing. `T` is the number of draft calls in a cycle, 1 <= T <= t_max. Paper Eq. 6, used exactly:

    T_gen(t) = T_0 + T_f * t + T_eye * (t + 1)    if t < t_max
    T_gen(t) = T_0 + T_f * t + T_eye * t          if t = t_max

T_0 is the per-cycle fixed cost (target verification pass, rerank, bookkeeping), T_f one draft forward, T_eye one
controller query.

Beyond Eq. 6 (both measured by `radar profile`, both absent from the paper's preset so it prices as printed):
  - the verification curve `verify_time(n)`: a target forward over the root plus n tree tokens, measured at a few
    n and interpolated. On a GPU far from compute-bound it is flat (= T_0); on a CPU, or a GPU serving a batch, it
    is not (a 12-token tree costs about 2x a 1-token one on the CPU default pair), so a policy that also chooses
    the verification budget, and any comparison of budgets, is priced with it: T_gen(t, n) = verify_time(n) +
    T_c + T_f * t + T_eye * (decisions).
  - T_c, what a live cycle costs beyond the forwards above (rerank, acceptance walk, cache compaction, the
    head's feature capture and feeding, the context growing), measured in the decoding loop (profile.py), which a
    flat T_0 left out and the live runs pay. Note on counting: in this repo's engine the controller is queried before every call after the
first, so a cycle with t < t_max calls makes t queries and one with t_max calls makes t_max - 1; Eq. 6 charges one
query more in both cases. That is a constant T_eye, i.e. the same as a T_0 larger by T_eye, so it never changes
which depth is best; we keep Eq. 6 as written so constants compare with the paper. (The reference code counts
t from 0 = "calls after the first", so its T_0 absorbs one T_f + T_eye: T_0(ours) = T_0(ref) + T_f + T_eye for
an identical schedule. The preset below keeps the paper's numbers as printed.)

Reward (Eq. 4), decision j = 1..T: r_j = -alpha when the action at j is "continue" (j < T), and the terminal
reward beta * l_acc / T_gen(T) at j = T, where l_acc is the number of accepted draft tokens (bonus token
excluded, as in the reference). When T = t_max the last "continue" is at j = t_max - 1 and the terminal reward
arrives at step t_max with no decision of its own. Returns: G_j = sum_{t=j}^{T} gamma^(t-j) r_t.
`beta` is the reference code's terminal scale (0.03084 for Llama-3.1-8B, eagle/train/eye_llama3-2.json); Eq. 4
has none (beta = 1). Without it, alpha = 0.02 is ~1000x smaller than l_acc / T_gen, which is ~40 per second with
the paper's Llama-3.1-8B constants.

Expected speedup of a cycle that makes i draft calls, against autoregressive decoding:

    speedup(i) = (E[l_acc | i] + 1) / T_gen(i)  /  (1 / ar_step)  =  ar_step * (E[l | i] + 1) / T_gen(i)

E[l | i] = sum_l l * d_i(l) from the record; +1 is the bonus token every cycle emits; 1 / ar_step is the AR
baseline's tokens per second. When `ar_step` is unknown, `ar_time` falls back to T_0: on a GPU one verification
pass over a 60-token tree costs about one AR step (back-solving the paper's Table 1 with the Llama preset gives
AR steps of 0.064-0.082 s against T_0 = 0.0707 s). Measure it (`radar profile`) for real numbers; on a CPU
a verification forward costs more the more tree tokens it carries, so T_0 overstates an AR step and the fallback
is poor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from radar.common.files import write_atomic


@dataclass
class CostModel:
    """Per-cycle timing constants, seconds. The JSON form of this is the "cost file"."""

    T_0: float
    T_f: float
    T_eye: float
    t_max: int = 8
    ar_step: float | None = None  # seconds per token of plain autoregressive decoding, when measured
    # The verification curve: seconds of one target forward over the root plus n tree tokens, measured at
    # n = verify_tokens[j]. Empty: every tree costs T_0 (the paper's model, right on a GPU far from compute-bound).
    verify_tokens: list[int] = field(default_factory=list)
    verify_s: list[float] = field(default_factory=list)
    T_c: float = 0.0  # what a live cycle costs beyond its forwards (bookkeeping, feature capture ...; profile.py)
    budget: int | None = None  # the tree tokens T_0 was measured with: depth-only policies verify this many
    meta: dict = field(default_factory=dict)  # free-form provenance (device, models, how it was measured)

    def __post_init__(self) -> None:
        if self.t_max < 1:
            raise ValueError(f"t_max must be >= 1, got {self.t_max}")
        if min(self.T_0, self.T_f, self.T_eye) < 0 or self.T_0 + self.T_f <= 0:
            raise ValueError(f"cost constants must be >= 0 and T_0 + T_f > 0, got {self}")
        if self.ar_step is not None and self.ar_step <= 0:
            raise ValueError(f"ar_step must be > 0 seconds, got {self.ar_step}")
        if self.T_c < 0 or (self.budget is not None and self.budget < 1):
            raise ValueError(f"T_c must be >= 0 and budget >= 1, got T_c={self.T_c}, budget={self.budget}")
        self.verify_tokens = [int(n) for n in self.verify_tokens]
        self.verify_s = [float(v) for v in self.verify_s]
        if len(self.verify_tokens) != len(self.verify_s) or any(
                b <= a for a, b in zip(self.verify_tokens, self.verify_tokens[1:])) or min(
                self.verify_tokens + [1]) < 1 or min(self.verify_s + [1.0]) <= 0:
            raise ValueError("the verification curve needs increasing token counts >= 1 and as many times > 0, got "
                             f"{self.verify_tokens} and {self.verify_s}")

    # ---- timing ----------------------------------------------------------------------------------------

    def verify_time(self, tokens):
        """Seconds of one verification over the root plus `tokens` tree tokens (an int or a tensor): the measured
        curve, piecewise linear, held flat below its first point and extended along its last segment above its
        last; T_0 whatever the size when no curve was measured."""
        if not self.verify_tokens:
            return torch.full_like(tokens, self.T_0, dtype=torch.float64) if isinstance(tokens, torch.Tensor) \
                else self.T_0
        xs = torch.tensor(self.verify_tokens, dtype=torch.float64)
        ys = torch.tensor(self.verify_s, dtype=torch.float64)
        n = torch.as_tensor(tokens, dtype=torch.float64).clamp(min=float(xs[0]))
        if len(xs) == 1:
            out = ys[0].expand_as(n).clone()
        else:
            j = (torch.searchsorted(xs, n, right=True) - 1).clamp(0, len(xs) - 2)
            out = ys[j] + (ys[j + 1] - ys[j]) * (n - xs[j]) / (xs[j + 1] - xs[j])
        return out if isinstance(tokens, torch.Tensor) else float(out)

    def eye_time(self, t, controller: bool = True):
        """Controller queries of a cycle with t draft calls (Eq. 6's T_eye term); 0 for rules without an LSTM."""
        if not controller:
            return t * 0.0
        if isinstance(t, torch.Tensor):
            return torch.where(t < self.t_max, t + 1, t).double() * self.T_eye
        return (t + 1 if t < self.t_max else t) * self.T_eye

    def t_gen(self, t: int, controller: bool = True, tokens: int | None = None) -> float:
        """Eq. 6 for t draft calls, plus the cycle's bookkeeping T_c; `controller=False` drops the T_eye term
        (fixed-depth and threshold rules do not run the LSTM). With `tokens`, the verification of that many tree
        tokens replaces T_0 (see `verify_time`)."""
        t = int(t)
        if not 1 <= t <= self.t_max:
            raise ValueError(f"t must be in 1..{self.t_max} draft calls, got {t}")
        verify = self.T_0 if tokens is None else self.verify_time(int(tokens))
        return verify + self.T_c + self.T_f * t + self.eye_time(t, controller)

    def t_gen_table(self, controller: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """T_gen(t) for t = 1..t_max as a (t_max,) tensor (index t - 1)."""
        return torch.tensor([self.t_gen(t, controller) for t in range(1, self.t_max + 1)], dtype=dtype)

    def cycle_times(self, calls: torch.Tensor, tokens: torch.Tensor, controller: bool = True) -> torch.Tensor:
        """Seconds of cycles with `calls` draft calls verifying `tokens` tree tokens (same-shape tensors, float64):
        what every policy is priced with when records or a live run know each tree's size."""
        return self.verify_time(tokens) + self.T_c + self.T_f * calls.double() + self.eye_time(calls, controller)

    @property
    def ar_time(self) -> float:
        """Seconds per AR token: `ar_step` when measured, else T_0 (see the module docstring)."""
        return self.ar_step if self.ar_step is not None else self.T_0

    @property
    def speedup_basis(self) -> str:
        """What the AR time behind the speedups is: measured `ar_step`, or the T_0 fallback."""
        return "ar_step" if self.ar_step is not None else "T_0 (ar_step unknown)"

    # ---- the cost file -----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The cost file's JSON content."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "cost model") -> "CostModel":
        """Build from a cost file's content; unknown or missing keys are a one-line error."""
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("T_0", "T_f", "T_eye") if k not in d]
        unknown = sorted(set(d) - known)
        if missing or unknown:
            raise ValueError(
                f"{source}: missing keys {missing}, unknown keys {unknown}; a cost file holds "
                '{"T_0": s, "T_f": s, "T_eye": s, "t_max": 8, "ar_step": s or null, "verify_tokens": [n, ...], '
                '"verify_s": [s, ...], "T_c": s, "budget": n or null, "meta": {...}}'
            )
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        """Write the cost file (JSON)."""
        return write_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        """Read a cost file."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no cost file at {p}; pass a preset name ({', '.join(PRESETS)}) or measure one")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
        return cls.from_dict(d, str(p))

    @classmethod
    def preset(cls, name: str) -> "CostModel":
        """A copy of a named preset (the paper's constants)."""
        if name not in PRESETS:
            raise ValueError(f"unknown cost preset {name!r}; presets: {', '.join(PRESETS)}")
        c = PRESETS[name]
        return cls.from_dict({**c.to_dict(), "meta": dict(c.meta)})

    @classmethod
    def resolve(cls, spec: str | Path) -> "CostModel":
        """A preset name or a cost-file path."""
        return cls.preset(str(spec)) if str(spec) in PRESETS else cls.load(spec)


# The paper's reference constants (2x RTX 3090, seconds).
LLAMA31_8B = CostModel(
    T_0=0.07067, T_f=0.002684, T_eye=0.0004, t_max=8,
    meta={"source": "RADAR paper / reference code eye_llama3-2.json", "device": "2x RTX 3090",
          "target": "Llama-3.1-8B-Instruct", "draft": "EAGLE-3"},
)
PRESETS: dict[str, CostModel] = {"llama3.1-8b": LLAMA31_8B}


# ---- rewards and returns --------------------------------------------------------------------------------


def terminal_reward(l_acc, calls, cost: CostModel, beta: float = 1.0, bonus: bool = False, controller: bool = True):
    """beta * (l_acc [+ 1]) / T_gen(calls); scalars or tensors (calls is then a long tensor of 1..t_max)."""
    if isinstance(calls, torch.Tensor):
        t_gen = cost.t_gen_table(controller).to(calls.device)[calls - 1]
        return beta * (l_acc + float(bonus)) / t_gen
    return beta * (l_acc + float(bonus)) / cost.t_gen(calls, controller)


def rewards(calls: int, terminal: float, alpha: float) -> list[float]:
    """Eq. 4 for one trajectory with `calls` = T draft calls: [-alpha] * (T - 1) + [terminal] (r_1..r_T)."""
    if calls < 1:
        raise ValueError("calls must be >= 1")
    return [-alpha] * (calls - 1) + [terminal]


def discounted_returns(r: torch.Tensor | list[float], gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} along the last dimension."""
    r = torch.as_tensor(r, dtype=torch.float64)
    out = torch.empty_like(r)
    acc = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        acc = r[..., t] + gamma * acc
        out[..., t] = acc
    return out


def decision_count(calls, t_max: int):
    """Decisions a trajectory with `calls` draft calls contains: calls, or t_max - 1 when drafting ran to t_max."""
    if isinstance(calls, torch.Tensor):
        return calls.clamp(max=t_max - 1)
    return min(int(calls), t_max - 1)


def trajectory_returns(calls: int, terminal: float, alpha: float, gamma: float, t_max: int) -> torch.Tensor:
    """Returns G_j of the decisions j = 1..decision_count(calls) of one trajectory (float64)."""
    return discounted_returns(rewards(calls, terminal, alpha), gamma)[: decision_count(calls, t_max)]


def batch_returns(
    calls: torch.Tensor, terminal: torch.Tensor, alpha: float, gamma: float, t_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched `trajectory_returns`: calls (B,) long in 1..t_max, terminal (B,) -> (returns (B, t_max - 1),
    mask (B, t_max - 1) of the decisions taken). Entries past a trajectory's stop are 0 and masked out."""
    steps = torch.arange(1, t_max + 1, device=calls.device)  # reward index t = 1..t_max
    c = calls[:, None]
    r = torch.where(steps < c, -alpha, 0.0).to(terminal.dtype) + torch.where(steps == c, terminal[:, None], 0.0)
    g = discounted_returns(r, gamma).to(terminal.dtype)[:, : t_max - 1]
    mask = steps[None, : t_max - 1] <= decision_count(c, t_max)
    return g * mask, mask


# ---- expected speedup -----------------------------------------------------------------------------------


def expected_accepted(dists: torch.Tensor) -> torch.Tensor:
    """E[l_acc] = sum_l l * d(l) over the last dimension (acceptance lengths 0..t_max)."""
    lengths = torch.arange(dists.shape[-1], dtype=dists.dtype, device=dists.device)
    return (dists * lengths).sum(-1)


def expected_speedup(dists: torch.Tensor, cost: CostModel, controller: bool = False) -> torch.Tensor:
    """Per-depth expected speedup vs AR, ar_time * (E[l | i] + 1) / T_gen(i), for dists (..., t_max, t_max + 1)
    -> (..., t_max), index i - 1 for i draft calls."""
    if dists.shape[-2] != cost.t_max:
        raise ValueError(f"records have t_max={dists.shape[-2]} but the cost model has t_max={cost.t_max}")
    t_gen = cost.t_gen_table(controller).to(dists.device)
    return cost.ar_time * (expected_accepted(dists.double()) + 1) / t_gen
