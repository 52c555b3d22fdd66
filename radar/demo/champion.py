"""The register stage's choice: the better of the trained and the tuned controller on the held-out records, or the
better rule when both lose to one."""

from __future__ import annotations

import json
from pathlib import Path

from radar.common.files import new_dir, write_atomic
from radar.demo.stages import controller_digest


def choose_champion(records: str, costs: str, candidates: dict[str, dict], out: Path, sim_path: Path,
                    eval_fraction: float, seed: int, track: bool) -> dict:
    """Simulate each candidate on the held-out prompts, copy the best to `out`, write the simulation to `sim_path`
    and (with MLflow) register it as the champion; on a tie the first candidate wins.

    A champion must beat the rules that need no learning on the same held-out records: the best fixed depth and
    the threshold rule tuned on the training records (and, for a controller with a budget head, the best fixed
    (depth, budget) pair and the threshold with a tuned budget). When no candidate does, the better rule is registered
    instead, written as a controller network that decides exactly as the rule does (`radar.controller.rules`), and
    the result says so (`"rule"`), so the pipeline never registers a policy worse than a rule without saying it. A
    champion slower than AR on those records is marked not to draft (`DRAFTS_KEY`), as `radar train` marks its own."""
    from radar.controller.mdp import CostModel
    from radar.controller.policy import DRAFTS_KEY, LSTMController, load_controller
    from radar.controller.simulate import simulate
    from radar.ops.register import register_controller
    from radar.common import tracking
    from radar.ops.train import split_records, verdict_meta

    _, fit, held = split_records(records, eval_fraction, seed)
    cost = CostModel.load(costs)
    sims = {name: simulate(held, cost, controller=load_controller(c["path"]), train_records=fit)
            for name, c in candidates.items()}
    speedups = {name: _controller_row(s).speedup for name, s in sims.items()}
    choice = max(speedups, key=lambda n: speedups[n])
    sim = sims[choice]
    k = load_controller(candidates[choice]["path"]).k
    # Priced as what would be registered, a controller network (its decisions charged T_eye like any controller's)
    rules = {name: (_controller_row(simulate(held, cost, controller=net)).speedup, net)
             for name, net in _rules(max(sims.values(), key=lambda s: len(s.policies)), k).items()}
    best_rule = max(rules, key=lambda n: rules[n][0])
    rule = best_rule if rules[best_rule][0] > speedups[choice] else None
    champion_speedup = rules[rule][0] if rule else speedups[choice]
    # The same "draft at all?" verdict `radar train` gives, on the held-out records that chose the champion.
    verdict = verdict_meta(champion_speedup, cost)
    with new_dir(out) as tmp:
        if rule:
            rules[rule][1].save(tmp, meta={"rule": rule, "held_out_speedup": rules[rule][0], "beat": speedups,
                                           **verdict})
        else:
            path = candidates[choice]["path"]
            load_controller(path).save(tmp, meta={**LSTMController.read_meta(path), **verdict})
    rule_speedups = {name: r[0] for name, r in rules.items()}
    depth = int(sim.best_fixed.name.removeprefix("fixed-"))
    pair = sim.best_fixed_pair.name.removeprefix("fixed-")  # "D@B", or "D" without a budget grid
    write_atomic(sim_path, json.dumps({"champion": rule or choice, "controller_speedups": speedups,
                                       "rule_speedups": rule_speedups, "best_fixed_depth": depth,
                                       "table": sim.to_dict()}, indent=1) + "\n")
    version = None
    if track:
        metrics = {"eval_speedup": champion_speedup, "best_fixed_speedup": sim.best_fixed.speedup,
                   "best_fixed_depth": depth, "candidate": rule or choice, "source": "radar demo"}
        experiment = tracking.TRAIN_EXPERIMENT if choice == "trained" else tracking.TUNE_EXPERIMENT
        version = register_controller(out, candidates[choice]["run_id"], metrics=metrics, experiment=experiment)
    thr_budget = sim.policies.get("threshold@budget")
    return {"path": str(out), "digest": controller_digest(out), "choice": choice, "speedups": speedups,
            "rule": rule, "rule_speedups": rule_speedups, "champion_speedup": champion_speedup,
            "best_fixed_depth": depth, "best_fixed_pair": f"tree:{pair}",
            "best_fixed_speedup": sim.best_fixed.speedup, "version": version,
            "tuned_threshold": sim.policies["threshold"].params["threshold"],
            "tuned_threshold_budget": [thr_budget.params["threshold"], thr_budget.params["budget"]]
            if thr_budget else None,
            "simulation": str(sim_path), "drafts": verdict.get(DRAFTS_KEY, True)}


def _rules(sim, k: int) -> dict:
    """The rules a champion must beat, {method name: the rule as a controller network}: the best fixed depth and
    the tuned threshold, and with a budget grid the best fixed (depth, budget) pair and the threshold with its tuned
    budget."""
    from radar.controller.rules import fixed_depth_controller, threshold_controller

    depth = int(sim.best_fixed.name.removeprefix("fixed-"))
    threshold = sim.policies["threshold"].params["threshold"]
    out = {f"tree:{depth}": fixed_depth_controller(depth, k),
           f"threshold:{threshold:.3g}": threshold_controller(threshold, k)}
    budgets = sim.policies["controller+budget"].params["budgets"] if "controller+budget" in sim.policies else None
    pair = sim.best_fixed_pair
    if budgets and "@" in pair.name:
        d, b = (int(x) for x in pair.name.removeprefix("fixed-").split("@"))
        out[f"tree:{d}@{b}"] = fixed_depth_controller(d, k, budgets, b)
        tb = sim.policies["threshold@budget"]
        out[f"threshold:{tb.params['threshold']:.3g}@{tb.params['budget']}"] = threshold_controller(
            tb.params["threshold"], k, budgets, tb.params["budget"])
    return out


def _controller_row(sim):
    """The controller's row of a simulation: depth-only, or with its budget head."""
    return sim.policies.get("controller") or sim.policies["controller+budget"]
