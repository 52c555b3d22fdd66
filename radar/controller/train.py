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
    variant="exact" needs no sampling: the records hold every depth's (and budget's) outcome, so the expected
        throughput objective E[tokens] - lambda E[time] - alpha E[continues] is summed over all of them and
        differentiated exactly (`exact_loss`); lambda is the batch's own rate, as for the throughput reward.
    variant="ppo" is PPO-style, as Learning to Draft (ICLR 2026) trains with a throughput reward: the throughput
        reward, expected_reward=True, baseline="mean" unless set, and `ppo_epochs` clipped steps (ratio clip `clip`)
        on each batch of rollouts instead of one.

A controller with a budget head (`ControllerConfig.budgets`) is trained jointly on records of schema 2: the head's
choice b at the stop is one more action, priced by the (calls, budget) tables of `radar.controller.budgets`; its
advantage is the terminal reward less the baseline (the group advantage with baseline="group").

beta (the terminal scale, the reference code's `beta`): None means 1 / mean_records(E[l | t_max] / T_gen(t_max)),
so the terminal reward is about 1 for the deepest fixed schedule and alpha reads "per-call penalty in units of the
fixed-t_max throughput" (the reference used beta = 0.03084 for Llama-3.1-8B, close to that normalisation).
Optimiser as the reference: Adam(lr, weight_decay), grad-norm clip, cosine annealing per epoch to `min_lr`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from radar.controller.dataset import RecordSet
from radar.controller.mdp import CostModel, expected_accepted
from radar.controller.objectives import exact_loss, joint_shapes, log_policy, policy_loss, rollout, surrogate
from radar.controller.train_config import TrainConfig
from radar.controller.policy import ControllerConfig, LSTMController
from radar.controller.budgets import JointTable, budget_dists, depth_times, joint_table, tree_tokens
from radar.controller.simulate import controller_choices, controller_depths, evaluate_choices, evaluate_depths

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


def imitate_threshold(controller: LSTMController, records: RecordSet, cfg: TrainConfig,
                      generator: torch.Generator) -> dict:
    """Behaviour cloning of the threshold rule tuned on `records` (with its tuned budget for a budget head), the
    start of training with init="threshold". Why: from a random start every variant drives P(continue) towards 0
    wherever deep trees cost more than they give on average, and a saturated stop gets almost no gradient back at
    the states where one more call would pay, so the policy settles on one depth; the rule is a start that
    already drafts deeper where the frontier is confident, and training moves on from it."""
    from radar.controller.simulate import threshold_depths, tune_threshold, tune_threshold_budget

    budgets = controller.budgets
    if budgets:
        threshold, budget = tune_threshold_budget(records, cfg.cost, budgets)
    else:
        threshold, budget = tune_threshold(records, cfg.cost), None
    device = next(controller.parameters()).device
    states = records.states.to(device)
    t_max = records.t_max
    calls = threshold_depths(records.states, threshold).to(device)
    steps = torch.arange(1, t_max, device=device)
    target = (steps[None] < calls[:, None]).long()  # continue before every call the rule makes
    mask = steps[None] <= calls.clamp(max=t_max - 1)[:, None]  # the decisions the rule takes
    opt = torch.optim.Adam(controller.parameters(), lr=3e-3)
    controller.train()
    for _ in range(cfg.init_epochs):
        perm = torch.randperm(states.shape[0], generator=generator, device=device)
        for i in range(0, states.shape[0], cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            logp, logp_b = log_policy(controller, states[idx])
            nll = -(logp.gather(-1, target[idx][..., None]).squeeze(-1) * mask[idx]).sum() / mask[idx].sum()
            if logp_b is not None:
                at_stop = logp_b[torch.arange(idx.numel(), device=device), calls[idx] - 1]
                nll = nll - at_stop[:, budgets.index(budget)].mean()
            opt.zero_grad(set_to_none=True)
            nll.backward()
            opt.step()
    return {"threshold": threshold, "budget": budget}


def evaluate_controller(controller: LSTMController, records: RecordSet, cost: CostModel,
                        table: JointTable | None = None):
    """The greedy controller's simulated `PolicyResult` on `records` (its budgets too when it has a head, priced by
    `table` when given: the records' joint table for the controller's budgets, built once for many calls)."""
    if controller.budgets:
        depths, picks = controller_choices(controller, records.states)
        table = table or joint_table(records, cost, controller.budgets, controller=True)
        return evaluate_choices(table, depths, picks, "controller+budget", ar_time=cost.ar_time)
    return evaluate_depths(records, controller_depths(controller, records.states), cost, "controller",
                           controller=True)


def train_epoch(
    controller: LSTMController,
    opt: torch.optim.Optimizer,
    states: torch.Tensor,
    dists: torch.Tensor,
    cfg: TrainConfig,
    beta: float,
    generator: torch.Generator,
    time: torch.Tensor | None = None,
) -> dict[str, float]:
    """One pass over the records in a random order, one optimiser step per batch (`ppo_epochs` steps on the same
    rollouts for PPO); the batch statistics averaged."""
    controller.train()
    eff = cfg.effective()
    rollouts = eff.group_size if eff.baseline == "group" else 1
    dists, time = joint_shapes(dists, time, cfg)

    def step(loss: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(controller.parameters(), cfg.grad_clip)
        opt.step()
        return float(norm)

    perm = torch.randperm(states.shape[0], generator=generator, device=states.device)
    sums: dict[str, float] = {}
    steps = 0
    for i in range(0, states.shape[0], cfg.batch_size):
        idx = perm[i:i + cfg.batch_size]
        s, d = states[idx], dists[idx]
        if rollouts > 1:
            s, d = s.repeat_interleave(rollouts, 0), d.repeat_interleave(rollouts, 0)
        logp, logp_b = log_policy(controller, s)
        if eff.variant == "exact":
            loss, stats = exact_loss(logp, logp_b, d, time, cfg, beta)
            gn = step(loss)
        else:
            ro = rollout(logp.detach(), None if logp_b is None else logp_b.detach(), d, time, cfg, beta, generator)
            for update in range(cfg.ppo_epochs if eff.variant == "ppo" else 1):
                if update:  # PPO: the same rollouts again under the updated policy, clipped
                    logp, logp_b = log_policy(controller, s)
                loss, entropy = surrogate(logp, logp_b, ro, cfg)
                gn = step(loss)
            stats = {**ro.stats, "entropy": float(entropy.detach())}
        stats.update(loss=float(loss.detach()), grad_norm=gn)
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
    eff = cfg.effective()
    beta = cfg.beta if cfg.beta is not None else auto_beta(records, cfg.cost, eff.reward)
    device = torch.device(cfg.device)
    states = records.states.to(device)
    if controller_cfg.budgets:
        dists = budget_dists(records, controller_cfg.budgets).to(device)
        sizes = tree_tokens(records.t_max, records.k, controller_cfg.budgets)
        calls = torch.arange(1, records.t_max + 1)[:, None].expand_as(sizes)
        time = cfg.cost.cycle_times(calls, sizes, controller=True).to(device)
    else:
        dists = records.dists.to(device)
        budget = records.budget if cfg.cost.verify_tokens else 0  # a flat T_0 prices every budget alike
        time = depth_times(cfg.cost, records.t_max, records.k, budget, controller=True).to(device)

    eval_table = (joint_table(eval_records, cfg.cost, controller_cfg.budgets, controller=True)
                  if eval_records is not None and controller_cfg.budgets else None)  # once, not every epoch

    from tqdm.auto import tqdm

    history: list[dict] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # init and dropout
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # shuffling, actions, l_acc samples
        controller = LSTMController(controller_cfg).to(device)
        if cfg.init == "threshold":
            imitate_threshold(controller, records, cfg, gen)
        opt = torch.optim.Adam(controller.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=min(cfg.min_lr, cfg.lr))
                 if cfg.schedule == "cosine" else None)
        bar = tqdm(range(cfg.epochs), desc="train controller", disable=not progress, dynamic_ncols=True)
        for epoch in bar:
            lr = opt.param_groups[0]["lr"]
            means = train_epoch(controller, opt, states, dists, cfg, beta, gen, time)
            if sched is not None:
                sched.step()
            metrics = {"epoch": epoch + 1, "lr": lr, **means}
            if eval_records is not None:
                res = evaluate_controller(controller, eval_records, cfg.cost, eval_table)
                metrics["eval_speedup"], metrics["eval_calls"] = res.speedup, res.mean_calls
            history.append(metrics)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "calls", "return", "eval_speedup")
                             if k in metrics and not math.isnan(metrics[k])})
            if on_epoch is not None and on_epoch(metrics, controller):
                break
        bar.close()
    controller.eval()
    return controller, TrainHistory(history, beta, {**cfg.to_dict(), "effective": asdict(cfg.effective())})


__all__ = ["TrainConfig", "TrainHistory", "train", "train_epoch", "auto_beta", "policy_loss", "imitate_threshold",
           "evaluate_controller"]
