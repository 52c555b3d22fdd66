"""How much continuous batching can gain over one-at-a-time decoding on this machine, from the forwards alone.

    python benchmarks/batching_bound.py --clients 16 --tokens 64

Times, on the default pair's target (gguf precision unless --precision), with --threads torch threads:
- each of the first N prompts (`prompts/live-unseen.jsonl`, chat template) prefilled alone, then N packed together;
- one decoding step alone, and N one-token steps packed into one forward, with each cache at its prompt's length
  plus half the answer;
- inside the packed step, the per-sequence attention (float64 caches, see `KVCache`).

From them it prices a wave of N requests of --tokens tokens each: one at a time (N prefills and N x tokens steps
alone, what fifo runs, leaving speculation out) and batched (one packed prefill and `tokens` packed steps), and the
ceiling batching would reach if decoding cost nothing (the prefills alone). No Serve, no HTTP, no clients: this is
the bound the replica's forwards put on `bench_serve.py`'s batch-vs-fifo ratio. Writes
benchmarks/results/batching-bound-<precision>-t<threads>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from radar.common.prompts import load_prompts
from radar.decoding.packed import SegmentAttention, packed_forward
from radar.ops.models import load_pair, model_paths

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = Path(__file__).resolve().parent / "prompts" / "live-unseen.jsonl"


def _call(tokens: list[int], cache, last_only: bool = False) -> dict:
    return dict(input_ids=torch.tensor([tokens]), position_ids=None, cache=cache, tree_mask=None, capture=None,
                last_only=last_only)


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="gguf")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pair = load_pair(*model_paths(None, None), device="cpu", dtype=args.precision)
    target = pair.target
    ids = [pair.chat_ids(p.text) for p in load_prompts(PROMPTS, args.clients)]
    caches = [target.new_cache(len(i) + args.tokens + 1) for i in ids]

    def reset(length: list[int]) -> None:
        for c, n in zip(caches, length):
            c.length = n

    def prefill_alone() -> float:
        total = 0.0
        for j, tokens in enumerate(ids):
            reset([0] * len(caches))
            start = time.perf_counter()
            packed_forward(target, [_call(tokens, caches[j], last_only=True)])
            total += time.perf_counter() - start
        return total

    def prefill_packed() -> None:
        reset([0] * len(caches))
        packed_forward(target, [_call(t, c, last_only=True) for t, c in zip(ids, caches)])

    prefill_1 = statistics.median(prefill_alone() for _ in range(args.repeats))
    prefill_n = _median_s(prefill_packed, args.repeats)
    mid = [len(i) + args.tokens // 2 for i in ids]  # the caches' mean length over an answer

    def step_alone() -> None:
        reset(mid)
        packed_forward(target, [_call([7], caches[0])])

    def step_packed() -> None:
        reset(mid)
        packed_forward(target, [_call([7], c) for c in caches])

    step_1 = _median_s(step_alone, args.repeats * 4)
    step_n = _median_s(step_packed, args.repeats * 4)
    attention = [0.0]
    inner = SegmentAttention.__call__

    def timed(self, *a):
        start = time.perf_counter()
        out = inner(self, *a)
        attention[0] += time.perf_counter() - start
        return out

    SegmentAttention.__call__ = timed
    try:
        for _ in range(args.repeats):
            step_packed()
    finally:
        SegmentAttention.__call__ = inner
    attention_n = attention[0] / args.repeats

    n, k = args.clients, args.tokens
    fifo = prefill_1 + n * k * step_1
    batched = prefill_n + k * step_n
    row = {
        "precision": args.precision, "threads": args.threads, "clients": n, "tokens": k,
        "prompt_tokens": sum(map(len, ids)),
        "prefill_alone_s": prefill_1, "prefill_packed_s": prefill_n,
        "step_alone_ms": step_1 * 1e3, "step_packed_ms": step_n * 1e3, "attention_in_packed_step_ms": attention_n * 1e3,
        "fifo_wave_s": fifo, "batched_wave_s": batched, "batched_vs_fifo": fifo / batched,
        "ceiling_if_decoding_were_free": fifo / prefill_n,
    }
    print(f"{n} prompts, {row['prompt_tokens']} tokens: prefill alone {prefill_1:.2f} s, packed {prefill_n:.2f} s")
    print(f"decode step alone {row['step_alone_ms']:.1f} ms, {n} packed {row['step_packed_ms']:.1f} ms "
          f"(attention {row['attention_in_packed_step_ms']:.1f} ms of it)")
    print(f"a wave of {n} x {k} tokens: one at a time {fifo:.1f} s, batched {batched:.1f} s -> "
          f"{row['batched_vs_fifo']:.2f}x; ceiling with free decoding {row['ceiling_if_decoding_were_free']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"batching-bound-{args.precision}-t{args.threads}.json"
    out.write_text(json.dumps(row, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
