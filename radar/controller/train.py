"""Offline policy-gradient training of the controller on acceptance-length records (paper Sec. 2.2, Eq. 7).

Each step samples trajectories from the current policy on the records' own states: decision j (before draft call
j + 1) sees s_1..s_j and continues with probability softmax(logits)[1]; the first stop at decision j gives T = j
draft calls, and T = t_max when every decision continues (forced stop). The record's d_T then prices the
trajectory: r = -alpha per continue, terminal beta * l_acc / T_gen(T) (see `radar.controller.mdp`). Because every
state the policy can reach is in the record (the draft tree does not depend on the controller's choices, only its
depth does), the rollouts are exactly on-policy: no extrapolation error.

Variants (`TrainConfig`):
    variant="reinforce" with the defaults is the reference exactly: one l_acc ~ d_T sampled per trajectory,
        reward-to-go returns G_j with discount gamma, no baseline, loss -sum_j G_j log pi(a_j | s_<=j).
    expected_reward=True  uses E[l_acc | T] = sum_l l * d_T(l) instead of one sample (removes the sampling noise of
        l_acc at no cost: the expectation is exact given the record).
    baseline="mean"   subtracts, per decision index j, the batch mean of G_j (variance reduction; the estimator
        stays unbiased up to the O(1/B) self-inclusion of the sample).
    baseline="group"  GRPO-style: `group_size` rollouts per record; every decision of a rollout gets the
        advantage (R - mean_group R) / (std_group R + eps), R = G_1 its total discounted return.
    entropy_coef > 0  adds an entropy bonus on the decisions taken.
    bonus_in_reward=True prices the terminal reward with l_acc + 1 (the tokens a cycle actually emits, which is
        what speedup counts); the reference excludes the bonus token.
    reward="throughput" replaces the terminal reward by beta * ((l_acc + 1) - lambda * T_gen(T)), lambda = the
        batch's own rate sum(l_acc + 1) / sum(T_gen). Maximising E[tokens] - lambda* E[time] at the optimal rate
        lambda* is exactly maximising the long-run throughput E[tokens] / E[time] (Dinkelbach), which is the
        ratio-of-means speedup `simulate` reports; Eq. 4's per-cycle ratio is a different objective whose per-prefix
        optimum ("oracle") can lose to a fixed depth in aggregate. The batch rate is a running estimate of lambda*.
    variant="improved" is a preset: expected_reward=True and baseline="group" (unless another baseline is set).

beta (the terminal scale, the reference code's `beta`): None means 1 / mean_records(E[l | t_max] / T_gen(t_max)),
so the terminal reward is about 1 for the deepest fixed schedule and alpha reads "per-call penalty in units of the
fixed-t_max throughput" (the reference used beta = 0.03084 for Llama-3.1-8B, close to that normalisation).
Optimiser as the reference: Adam(lr, weight_decay), grad-norm clip, cosine annealing per epoch to `min_lr`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import torch

from radar.controller.dataset import RecordSet
from radar.controller.mdp import CostModel, batch_returns, expected_accepted, terminal_reward
from radar.controller.policy import CONTINUE, ControllerConfig, LSTMController
from radar.controller.simulate import controller_depths, depths_from_continues, evaluate_depths

VARIANTS = ("reinforce", "improved")
BASELINES = ("none", "mean", "group")
SCHEDULES = ("cosine", "constant")
REWARDS = ("ratio", "throughput")


@dataclass
class TrainConfig:
    """Training settings; the defaults are the reference's REINFORCE (see the module docstring)."""

    alpha: float = 0.02  # penalty per "continue"
    gamma: float = 0.99
    beta: float | None = None  # terminal reward scale; None = auto (module docstring)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    epochs: int = 100
    batch_size: int = 64  # records per step (each expanded to group_size rollouts with baseline="group")
    grad_clip: float = 1.0
    schedule: str = "cosine"
    min_lr: float = 1e-6
    seed: int = 0
    variant: str = "reinforce"
    expected_reward: bool = False
    baseline: str = "none"
    group_size: int = 8
    entropy_coef: float = 0.0
    bonus_in_reward: bool = False
    reward: str = "ratio"  # "ratio" (Eq. 4) | "throughput" (tokens - lambda * time, see the module docstring)
    cost: CostModel = field(default_factory=lambda: CostModel.preset("llama3.1-8b"))
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.cost, dict):
            self.cost = CostModel.from_dict(self.cost)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0")
        if self.beta is not None and self.beta <= 0:
            raise ValueError("beta must be > 0 (or None for auto)")
        if self.effective().baseline == "group" and self.group_size < 2:
            raise ValueError("baseline='group' needs group_size >= 2")

    def effective(self) -> "TrainConfig":
        """The settings actually used: the 'improved' preset filled in."""
        if self.variant != "improved":
            return self
        return replace(self, variant="reinforce", expected_reward=True,
                       baseline="group" if self.baseline == "none" else self.baseline)

    def to_dict(self) -> dict:
        """Plain dict of the settings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict; unknown keys are a one-line error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainHistory:
    """Per-epoch metrics (`epochs`, a list of dicts), plus the resolved beta and the config used."""

    epochs: list[dict]
    beta: float
    config: dict

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, i):
        return self.epochs[i]

    def metric(self, name: str) -> list[float]:
        """One metric over the epochs."""
        return [e[name] for e in self.epochs]


def auto_beta(records: RecordSet, cost: CostModel, reward: str = "ratio") -> float:
    """"ratio": 1 / mean over records of E[l | t_max] / T_gen(t_max); "throughput": 1 / mean(E[l | t_max] + 1)."""
    e = expected_accepted(records.dists[:, -1].double())
    m = float((e / cost.t_gen(cost.t_max)).mean()) if reward == "ratio" else float((e + 1).mean())
    return 1.0 / m if m > 0 else 1.0


def policy_loss(
    controller: LSTMController,
    states: torch.Tensor,
    dists: torch.Tensor,
    cfg: TrainConfig,
    beta: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Roll the policy out once per row of (states (B, t_max, k), dists (B, t_max, t_max + 1)) -- rows already
    repeated group_size times for the group baseline -- and return the REINFORCE loss and batch statistics."""
    cfg = cfg.effective()
    n, t_max, _ = states.shape
    logp = torch.log_softmax(controller(states[:, : t_max - 1]).float(), dim=-1)  # (B, D, 2)
    with torch.no_grad():
        u = torch.rand(logp.shape[:-1], generator=generator, device=generator.device).to(logp.device)
        cont = u < logp[..., CONTINUE].exp()
        calls = depths_from_continues(cont)
        d_t = dists[torch.arange(n, device=dists.device), calls - 1].double().clamp_min(0)
        if cfg.expected_reward:
            l_acc = expected_accepted(d_t)
        else:
            l_acc = torch.multinomial(d_t.cpu(), 1, generator=_cpu_gen(generator)).squeeze(1).to(d_t)
        if cfg.reward == "ratio":
            terminal = terminal_reward(l_acc, calls, cfg.cost, beta, cfg.bonus_in_reward, controller=True)
        else:  # throughput: emitted tokens minus the batch's own rate times this cycle's time
            tokens = l_acc + 1
            t_gen = cfg.cost.t_gen_table(controller=True).to(calls.device)[calls - 1]
            terminal = beta * (tokens - tokens.sum() / t_gen.sum() * t_gen)
        returns, mask = batch_returns(calls, terminal, cfg.alpha, cfg.gamma, t_max)
        if cfg.baseline == "none":
            adv = returns
        elif cfg.baseline == "mean":
            m = mask.double()
            adv = returns - (returns * m).sum(0) / m.sum(0).clamp_min(1)
        else:  # group: rows come in consecutive groups of group_size rollouts of one record
            r = returns[:, 0].view(-1, cfg.group_size)
            a = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-8)
            adv = a.reshape(-1, 1).expand_as(returns)
        adv = (adv * mask).float()
    logp_a = logp.gather(-1, cont.long()[..., None]).squeeze(-1)
    maskf = mask.float()
    loss = -(adv * logp_a * maskf).sum() / n
    entropy = -(logp.exp() * logp).sum(-1)
    mean_entropy = (entropy * maskf).sum() / maskf.sum()
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * mean_entropy
    stats = {"return": float(returns[:, 0].mean()), "terminal": float(terminal.mean()),
             "calls": float(calls.double().mean()), "entropy": float(mean_entropy.detach())}
    return loss, stats


