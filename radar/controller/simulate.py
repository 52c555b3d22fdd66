"""Offline expected speedup of stop rules on held-out records: fixed depths, a confidence threshold, a trained
controller, and the oracles that bound them.

Every rule maps a record to a number of draft calls T in 1..t_max from the record's states alone (as it would
live); the record's d_T then gives the exact expected tokens of that cycle, E[l | T] + 1 (bonus included), and the
cost model its time T_gen(T). No sampling anywhere, so results are exact for the records.

Aggregation is a ratio of means: speedup = ar_time * sum_records (E[l | T] + 1) / sum_records T_gen(T), i.e. total
expected tokens over total expected time. That is what decoding speed is over many cycles (a renewal-reward
argument: long-run tokens/s = E[tokens per cycle] / E[time per cycle]); the mean of per-cycle ratios would
overweight cheap cycles and is reported only as `speedup_mean_of_ratios`.

Policies (names in results):
    fixed-i            always i calls (EAGLE's schedule is fixed-8)
    threshold          keep drafting while exp(best frontier cumulative log-prob) >= threshold, the threshold
                       tuned on training records for the same aggregate speedup
    controller         the LSTM controller, greedy actions
    oracle             per prefix, i* = argmax_i (E[l | i] + 1) / T_gen(i), the per-prefix bound. It is >= every
                       fixed depth on every record, but NOT an upper bound on the aggregate: maximising each cycle's
                       ratio is not maximising sum tokens / sum time.
    oracle-throughput  per prefix, argmax_i (E[l | i] + 1) - lambda* T_gen(i), lambda* found by Dinkelbach's
                       iteration: the best aggregate speedup any per-prefix choice of depth can reach, hence the true
                       ceiling for every stop rule under ratio-of-means.

With a list of verification budgets (records of schema 2, `simulate_budgets`), each priced by the cost file's
verification curve at the tokens its tree holds:
    fixed-i@b          always i calls, b tree tokens verified (the table shows the best b per depth)
    threshold@budget   the threshold rule with the (threshold, budget) pair tuned on the training records
    controller+budget  a controller with a budget head: its depths and its budgets
    oracle-joint       Dinkelbach over every (calls, budget) pair per prefix: the ceiling of any policy choosing
                       both. At temperature 0 a record's acceptance is certain, so this oracle is clairvoyant (it
                       knows which draft the target will take); at temperature 1 it knows only the law.

Costs: only the controller runs the LSTM, so by default (`charge_eye="controller"`) only it is charged T_eye
(Eq. 6); fixed depths, threshold and the oracles are charged T_0 + T_f * i. `charge_eye="all"` charges Eq. 6 to
everyone, `"none"` to no one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from radar.controller.budgets import JointTable, depth_times, joint_table
from radar.controller.dataset import RecordSet
from radar.controller.mdp import CostModel, expected_accepted
from radar.controller.policy import CONTINUE, STOP, LSTMController
from radar.decoding.stop import ThresholdPolicy

FIXED_PREFIX = "fixed-"


@dataclass
class PolicyResult:
    """One stop rule's aggregate expected speedup and statistics on the records."""

    name: str
    speedup: float  # ratio of means, vs AR
    mean_calls: float
    mean_tokens: float  # E[l | T] + 1 per cycle, averaged (tau)
    mean_time: float  # seconds per cycle, averaged
    speedup_mean_of_ratios: float
    depth_hist: list[int]  # cycles per depth 1..t_max
    charged_eye: bool
    params: dict = field(default_factory=dict)
    mean_budget: float | None = None  # tree tokens per cycle, for policies that choose a budget


