"""Collection scaling: records/s of `radar.cluster.collect_dataset` in this process and with 1 and 2 Ray actors.

One run, one local Ray instance, the same prompts and settings for every row; each row collects into a fresh
directory, and its records are checked identical to the in-process row's. Actor start-up (a new process importing
torch and loading the pair) is timed separately and reported both ways: end to end, and without start-up.

Usage: python benchmarks/bench_collect.py [--pair tiny|default] [--prompts mt_bench] [--limit 24]
       [--max-new-tokens 64] [--shard-size 2] [--out benchmarks/results/collect-scaling.json]
The tiny pair is built in a temp dir with the tests' helpers; the default pair is SmolLM2-135M-Instruct with its bundled EAGLE-3 head.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
ROOT = Path(__file__).resolve().parent.parent


def tiny_pair(root: Path) -> tuple[Path, Path]:
    """The tests' tiny pair: a random Llama target and a noisy copy as draft, sharing a 320-token tokenizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny_pair

    return make_tiny_pair(root)


def actor_startup(config, workers: int, cpus: float) -> float:
    """Seconds to start `workers` collection actors and have each load the pair (then they are killed)."""
    import ray

    from radar.cluster.collect import CollectWorker

    t0 = time.perf_counter()
    remote = ray.remote(CollectWorker).options(num_cpus=cpus)
    actors = [remote.remote(config.to_dict(), threads=1) for _ in range(workers)]
    ray.get([a.where.remote() for a in actors])
    seconds = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    return seconds


def same_records(a, b) -> bool:
    def ordered(r):
        return r[np.array(r.meta.sort_values(["prompt_id", "position"], kind="stable").index)]

    a, b = ordered(a), ordered(b)
    return len(a) == len(b) and a.meta.equals(b.meta) and bool((a.states == b.states).all()) and bool(
        (a.dists == b.dists).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", choices=["tiny", "default"], default="tiny")
    ap.add_argument("--prompts", default="mt_bench")
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--t-max", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shard-size", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "collect-scaling.json")
    args = ap.parse_args()

    import ray
    import torch

    from radar.cluster.collect import collect_dataset
    from radar.cluster.shards import CollectConfig
    from radar.controller.dataset import read_records
    from radar.common.prompts import load_prompts

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    if args.pair == "tiny":
        target, draft = tiny_pair(tmp / "pair")
    else:
        from radar.ops.models import default_pair

        target, draft = default_pair()
    prompts = load_prompts(args.prompts, args.limit)
    config = CollectConfig(model=str(target), draft=str(draft), prompts=args.prompts, t_max=args.t_max, k=args.k,
                           max_new_tokens=args.max_new_tokens, device="cpu", shard_size=args.shard_size)
    cpus = os.cpu_count() or 2
    load_before = os.getloadavg()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})

    rows, reference = [], None
    for workers in (0, 1, 2):  # 0: in this process, no Ray
        out = tmp / f"records-{workers}"
        startup = actor_startup(config, workers, cpus=1.0) if workers else 0.0
        t0 = time.perf_counter()
        summary = collect_dataset(prompts, out, config, workers=workers or None, local=workers == 0,
                                  cpus_per_worker=1.0, progress=False)
        wall = time.perf_counter() - t0
        records = read_records(out)
        reference = records if reference is None else reference
        rows.append({
            "workers": workers or "in-process", "records": summary.records, "prompts": len(prompts),
            "shards": summary.shards, "wall_s": round(wall, 2), "actor_startup_s": round(startup, 2),
            "records_per_s": round(summary.records / wall, 1),
            "records_per_s_without_startup": round(summary.records / max(wall - startup, 1e-9), 1),
            "identical_to_in_process": same_records(records, reference),
        })
        print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()

    by = {r["workers"]: r for r in rows}
    result = {
        "what": "records/s of radar collect: in-process, 1 and 2 Ray actors (one pair each, 1 CPU, 1 torch thread)",
        "pair": args.pair, "prompts": args.prompts, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
        "t_max": args.t_max, "k": args.k, "shard_size": args.shard_size,
        "machine": {"cpus": cpus, "platform": platform.platform(), "torch": torch.__version__, "ray": ray.__version__,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "note": ("the CPUs were shared with other jobs (load average above the core count), so workers competed "
                 "for cores and these figures understate scaling" if max(load_before) > cpus else "idle machine"),
        "rows": rows,
        "speedup_2_over_1_workers": round(by[2]["records_per_s"] / by[1]["records_per_s"], 2),
        "speedup_2_over_1_workers_without_startup": round(
            by[2]["records_per_s_without_startup"] / by[1]["records_per_s_without_startup"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
