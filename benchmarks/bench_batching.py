"""Continuous batching in the engine, without Serve: N concurrent decodes through one Rendezvous against the same
requests alone, per method (ar, radar with and without load awareness, a fixed tree).

    python benchmarks/bench_batching.py --precision float32 --clients 16
    python benchmarks/bench_batching.py --precision gguf --clients 1,16 --tokens 64

Prints tokens/s, the share of wall time inside packed forwards, packed forwards run, the model calls they held and
mean tau; writes benchmarks/results/batching-<precision>.json. Greedy output is checked against each prompt's
single-request output.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from radar.decoding.batching import LoadAware, Rendezvous, measure_verify_curve
from radar.decoding.methods import Method
from radar.decoding.verify import Sampling
from radar.ops.models import attach_controller, load_pair, model_paths

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = Path(__file__).resolve().parent / "prompts" / "live-unseen.jsonl"


def run_batch(pair, curve, ids: list[list[int]], method: Method, load_aware: bool, tokens: int) -> dict:
    """All of `ids` decoded concurrently; their figures."""
    rv, out = Rendezvous(pair.target), [None] * len(ids)
    view = pair.batched(rv)

    def one(j: int) -> None:
        policy = None
        if method.speculative:
            policy = view.stop_rule(method, Sampling(), j)
            policy = LoadAware(policy, rv, curve) if load_aware else policy
        with rv.member():
            out[j] = view.generate(ids[j], method, Sampling(), tokens, policy=policy,
                                   on_commit=lambda x: rv.committed(len(x)))

    threads = [threading.Thread(target=one, args=(j,)) for j in range(len(ids))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    new = sum(len(o.token_ids) for o in out)
    return {"tokens_per_s": new / wall, "forwards": rv.forwards, "calls": rv.calls,
            "tau": sum(o.stats.tau for o in out) / len(out), "outputs": [o.token_ids for o in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="ar,radar,radar+load,tree:2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target, draft = model_paths(None, None)
    pair = attach_controller(load_pair(target, draft, device="cpu", dtype=args.precision))
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    ids = [pair.chat_ids(p.get("prompt") or p.get("turns", [""])[0]) for p in prompts]
    curve = measure_verify_curve(pair.target)
    rows = []
    for name in args.methods.split(","):
        method, load_aware = Method.parse(name.removesuffix("+load")), name.endswith("+load")
        for n in [int(c) for c in args.clients.split(",")]:
            batch = run_batch(pair, curve, ids[:n], method, load_aware, args.tokens)
            alone = [pair.generate(i, "ar", Sampling(), args.tokens).token_ids for i in ids[:n]]
            row = {"method": name, "clients": n, **{k: v for k, v in batch.items() if k != "outputs"},
                   "equal_to_single_request": batch["outputs"] == alone}
            rows.append(row)
            print(f"{name:>11} x{n:>2}: {row['tokens_per_s']:.1f} tok/s, tau {row['tau']:.2f}, forwards "
                  f"{row['forwards']} for {row['calls']} calls, equal {row['equal_to_single_request']}", flush=True)
    out = RESULTS / f"batching-{args.precision}.json"
    out.write_text(json.dumps({"curve": vars(curve), "threads": args.threads, "tokens": args.tokens, "rows": rows},
                              indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