@dataclass
class SimulationResult:
    """Every simulated rule's result, with the record count and cost model used."""

    policies: dict[str, PolicyResult]
    n_records: int
    t_max: int
    cost: dict
    speedup_basis: str
    aggregation: str = "ratio_of_means"

    @property
    def best_fixed(self) -> PolicyResult:
        """The fixed depth (at the records' budget) with the highest speedup."""
        fixed = [p for n, p in self.policies.items() if n.startswith(FIXED_PREFIX) and "@" not in n]
        if not fixed:
            raise ValueError("no fixed-depth policies were simulated")
        return max(fixed, key=lambda p: p.speedup)

    @property
    def best_fixed_pair(self) -> PolicyResult:
        """The fixed (depth, budget) pair with the highest speedup (the best fixed depth without a budget grid)."""
        fixed = [p for n, p in self.policies.items() if n.startswith(FIXED_PREFIX) and "@" in n]
        return max(fixed, key=lambda p: p.speedup) if fixed else self.best_fixed

    def to_dict(self) -> dict:
        """Plain dict for JSON, with `best_fixed` (and `best_fixed_pair`) named when fixed depths ran."""
        d = asdict(self)
        if any(n.startswith(FIXED_PREFIX) for n in self.policies):
            d["best_fixed"] = self.best_fixed.name
            d["best_fixed_pair"] = self.best_fixed_pair.name
        return d

    def table(self, all_pairs: bool = False) -> str:
        """A plain-text table, one row per policy; of the fixed (depth, budget) grid only the best pair per depth
        unless `all_pairs`."""
        head = (f"{'policy':<22} {'speedup':>8} {'calls':>6} {'tokens':>6} {'tau':>6} {'ms/cycle':>9}  "
                f"depth histogram 1..{self.t_max}")
        rows = [head, "-" * len(head)]
        shown = self.policies.values()
        if not all_pairs:
            best: dict[str, PolicyResult] = {}
            for p in shown:
                if p.name.startswith(FIXED_PREFIX) and "@" in p.name:
                    depth = p.name.split("@")[0]
                    if depth not in best or p.speedup > best[depth].speedup:
                        best[depth] = p
            shown = [p for p in shown if not (p.name.startswith(FIXED_PREFIX) and "@" in p.name)
                     or best.get(p.name.split("@")[0]) is p]
        for p in shown:
            budget = f"{p.mean_budget:>6.1f}" if p.mean_budget is not None else f"{'-':>6}"
            rows.append(f"{p.name:<22} {p.speedup:>7.3f}x {p.mean_calls:>6.2f} {budget} {p.mean_tokens:>6.2f} "
                        f"{1000 * p.mean_time:>9.3f}  {p.depth_hist}")
        rows.append(f"{self.n_records} records; speedup = ratio of means vs AR ({self.speedup_basis})")
        return "\n".join(rows)


# ---- depth choices --------------------------------------------------------------------------------------


def depths_from_continues(cont: torch.Tensor) -> torch.Tensor:
    """(N, t_max - 1) continue decisions -> (N,) draft calls: 1 + the continues before the first stop."""
    return 1 + cont.long().cumprod(dim=1).sum(dim=1)


def policy_depths(records: RecordSet, policy) -> torch.Tensor:
    """Run any `StopPolicy` on each record's states exactly as `draft_pool` would (reset, then decide before every
    call after the first, at most t_max calls) -> (N,) draft calls. Generic and slow; batched helpers below."""
    out = torch.empty(len(records), dtype=torch.long)
    for n in range(len(records)):
        policy.reset()
        calls = 1
        while calls < records.t_max and policy.decide(calls, records.states[n, calls - 1]):
            calls += 1
        out[n] = calls
    return out


@torch.no_grad()
def controller_depths(
    controller: LSTMController, states: torch.Tensor, greedy: bool = True, seed: int = 0, chunk: int = 8192
) -> torch.Tensor:
    """Draft calls the controller makes on each state sequence (N, t_max, k), batched (the LSTM is causal, so
    decisions after a stop do not change the earlier ones). Greedy: continue iff logit[1] > logit[0]."""
    n, t_max, _ = states.shape
    if t_max == 1:
        return torch.ones(n, dtype=torch.long)
    was_training = controller.training
    controller.eval()
    device = next(controller.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, chunk):
        logits = controller(states[i:i + chunk, : t_max - 1].to(device)).float().cpu()
        if greedy:
            cont = logits[..., CONTINUE] > logits[..., STOP]
        else:
            cont = torch.rand(logits.shape[:-1], generator=gen) < torch.softmax(logits, -1)[..., CONTINUE]
        out.append(depths_from_continues(cont))
    controller.train(was_training)
    return torch.cat(out)


