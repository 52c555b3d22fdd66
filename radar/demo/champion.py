"""The register stage's choice: the better of the trained and the tuned controller on the held-out records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from radar.common.files import new_dir, write_atomic
from radar.demo.stages import controller_digest


def choose_champion(records: str, costs: str, candidates: dict[str, dict], out: Path, sim_path: Path,
                    eval_fraction: float, seed: int, track: bool) -> dict:
    """Simulate each candidate on the held-out prompts, copy the best to `out`, write the simulation to `sim_path`
    and (with MLflow) register it as the champion; on a tie the first candidate wins."""
    from radar.controller.mdp import CostModel
    from radar.controller.policy import load_controller
    from radar.controller.simulate import simulate
    from radar.ops.register import register_controller
    from radar.common import tracking
    from radar.ops.train import split_records

    _, fit, held = split_records(records, eval_fraction, seed)
    cost = CostModel.load(costs)
    sims = {name: simulate(held, cost, controller=load_controller(c["path"]), train_records=fit)
            for name, c in candidates.items()}
    speedups = {name: s.policies["controller"].speedup for name, s in sims.items()}
    choice = max(speedups, key=lambda n: speedups[n])
    sim = sims[choice]
    depth = int(sim.best_fixed.name.removeprefix("fixed-"))
    with new_dir(out) as tmp:
        for f in Path(candidates[choice]["path"]).iterdir():
            shutil.copy2(f, tmp / f.name)
    write_atomic(sim_path, json.dumps({"champion": choice, "controller_speedups": speedups,
                                       "best_fixed_depth": depth, "table": sim.to_dict()}, indent=1) + "\n")
    version = None
    if track:
        metrics = {"eval_speedup": speedups[choice], "best_fixed_speedup": sim.best_fixed.speedup,
                   "best_fixed_depth": depth, "candidate": choice, "source": "radar demo"}
        experiment = tracking.TRAIN_EXPERIMENT if choice == "trained" else tracking.TUNE_EXPERIMENT
        version = register_controller(out, candidates[choice]["run_id"], metrics=metrics, experiment=experiment)
    return {"path": str(out), "digest": controller_digest(out), "choice": choice, "speedups": speedups,
            "best_fixed_depth": depth, "best_fixed_speedup": sim.best_fixed.speedup, "version": version,
            "tuned_threshold": sim.policies["threshold"].params["threshold"],
            "simulation": str(sim_path)}
