"""The real run of `radar train-draft`: an EAGLE-3 head for SmolLM2-135M-Instruct, trained and benchmarked here.

    python benchmarks/train_draft.py train --model DIR --out /tmp/draft-run/head     # data + training (resumable)
    python benchmarks/train_draft.py bench --model DIR --head /tmp/draft-run/head    # tau and tokens/s, T=0 and T=1

`train` runs the operation exactly as `radar train-draft` does (the flags below are the recipe) and copies the
head into radar/data/smollm2-eagle3/. `bench` decodes held-out prompts (the first N of GSM8K, MBPP and Alpaca;
training scored the last 8 of each, and trained on none) with ar, chain:1..6 and tree:1..6 (and transformers'
generate at T=0) in one process, and writes benchmarks/results/train-draft-smollm2.json with the training figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "radar" / "data" / "smollm2-eagle3"
RESULT = ROOT / "benchmarks" / "results" / "train-draft-smollm2.json"
RECIPE = dict(generated=1000, topic_questions=200, eval_limit=8, max_new_tokens=192, answer_batch=48, answer_workers=2,
              draft_vocab=8192, unroll=4, epochs=5, batch_size=8, lr=1e-3, train_workers=2, threads=1, bf16=True)


def train(args) -> None:
    from radar.ops.train_draft import TrainDraftConfig, train_draft

    t = time.perf_counter()
    result = train_draft(TrainDraftConfig(model=args.model, out=args.out, **RECIPE))
    wall = time.perf_counter() - t
    if SHIPPED.exists():
        shutil.rmtree(SHIPPED)
    SHIPPED.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(args.out) / name, SHIPPED / name)
    record = {"data": result.data, "seconds": result.seconds, "wall_s_this_run": wall, "curve": result.curve,
              "recipe": RECIPE, "machine": machine()}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    RESULT.write_text(json.dumps({**old, "training": record}, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("data", "seconds")}, indent=2))


def bench(args) -> None:
    import torch

    from radar.common.prompts import load_prompts
    from radar.ops.bench import BenchConfig, run_bench
    from radar.ops.hf import HFRunner
    from radar.ops.models import load_pair

    torch.set_num_threads(args.threads)
    prompts = [p for name in ("gsm8k", "mbpp", "alpaca") for p in load_prompts(name, args.limit)]
    pair = load_pair(args.model, args.head, dtype=args.dtype)
    hf = HFRunner(args.model, None, pair.target.device, pair.target.dtype)
    depths = range(1, 7)
    out = {}
    for temperature in (0.0, 1.0):
        methods = ["ar"] + (["hf"] if temperature == 0 else []) + [f"{m}:{d}" for m in ("chain", "tree") for d in depths]
        cfg = BenchConfig(prompts="gsm8k+mbpp+alpaca", limit=None, max_new_tokens=args.max_new_tokens,
                          temperature=temperature, methods=methods, repeats=1, model=args.model, draft=args.head,
                          dtype=args.dtype)
        t = time.perf_counter()
        res = run_bench(pair, prompts, cfg, hf=hf, on_step=lambda m, t=temperature: print(f"T={t} {m} done", flush=True))
        for r in res["methods"].values():
            r.pop("outputs")
        res["seconds"] = time.perf_counter() - t
        out[f"T={temperature:g}"] = res
        print(table(res), flush=True)
    old = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    RESULT.write_text(json.dumps({**old, "bench": {"prompts": len(prompts), "per_set": args.limit,
                                                   "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                                                   "dtype": args.dtype, "tree": res["config"]["tree"], **out}}, indent=2) + "\n")


def table(res: dict) -> str:
    rows = [f"{'method':10} {'tau':>6} {'tok/s':>7} {'vs ar':>6}"]
    for m, r in res["methods"].items():
        tau = f"{r['tau']:.2f}" if r["tau"] is not None else "-"
        rows.append(f"{m:10} {tau:>6} {r['tokens_per_s']:7.1f} {r['speedup_vs_ar']:6.2f}")
    match = res.get("greedy_outputs_match_ar")
    if match:
        rows.append(f"greedy outputs equal ar: {all(v for k, v in match.items() if k != 'hf')} (hf: {match.get('hf')})")
    return "\n".join(rows)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "note": "2 cores shared with other users"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--out", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--model", required=True)
    b.add_argument("--head", default=str(SHIPPED))
    b.add_argument("--limit", type=int, default=8, help="prompts per held-out set")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    train(args) if args.cmd == "train" else bench(args)


if __name__ == "__main__":
    main()