def threshold_depths(states: torch.Tensor, threshold: float) -> torch.Tensor:
    """`ThresholdPolicy(threshold)` on every record at once."""
    t_max = states.shape[1]
    if t_max == 1:
        return torch.ones(states.shape[0], dtype=torch.long)
    log_thr = ThresholdPolicy(threshold).log_threshold
    return depths_from_continues(states[:, : t_max - 1].max(dim=-1).values >= log_thr)


def _tokens_and_time(records: RecordSet, cost: CostModel, controller: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, t_max) expected tokens E[l | i] + 1 and (t_max,) T_gen(i) at the records' budget."""
    if records.t_max != cost.t_max:
        raise ValueError(f"records have t_max={records.t_max} but the cost model has t_max={cost.t_max}; use a "
                         "cost model measured for the same t_max")
    budget = records.budget if cost.verify_tokens else 0  # a flat T_0 prices every budget alike
    return (expected_accepted(records.dists.double()) + 1,
            depth_times(cost, records.t_max, records.k, budget, controller))


def oracle_depths(records: RecordSet, cost: CostModel, controller: bool = False) -> torch.Tensor:
    """Per prefix, argmax_i (E[l | i] + 1) / T_gen(i) (ties -> fewer calls)."""
    tokens, t_gen = _tokens_and_time(records, cost, controller)
    return (tokens / t_gen).argmax(dim=1) + 1  # argmax returns the first maximum


def throughput_oracle_depths(
    records: RecordSet, cost: CostModel, controller: bool = False, max_iter: int = 100
) -> tuple[torch.Tensor, float]:
    """Depths maximising sum tokens / sum time over the records (Dinkelbach), and the optimal tokens per second.

    For a fixed lambda the best per-prefix choice is argmax_i tokens_i - lambda * T_gen(i); starting from the best
    fixed depth's rate and setting lambda to the rate of the last choice increases lambda strictly until the
    choice stops changing, at which point no choice of depths has a higher aggregate rate."""
    tokens, t_gen = _tokens_and_time(records, cost, controller)
    choice, rate = dinkelbach(tokens, t_gen, max_iter)
    return choice + 1, rate


def dinkelbach(tokens: torch.Tensor, time: torch.Tensor, max_iter: int = 100) -> tuple[torch.Tensor, float]:
    """Per-row choice among A arms, tokens (N, A) and time (A,), maximising sum tokens / sum time, and that rate."""
    lam = float((tokens.mean(0) / time).max())  # the best single arm's rate
    best = None
    for _ in range(max_iter):
        choice = (tokens - lam * time).argmax(dim=1)
        rate = float(tokens.gather(1, choice[:, None]).sum() / time[choice].sum())
        if best is not None and rate <= lam * (1 + 1e-12):
            break
        best, lam = choice, rate
    return best, lam