def _cpu_gen(g: torch.Generator) -> torch.Generator:
    """torch.multinomial wants a generator on its input's device; l_acc is drawn on the CPU, seeded from `g`."""
    if g.device.type == "cpu":
        return g
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)))


def train_epoch(
    controller: LSTMController,
    opt: torch.optim.Optimizer,
    states: torch.Tensor,
    dists: torch.Tensor,
    cfg: TrainConfig,
    beta: float,
    generator: torch.Generator,
) -> dict[str, float]:
    """One pass over the records in a random order, one optimiser step per batch; the batch statistics averaged."""
    controller.train()
    eff = cfg.effective()
    rollouts = eff.group_size if eff.baseline == "group" else 1
    perm = torch.randperm(states.shape[0], generator=generator, device=states.device)
    sums: dict[str, float] = {}
    steps = 0
    for i in range(0, states.shape[0], cfg.batch_size):
        idx = perm[i:i + cfg.batch_size]
        s, d = states[idx], dists[idx]
        if rollouts > 1:
            s, d = s.repeat_interleave(rollouts, 0), d.repeat_interleave(rollouts, 0)
        loss, stats = policy_loss(controller, s, d, cfg, beta, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(controller.parameters(), cfg.grad_clip)
        opt.step()
        stats["loss"], stats["grad_norm"] = float(loss.detach()), float(gn)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
    return {k: v / steps for k, v in sums.items()}


def train(
    records: RecordSet,
    cfg: TrainConfig | None = None,
    controller_cfg: ControllerConfig | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict, LSTMController], bool | None] | None = None,
    eval_records: RecordSet | None = None,
) -> tuple[LSTMController, TrainHistory]:
    """Train a fresh controller on `records`; deterministic for a given `cfg.seed` (on one device).

    `on_epoch(metrics, controller)` is called after every epoch with that epoch's metrics dict and the model being
    trained (Tune / MLflow reporting, checkpoints); it may return True to stop early. With `eval_records`, each
    epoch also reports the greedy controller's expected speedup on them (`eval_speedup`, `eval_calls`)."""
    cfg = cfg or TrainConfig()
    controller_cfg = controller_cfg or ControllerConfig(input_size=records.k)
    if len(records) == 0:
        raise ValueError("no training records")
    if records.t_max < 2:
        raise ValueError("records with t_max = 1 leave the controller no decision to learn")
    if records.t_max != cfg.cost.t_max:
        raise ValueError(f"records have t_max={records.t_max} but the cost model has t_max={cfg.cost.t_max}")
    if records.k != controller_cfg.input_size:
        raise ValueError(f"records have k={records.k} frontier scores but the controller takes "
                         f"input_size={controller_cfg.input_size}")
    beta = cfg.beta if cfg.beta is not None else auto_beta(records, cfg.cost, cfg.reward)
    device = torch.device(cfg.device)
    states, dists = records.states.to(device), records.dists.to(device)

    from tqdm.auto import tqdm

    history: list[dict] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # init and dropout
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # shuffling, actions, l_acc samples
        controller = LSTMController(controller_cfg).to(device)
        opt = torch.optim.Adam(controller.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=min(cfg.min_lr, cfg.lr))
                 if cfg.schedule == "cosine" else None)
        bar = tqdm(range(cfg.epochs), desc="train controller", disable=not progress, dynamic_ncols=True)
        for epoch in bar:
            lr = opt.param_groups[0]["lr"]
            means = train_epoch(controller, opt, states, dists, cfg, beta, gen)
            if sched is not None:
                sched.step()
            metrics = {"epoch": epoch + 1, "lr": lr, **means}
            if eval_records is not None:
                res = evaluate_depths(eval_records, controller_depths(controller, eval_records.states), cfg.cost,
                                      "controller", controller=True)
                metrics["eval_speedup"], metrics["eval_calls"] = res.speedup, res.mean_calls
            history.append(metrics)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "calls", "return", "eval_speedup")
                             if k in metrics and not math.isnan(metrics[k])})
            if on_epoch is not None and on_epoch(metrics, controller):
                break
        bar.close()
    controller.eval()
    return controller, TrainHistory(history, beta, {**cfg.to_dict(), "effective": asdict(cfg.effective())})
