"""The controller experiment on the default pair (SmolLM2-135M-Instruct + its EAGLE-3 head): profile -> collect -> train -> simulate on held-out prompts.

Records come from MT-bench + Alpaca prompts (training) and GSM8K + MBPP prompts (held out), decoded by the default pair
with the CPU tree (branching 2, 12 verified nodes, t_max 8), at temperature 0 and 1. Controllers are trained with
paper-exact REINFORCE and with our improvements, and every policy is scored by the simulator on the held-out records
under the cost file measured here. Every stage skips work already on disk, so a rerun only redoes what is missing.

    OMP_NUM_THREADS=1 python benchmarks/controller_demo.py --work ~/.cache/radar/controller-demo

Writes benchmarks/results/controller-demo-t{0,1}[-h{hidden}].json (+ .png) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from radar.controller.budgets import default_budgets
from radar.controller.collect import collect_records
from radar.controller.dataset import read_records, write_records
from radar.controller.mdp import CostModel
from radar.controller.policy import ControllerConfig, LSTMController
from radar.controller.profile import profile_costs
from radar.controller.plots import plot
from radar.controller.simulate import simulate
from radar.controller.train import TrainConfig, train
from radar.decoding.pair import ModelPair
from radar.ops.models import default_pair
from radar.ops.train import drafting_verdict
from radar.common.prompts import load_prompts

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_SETS, TEST_SETS = ("mt_bench", "alpaca"), ("gsm8k", "mbpp")
T_MAX, K, TREE_TOKENS = 8, 2, 12  # the defaults: the CPU tree of the bundled controllers' bf16 records
REFERENCE_HIDDEN = ControllerConfig().hidden_size

# What is compared: the reference algorithm as published, then our switches one by one. Same optimiser settings
# for all (100 epochs, lr 3e-3, batch 256, gamma 0.99); alpha 0.02 (per-call penalty, in units of the t_max
# schedule's reward), except the throughput reward, which prices time itself and needs no penalty.
VARIANTS = {
    "paper-reinforce": dict(variant="reinforce", alpha=0.02),
    "expected-reward": dict(variant="reinforce", expected_reward=True, alpha=0.02),
    "improved": dict(variant="improved", alpha=0.02),
    "improved-throughput": dict(variant="improved", reward="throughput", alpha=0.0),
    # REINFORCE with the expected reward and a per-decision mean baseline: the bundled controllers' recipe
    # (sampled/ at lr 3e-3, greedy/ at 1e-3; radar/data/controller/README.md)
    "mean-throughput": dict(variant="reinforce", expected_reward=True, baseline="mean", reward="throughput", alpha=0.0),
    "mean-throughput-lr1e-3": dict(variant="reinforce", expected_reward=True, baseline="mean", reward="throughput",
                                   alpha=0.0, lr=1e-3),
    # PPO-style with the throughput reward, as Learning to Draft (ICLR 2026) trains its policies
    "ppo": dict(variant="ppo", alpha=0.0, lr=1e-3),
    # no sampling: the expected throughput over every depth (and budget) the records hold, differentiated exactly
    "exact": dict(variant="exact", alpha=0.0),
    # both started from the tuned threshold rule (behaviour cloning) instead of a random network
    "exact-warm": dict(variant="exact", alpha=0.0, lr=1e-3, init="threshold"),
    "mean-throughput-warm": dict(variant="reinforce", expected_reward=True, baseline="mean", reward="throughput",
                                 alpha=0.0, lr=1e-3, init="threshold"),
}


def stage_costs(pair: ModelPair, work: Path, size: ControllerConfig) -> CostModel:
    path = work / "costs.json"
    if not path.exists():  # T_eye is timed on a controller of the size trained here: its cost depends on the size
        tree = pair.tree
        profile_costs(pair, t_max=tree.max_calls, k=tree.branching, total_tokens=tree.total_tokens, repeats=50, out=path,
                      controller=LSTMController(size))
    return CostModel.load(path)


def stage_collect(pair: ModelPair, work: Path, split: str, sets: tuple[str, ...], temperature: float,
                  limit: int | None) -> Path:
    out = work / f"records-t{temperature:g}" / f"{split}-{limit or 'all'}.parquet"  # another limit: other records
    if not out.exists():
        prompts = [p for s in sets for p in load_prompts(s, limit)]
        t = time.perf_counter()
        tree = pair.tree
        records = collect_records(pair, prompts, t_max=tree.max_calls, k=tree.branching,
                                  total_tokens=tree.total_tokens, temperature=temperature, max_new_tokens=128, seed=0)
        write_records(records, out)
        print(f"{split} T={temperature:g}: {len(records)} records from {len(prompts)} prompts "
              f"in {time.perf_counter() - t:.0f}s")
    return out


def stage_train(work: Path, name: str, records_path: Path, cost: CostModel, temperature: float,
                size: ControllerConfig, seed: int = 0, **overrides) -> Path:
    out = work / f"controllers-t{temperature:g}" / f"{name}-s{seed}"
    if not (out / "controller.json").exists():
        records = read_records(records_path)
        cfg = TrainConfig(**{**dict(gamma=0.99, lr=3e-3, epochs=100, batch_size=256, cost=cost, seed=seed),
                             **overrides})
        t = time.perf_counter()
        controller, history = train(records, cfg, size, progress=False)
        controller.save(out, meta={"train": cfg.to_dict(), "records": str(records_path),
                                   "train_s": time.perf_counter() - t, **drafting_verdict(controller, records, cost, "training")})
    return out


def controller_speedup(result) -> float:
    row = result.policies.get("controller") or result.policies["controller+budget"]
    return row.speedup


def run(work: Path, temperatures: list[float], hidden: int, variants: list[str], limits: tuple[int | None, int | None],
        dtype: str, collect_only: bool = False, seeds: tuple[int, ...] = (0,), costs: Path | None = None,
        t_max: int = T_MAX, tree_tokens: int = TREE_TOKENS, threads: int = 1) -> None:
    torch.set_num_threads(threads)  # the cost file is measured at this count: live runs should use the same
    target, draft = default_pair()
    pair = ModelPair.load(target, draft, device="cpu", dtype=dtype)
    pair.tree = replace(pair.tree, branching=K, max_calls=t_max, total_tokens=tree_tokens)
    size = ControllerConfig(input_size=K, hidden_size=hidden, mlp_hidden=hidden)
    cost = CostModel.load(costs) if costs else stage_costs(pair, work, size)
    budgets = default_budgets(tree_tokens)
    print("costs:", cost.to_dict())
    for temperature in temperatures:
        train_path = stage_collect(pair, work, "train", TRAIN_SETS, temperature, limits[0])
        test_path = stage_collect(pair, work, "test", TEST_SETS, temperature, limits[1])
        if collect_only:
            continue
        fit, held = read_records(train_path), read_records(test_path)
        runs: dict[str, dict] = {}
        for name in variants:
            for head in ("", "+budget"):
                shape = replace(size, budgets=budgets) if head else size
                scores = []
                for seed in seeds:
                    ctrl_dir = stage_train(work, name + head, train_path, cost, temperature, shape, seed,
                                           **VARIANTS[name])
                    result = simulate(held, cost, controller=LSTMController.load(ctrl_dir), train_records=fit)
                    row = result.policies.get("controller") or result.policies["controller+budget"]
                    scores.append({"seed": seed, "speedup": row.speedup, "mean_calls": row.mean_calls,
                                   "mean_budget": row.mean_budget, "dir": str(ctrl_dir)})
                sp = torch.tensor([x["speedup"] for x in scores], dtype=torch.float64)
                runs[name + head] = {"seeds": scores, "mean": float(sp.mean()),
                                     "std": float(sp.std()) if len(sp) > 1 else 0.0}
        best_depth = max((n for n in runs if not n.endswith("+budget")), key=lambda n: runs[n]["mean"])
        best_joint = max((n for n in runs if n.endswith("+budget")), key=lambda n: runs[n]["mean"])

        def best_dir(name: str) -> Path:
            return Path(max(runs[name]["seeds"], key=lambda x: x["speedup"])["dir"])

        final = simulate(held, cost, controller=LSTMController.load(best_dir(best_depth)), train_records=fit,
                         budgets=budgets)
        joint = simulate(held, cost, controller=LSTMController.load(best_dir(best_joint)), fixed=False)
        final.policies["controller+budget"] = joint.policies["controller+budget"]
        print(f"\n== temperature {temperature:g}: held-out {TEST_SETS}, {len(held)} records; controllers "
              f"{best_depth} (depth only) and {best_joint} (depth + budget), their best seed")
        print(final.table())
        for name, r in runs.items():
            print(f"  {name:<32} {r['mean']:.3f}x +- {r['std']:.3f} over seeds {list(seeds)}")
        RESULTS.mkdir(exist_ok=True)
        suffix = "" if hidden == REFERENCE_HIDDEN else f"-h{hidden}"
        precision = "" if dtype == "bfloat16" else f"-{dtype}"  # bf16: the bundled controllers' files
        tree = "" if (t_max, tree_tokens) == (T_MAX, TREE_TOKENS) else f"-calls{t_max}-nodes{tree_tokens}"
        out = RESULTS / f"controller-demo{precision}{tree}-t{temperature:g}{suffix}.json"
        out.write_text(json.dumps({
            "temperature": temperature, "train_sets": TRAIN_SETS, "test_sets": TEST_SETS, "precision": dtype,
            "train_records": len(fit), "test_records": len(held), "controller": asdict(size), "costs": cost.to_dict(),
            "budgets": budgets, "best_depth_only": best_depth, "best_depth_budget": best_joint,
            "table": final.to_dict(), "variants": runs,
        }, indent=1) + "\n")
        plot(final, out.with_suffix(".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "radar" / "controller-demo")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--hidden", type=int, default=REFERENCE_HIDDEN,
                    help="LSTM and head hidden size (default: the reference's)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    ap.add_argument("--train-limit", type=int, default=None, help="prompts per training set (default: all)")
    ap.add_argument("--test-limit", type=int, default=None, help="prompts per held-out set (default: all)")
    ap.add_argument("--dtype", default="bfloat16", help="target precision: the bundled controllers' records were "
                    "collected in bfloat16 with the 12-node tree (gguf has its own 3-node tree)")
    ap.add_argument("--t-max", type=int, default=T_MAX, help="draft calls per cycle at most in the records")
    ap.add_argument("--tree-tokens", type=int, default=TREE_TOKENS, help="tree tokens verified per cycle in the "
                    "records (gguf's live tree: --t-max 3 --tree-tokens 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (radar bench and generate use the "
                    "machine's cores unless OMP_NUM_THREADS says otherwise)")
    ap.add_argument("--collect-only", action="store_true", help="profile and collect, train nothing")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (the spread is reported)")
    ap.add_argument("--costs", type=Path, default=None, help="a cost file to price with (default: WORK/costs.json, "
                    "measured when missing)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    run(args.work, [float(t) for t in args.temperatures.split(",")], args.hidden, variants,
        (args.train_limit, args.test_limit), args.dtype, args.collect_only,
        tuple(int(x) for x in args.seeds.split(",")), args.costs, args.t_max, args.tree_tokens, args.threads)


if __name__ == "__main__":
    main()