def tune_threshold(records: RecordSet, cost: CostModel, candidates: torch.Tensor | None = None,
                   table: JointTable | None = None) -> float:
    """The threshold with the best aggregate speedup on `records` (ties -> the larger threshold, fewer calls).
    Default candidates: 0 (never stop), 1.01 (always stop) and 64 quantiles of the confidences the rule sees."""
    if candidates is None:
        conf = records.states[:, : max(records.t_max - 1, 1)].max(-1).values.exp().flatten().double()
        conf = conf[:: conf.numel() // 1_000_000 + 1]  # torch.quantile caps its input size; a stride is plenty
        qs = torch.quantile(conf, torch.linspace(0, 1, 64, dtype=torch.float64)) if conf.numel() else conf
        candidates = torch.cat((torch.tensor([0.0, 1.01], dtype=torch.float64), qs)).unique()
    if table is None:
        tokens, t_gen = _tokens_and_time(records, cost, controller=False)
    else:  # one budget's column of a joint table
        tokens, t_gen = table.tokens[:, :, 0], table.time[:, 0]
    best, best_rate = None, -1.0
    for thr in sorted(candidates.tolist(), reverse=True):
        d = threshold_depths(records.states, thr) - 1
        rate = float(tokens.gather(1, d[:, None]).sum() / t_gen[d].sum())
        if rate > best_rate * (1 + 1e-12):
            best, best_rate = thr, rate
    return float(best)


# ---- evaluation ---------------------------------------------------------------------------------------


def evaluate_depths(
    records: RecordSet, depths: torch.Tensor, cost: CostModel, name: str, controller: bool = False,
    params: dict | None = None,
) -> PolicyResult:
    """Aggregate one policy's depth choices into expected speedup and statistics."""
    tokens, t_gen = _tokens_and_time(records, cost, controller)
    d = depths.long().cpu() - 1
    if ((d < 0) | (d >= records.t_max)).any():
        raise ValueError(f"{name}: depths must be in 1..{records.t_max}")
    return _result(name, tokens.gather(1, d[:, None]).squeeze(1), t_gen[d], depths, records.t_max, cost.ar_time,
                   controller, params)


def _result(name: str, tok: torch.Tensor, time: torch.Tensor, depths: torch.Tensor, t_max: int, ar_time: float,
            charged_eye: bool, params: dict | None, mean_budget: float | None = None) -> PolicyResult:
    """A `PolicyResult` from each record's expected tokens and seconds under the policy's choices."""
    return PolicyResult(
        name=name, speedup=float(ar_time * tok.sum() / time.sum()), mean_calls=float(depths.double().mean()),
        mean_tokens=float(tok.mean()), mean_time=float(time.mean()),
        speedup_mean_of_ratios=float((ar_time * tok / time).mean()),
        depth_hist=torch.bincount(depths.long().cpu() - 1, minlength=t_max).tolist(), charged_eye=charged_eye,
        params=params or {}, mean_budget=mean_budget,
    )


def simulate(
    records: RecordSet,
    cost: CostModel,
    controller: LSTMController | None = None,
    threshold: float | None = None,
    train_records: RecordSet | None = None,
    fixed: bool = True,
    charge_eye: str = "controller",
    budgets: list[int] | None = None,
) -> SimulationResult:
    """Expected speedup of every fixed depth, the threshold rule (given, or tuned on `train_records`; omitted when
    neither), the controller (when given), and both oracles, on held-out `records`; with `budgets` (records of
    schema 2) also the budget-aware policies of `simulate_budgets`."""
    if charge_eye not in ("controller", "all", "none"):
        raise ValueError(f"charge_eye must be 'controller', 'all' or 'none', got {charge_eye!r}")
    if len(records) == 0:
        raise ValueError("no records to simulate")
    base_eye = charge_eye == "all"
    ctrl_eye = charge_eye != "none"
    res: dict[str, PolicyResult] = {}
    if fixed:
        for i in range(1, records.t_max + 1):
            res[f"{FIXED_PREFIX}{i}"] = evaluate_depths(
                records, torch.full((len(records),), i), cost, f"{FIXED_PREFIX}{i}", base_eye)
    if threshold is None and train_records is not None:
        threshold = tune_threshold(train_records, cost)
    if threshold is not None:
        res["threshold"] = evaluate_depths(records, threshold_depths(records.states, threshold), cost, "threshold",
                                           base_eye, {"threshold": threshold})
    if controller is not None and not controller.budgets:
        res["controller"] = evaluate_depths(records, controller_depths(controller, records.states), cost,
                                            "controller", ctrl_eye, {"greedy": True})
    res["oracle"] = evaluate_depths(records, oracle_depths(records, cost, base_eye), cost, "oracle", base_eye)
    depths, _ = throughput_oracle_depths(records, cost, base_eye)
    res["oracle-throughput"] = evaluate_depths(records, depths, cost, "oracle-throughput", base_eye)
    if controller is not None and controller.budgets and not budgets:
        budgets = controller.budgets
    if budgets:
        res.update(simulate_budgets(records, cost, list(budgets), controller, train_records, rules_eye=base_eye,
                                    controller_eye=ctrl_eye))
    return SimulationResult(res, len(records), records.t_max, cost.to_dict(), cost.speedup_basis)


# ---- depth and budget together ---------------------------------------------------------------------------


@torch.no_grad()
def controller_choices(controller: LSTMController, states: torch.Tensor, chunk: int = 8192
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy draft calls (N,) and budget indices (N,) of a controller with a budget head: the head is read on the
    state of the stop decision (the last frontier when drafting ran to t_max)."""
    if not controller.budgets:
        raise ValueError("this controller has no budget head")
    was_training = controller.training
    controller.eval()
    device = next(controller.parameters()).device
    depths, picks = [], []
    for i in range(0, states.shape[0], chunk):
        stop, budget = controller.heads(states[i:i + chunk].to(device))
        d = depths_from_continues((stop[:, :-1, CONTINUE] > stop[:, :-1, STOP]).cpu())
        picks.append(budget.float().cpu()[torch.arange(d.numel()), d - 1].argmax(-1))
        depths.append(d)
    controller.train(was_training)
    return torch.cat(depths), torch.cat(picks)


def evaluate_choices(table: JointTable, depths: torch.Tensor, budget_index: torch.Tensor, name: str,
                     params: dict | None = None, ar_time: float = 1.0) -> PolicyResult:
    """Aggregate per-record (calls, budget) choices priced by a `JointTable`."""
    tok, time = table.at(depths.long(), budget_index.long())
    mean_budget = float(torch.tensor(table.budgets, dtype=torch.float64)[budget_index.long()].mean())
    return _result(name, tok, time, depths, table.tokens.shape[1], ar_time, table.charged_eye, params, mean_budget)


def joint_oracle(table: JointTable, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-record (calls, budget index) maximising sum tokens / sum time (Dinkelbach over every pair): the ceiling
    of every policy choosing both."""
    n, _, nb = table.tokens.shape
    best, lam = dinkelbach(table.tokens.reshape(n, -1), table.time.reshape(-1), max_iter)
    return best // nb + 1, best % nb, lam


def tune_threshold_budget(records: RecordSet, cost: CostModel, budgets: list[int]) -> tuple[float, int]:
    """The (threshold, budget) with the best aggregate speedup on `records`, the threshold's candidates as in
    `tune_threshold`."""
    table = joint_table(records, cost, budgets)
    best, best_rate = (0.0, budgets[-1]), -1.0
    for j, b in enumerate(budgets):
        sub = JointTable([b], table.tokens[:, :, j:j + 1], table.time[:, j:j + 1], False)
        thr = tune_threshold(records, cost, table=sub)
        d = threshold_depths(records.states, thr)
        tok, time = sub.at(d, torch.zeros_like(d))
        rate = float(tok.sum() / time.sum())
        if rate > best_rate * (1 + 1e-12):
            best, best_rate = (thr, b), rate
    return best


def simulate_budgets(
    records: RecordSet, cost: CostModel, budgets: list[int], controller: LSTMController | None = None,
    train_records: RecordSet | None = None, threshold_budget: tuple[float, int] | None = None,
    rules_eye: bool = False, controller_eye: bool = True,
) -> dict[str, PolicyResult]:
    """The budget-aware policies on held-out `records`: every fixed (depth, budget) pair, the threshold rule with
    a tuned budget (given, or tuned on `train_records`), the controller's own (depth, budget) choices when it has a
    budget head, and the joint oracle."""
    table = joint_table(records, cost, budgets, controller=rules_eye)
    n, ar = len(records), cost.ar_time
    res: dict[str, PolicyResult] = {}
    for i in range(1, records.t_max + 1):
        for j, b in enumerate(budgets):
            name = f"{FIXED_PREFIX}{i}@{b}"
            res[name] = evaluate_choices(table, torch.full((n,), i), torch.full((n,), j), name, ar_time=ar)
    if threshold_budget is None and train_records is not None:
        threshold_budget = tune_threshold_budget(train_records, cost, budgets)
    if threshold_budget is not None:
        thr, b = threshold_budget
        res["threshold@budget"] = evaluate_choices(
            table, threshold_depths(records.states, thr), torch.full((n,), budgets.index(b)), "threshold@budget",
            {"threshold": thr, "budget": b}, ar)
    if controller is not None and controller.budgets:
        table_c = joint_table(records, cost, controller.budgets, controller=controller_eye)
        depths, picks = controller_choices(controller, records.states)
        res["controller+budget"] = evaluate_choices(table_c, depths, picks, "controller+budget",
                                                    {"budgets": controller.budgets}, ar)
    depths, picks, _ = joint_oracle(table)
    res["oracle-joint"] = evaluate_choices(table, depths, picks, "oracle-joint", ar_time=ar)
    return res
