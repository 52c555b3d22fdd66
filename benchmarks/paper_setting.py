"""The RADAR paper's setting, simulated on the default pair: does its claim reproduce here?

Records collected as in the paper (k=10, t_max=8, 60 verified nodes, temperature 1) from the default pair
(SmolLM2-135M-Instruct + its EAGLE-3 head, float32 so wide trees are cheap to verify on a CPU), priced by the
paper's own cost constants (the `llama3.1-8b` preset: flat verification, as on a GPU far from compute-bound), and
a controller trained with paper-exact REINFORCE (one sampled l_acc, no baseline, Adam 1e-4, batch 64, 100 epochs,
alpha 0.02, gamma 0.99, LSTM 128), against fixed depth 8 (EAGLE-3's schedule) and the other rules, on held-out
prompts, over several seeds.

    OMP_NUM_THREADS=1 python benchmarks/paper_setting.py --work ~/.cache/radar/paper-setting

Writes benchmarks/results/paper-setting.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from radar.common.prompts import load_prompts
from radar.controller.collect import collect_records
from radar.controller.dataset import read_records, write_records
from radar.controller.mdp import CostModel
from radar.controller.policy import ControllerConfig
from radar.controller.simulate import simulate
from radar.controller.train import TrainConfig, train
from radar.decoding.pair import ModelPair
from radar.decoding.tree import TreeConfig
from radar.ops.models import default_pair

RESULTS = Path(__file__).resolve().parent / "results"
TREE = TreeConfig(branching=10, max_calls=8, total_tokens=60)
TRAIN_SETS, TEST_SETS = ("mt_bench", "alpaca"), ("gsm8k", "mbpp")


def records(pair: ModelPair, work: Path, split: str, sets: tuple[str, ...], limit: int, tokens: int) -> Path:
    out = work / f"{split}-{limit}-{tokens}.parquet"
    if not out.exists():
        prompts = [p for s in sets for p in load_prompts(s, limit)]
        t = time.perf_counter()
        recs = collect_records(pair, prompts, t_max=TREE.max_calls, k=TREE.branching, total_tokens=TREE.total_tokens,
                               temperature=1.0, max_new_tokens=tokens, seed=0)
        write_records(recs, out)
        print(f"{split}: {len(recs)} records from {len(prompts)} prompts in {time.perf_counter() - t:.0f}s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "radar" / "paper-setting")
    ap.add_argument("--train-limit", type=int, default=8, help="prompts per training set")
    ap.add_argument("--test-limit", type=int, default=5, help="prompts per held-out set")
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per prompt")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    target, draft = default_pair()
    pair = ModelPair.load(target, draft, device="cpu", dtype=args.dtype, tree=TREE)
    fit = read_records(records(pair, args.work, "train", TRAIN_SETS, args.train_limit, args.tokens))
    held = read_records(records(pair, args.work, "test", TEST_SETS, args.test_limit, args.tokens))
    cost = CostModel.preset("llama3.1-8b")
    runs, tables = [], {}
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = TrainConfig(cost=cost, seed=seed)  # the reference's REINFORCE, exactly (the defaults)
        controller, _ = train(fit, cfg, ControllerConfig(input_size=TREE.branching), progress=False)
        result = simulate(held, cost, controller=controller, train_records=fit, charge_eye="all")
        c, f8 = result.policies["controller"], result.policies["fixed-8"]
        runs.append({"seed": seed, "controller": c.speedup, "mean_calls": c.mean_calls, "fixed_8": f8.speedup,
                     "vs_fixed_8": c.speedup / f8.speedup - 1})
        tables[seed] = result.to_dict()
        print(f"seed {seed}: controller {c.speedup:.3f}x ({c.mean_calls:.2f} calls), fixed-8 {f8.speedup:.3f}x, "
              f"{100 * runs[-1]['vs_fixed_8']:+.1f}%")
    print(result.table())
    gains = [r["vs_fixed_8"] for r in runs]
    summary = {"mean_vs_fixed_8": statistics.fmean(gains), "std_vs_fixed_8": statistics.pstdev(gains),
               "oracle_throughput_vs_fixed_8": result.policies["oracle-throughput"].speedup
               / result.policies["fixed-8"].speedup - 1,
               "threshold_vs_fixed_8": result.policies["threshold"].speedup / result.policies["fixed-8"].speedup - 1}
    print(json.dumps(summary, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "paper-setting.json").write_text(json.dumps({
        "tree": TREE.__dict__, "precision": args.dtype, "temperature": 1.0, "train_records": len(fit),
        "test_records": len(held), "cost": cost.to_dict(), "charge_eye": "all (Eq. 6 for every policy)",
        "runs": runs, "summary": summary, "tables": tables}, indent=1) + "\n")


if __name__ == "__main__":
    main()
