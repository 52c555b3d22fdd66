"""The losses the controller is trained with, on rollouts over the records (see `radar.controller.train` for the
variants and their settings): REINFORCE (paper-exact or improved), PPO's clipped surrogate, and the exact expected
throughput summed over every (calls, budget) outcome a record holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radar.controller.mdp import batch_returns, expected_accepted
from radar.controller.policy import CONTINUE, LSTMController
from radar.controller.simulate import depths_from_continues
from radar.controller.train_config import TrainConfig


@dataclass
class Rollout:
    """One batch of sampled trajectories: the actions taken, their advantages and their log-probs when sampled."""

    cont: torch.Tensor  # (B, t_max - 1) continue actions
    mask: torch.Tensor  # (B, t_max - 1) decisions taken
    adv: torch.Tensor  # (B, t_max - 1) float32, zero where masked
    calls: torch.Tensor  # (B,)
    budget: torch.Tensor  # (B,) budget index (0 without a budget head)
    adv_budget: torch.Tensor  # (B,) advantage of the budget choice
    old_logp: torch.Tensor  # (B, t_max - 1) log-prob of each action taken, at sampling time
    old_logp_budget: torch.Tensor  # (B,)
    stats: dict


def log_policy(controller: LSTMController, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of stop/continue at decisions 1..t_max - 1, (B, t_max - 1, 2), and of the budgets at every step,
    (B, t_max, n_budgets) or None: the budget head also reads the last frontier, after the last call."""
    t_max = states.shape[1]
    if not controller.budgets:
        return torch.log_softmax(controller(states[:, : t_max - 1]).float(), dim=-1), None
    stop, budget = controller.heads(states)
    return torch.log_softmax(stop[:, : t_max - 1].float(), -1), torch.log_softmax(budget.float(), -1)


@torch.no_grad()
def rollout(
    logp: torch.Tensor, logp_budget: torch.Tensor | None, dists: torch.Tensor, time: torch.Tensor, cfg: TrainConfig,
    beta: float, generator: torch.Generator,
) -> Rollout:
    """Sample one trajectory per row from the policy's log-probs and price it: dists (B, t_max, n_budgets,
    t_max + 1) and time (t_max, n_budgets) seconds per (calls, budget); one budget column for depth-only training."""
    cfg = cfg.effective()
    n, t_max = dists.shape[0], dists.shape[1]
    rows = torch.arange(n, device=dists.device)
    u = torch.rand(logp.shape[:-1], generator=generator, device=generator.device).to(logp.device)
    cont = u < logp[..., CONTINUE].exp()
    calls = depths_from_continues(cont)
    if logp_budget is None:
        budget = torch.zeros_like(calls)
        old_b = torch.zeros(n, device=logp.device)
    else:
        at_stop = logp_budget[rows, calls - 1]
        budget = torch.multinomial(at_stop.exp().cpu(), 1, generator=_cpu_gen(generator)).squeeze(1).to(calls)
        old_b = at_stop.gather(1, budget[:, None]).squeeze(1)
    d_t = dists[rows, calls - 1, budget].double().clamp_min(0)
    if cfg.expected_reward:
        l_acc = expected_accepted(d_t)
    else:
        l_acc = torch.multinomial(d_t.cpu(), 1, generator=_cpu_gen(generator)).squeeze(1).to(d_t)
    t_gen = time.to(calls.device)[calls - 1, budget]
    if cfg.reward == "ratio":
        terminal = beta * (l_acc + float(cfg.bonus_in_reward)) / t_gen
    else:  # throughput: emitted tokens minus the batch's own rate times this cycle's time
        tokens = l_acc + 1
        terminal = beta * (tokens - tokens.sum() / t_gen.sum() * t_gen)
    returns, mask = batch_returns(calls, terminal, cfg.alpha, cfg.gamma, t_max)
    if cfg.baseline == "none":
        adv, adv_b = returns, terminal
    elif cfg.baseline == "mean":
        m = mask.double()
        adv, adv_b = returns - (returns * m).sum(0) / m.sum(0).clamp_min(1), terminal - terminal.mean()
    else:  # group: rows come in consecutive groups of group_size rollouts of one record
        r = returns[:, 0].view(-1, cfg.group_size)
        a = ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-8)).reshape(-1)
        adv, adv_b = a[:, None].expand_as(returns), a
    stats = {"return": float(returns[:, 0].mean()), "terminal": float(terminal.mean()),
             "calls": float(calls.double().mean())}
    if logp_budget is not None:
        stats["budget_index"] = float(budget.double().mean())
    return Rollout(cont, mask, (adv * mask).float(), calls, budget, adv_b.float(),
                   logp.gather(-1, cont.long()[..., None]).squeeze(-1), old_b, stats)


def surrogate(
    logp: torch.Tensor, logp_budget: torch.Tensor | None, ro: Rollout, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to minimise for rollout `ro` under the current log-probs, and the mean entropy of the decisions
    taken. REINFORCE: -A log pi(a). PPO: -min(r A, clip(r, 1 - eps, 1 + eps) A), r = pi(a) / pi_old(a)."""
    n = logp.shape[0]
    logp_a = logp.gather(-1, ro.cont.long()[..., None]).squeeze(-1)
    terms = [(logp_a, ro.old_logp, ro.adv, ro.mask.float())]
    if logp_budget is not None:
        rows = torch.arange(n, device=logp.device)
        logp_b = logp_budget[rows, ro.calls - 1].gather(1, ro.budget[:, None]).squeeze(1)
        terms.append((logp_b, ro.old_logp_budget, ro.adv_budget, torch.ones_like(logp_b)))
    loss = logp.new_zeros(())
    for new, old, adv, mask in terms:
        if cfg.effective().variant == "ppo":
            ratio = (new - old).exp()
            obj = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
        else:
            obj = adv * new
        loss = loss - (obj * mask).sum() / n
    maskf = ro.mask.float()
    entropy = (-(logp.exp() * logp).sum(-1) * maskf).sum() / maskf.sum().clamp_min(1)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy
    return loss, entropy


def depth_budget_logprobs(logp: torch.Tensor, logp_budget: torch.Tensor | None) -> torch.Tensor:
    """log P(T = t, b) of every (draft calls, budget) outcome, (B, t_max, n_budgets), from the decisions' log-probs
    (B, t_max - 1, 2) and the budget head's (B, t_max, n_budgets) or None (one budget)."""
    cont = logp[..., CONTINUE]
    before = torch.cat((torch.zeros_like(cont[:, :1]), cont.cumsum(1)), 1)  # continues before call t + 1
    stop = torch.cat((logp[..., 1 - CONTINUE], torch.zeros_like(cont[:, :1])), 1)  # t_max: the forced stop
    depth = before + stop  # (B, t_max)
    return depth[..., None] + (logp_budget if logp_budget is not None else torch.zeros_like(depth[..., None]))


def exact_loss(
    logp: torch.Tensor, logp_budget: torch.Tensor | None, dists: torch.Tensor, time: torch.Tensor, cfg: TrainConfig,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The "exact" variant: minus the throughput objective E[tokens] - lambda E[time] - alpha E[continues], the
    expectation taken over every (calls, budget) outcome of the policy rather than sampled (each record holds them
    all), with lambda the batch's rate under the current policy. No sampling, so no variance and no action the
    policy has stopped trying goes unpriced: REINFORCE's collapse onto one depth has nothing to feed on."""
    prob = depth_budget_logprobs(logp, logp_budget).exp()  # (B, t_max, n_budgets)
    tokens = expected_accepted(dists.double()).float() + 1  # (B, t_max, n_budgets)
    t = time.to(prob).expand_as(prob)
    e_tokens, e_time = (prob * tokens).sum((1, 2)), (prob * t).sum((1, 2))
    rate = (e_tokens.sum() / e_time.sum()).detach()
    calls = torch.arange(1, prob.shape[1] + 1, device=prob.device, dtype=prob.dtype)
    e_calls = (prob.sum(2) * calls).sum(1)
    objective = beta * (e_tokens - rate * e_time) - cfg.alpha * (e_calls - 1)
    loss = -objective.mean()
    entropy = -(logp.exp() * logp).sum(-1).mean()
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy
    return loss, {"return": float(objective.detach().mean()), "terminal": float(rate),
                  "calls": float(e_calls.detach().mean()), "entropy": float(entropy.detach())}


def joint_shapes(dists: torch.Tensor, time: torch.Tensor | None, cfg: TrainConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth-only tables as one-budget joint ones: dists (B, t_max, n_budgets, t_max + 1) and time (t_max,
    n_budgets); `time` None is Eq. 6 of cfg.cost."""
    if dists.dim() == 3:
        dists = dists[:, :, None]
    time = cfg.cost.t_gen_table(controller=True) if time is None else time
    return dists, time[:, None] if time.dim() == 1 else time


def policy_loss(
    controller: LSTMController,
    states: torch.Tensor,
    dists: torch.Tensor,
    cfg: TrainConfig,
    beta: float,
    generator: torch.Generator,
    time: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Roll the policy out once per row of (states (B, t_max, k), dists (B, t_max, t_max + 1) or, for a budget
    head, (B, t_max, n_budgets, t_max + 1)) -- rows already repeated group_size times for the group baseline --
    and return the policy-gradient loss and batch statistics. `time` (t_max[, n_budgets]) prices the cycles
    (default: Eq. 6 of cfg.cost)."""
    dists, time = joint_shapes(dists, time, cfg)
    logp, logp_b = log_policy(controller, states)
    ro = rollout(logp.detach(), None if logp_b is None else logp_b.detach(), dists, time, cfg, beta, generator)
    loss, entropy = surrogate(logp, logp_b, ro, cfg)
    return loss, {**ro.stats, "entropy": float(entropy.detach())}


def _cpu_gen(g: torch.Generator) -> torch.Generator:
    """torch.multinomial wants a generator on its input's device; l_acc is drawn on the CPU, seeded from `g`."""
    if g.device.type == "cpu":
        return g
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)))


__all__ = ["Rollout", "log_policy", "rollout", "surrogate", "depth_budget_logprobs", "exact_loss", "joint_shapes",
           "policy_loss"]
