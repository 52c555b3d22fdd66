"""Side-by-side benchmark: our decoders and Hugging Face's on the same prompts, in one process.

Every method decodes the same prompts with the same limits. One warm-up prompt per method is excluded; then
the prompt set is decoded `repeats` times, the methods taking turns prompt by prompt so drift in machine load hits
all of them alike, and the median repeat is kept. Speedups are ratios to `ar` measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from radar.decoding.eagle3 import is_eagle3_dir
from radar.decoding.methods import Method
from radar.decoding.pair import ModelPair, precision_of
from radar.decoding.verify import Sampling
from radar.common.files import write_atomic
from radar.common.prompts import Prompt, load_prompts
from radar.ops.hf import HF_METHODS, HFRunner
from radar.ops.models import attach_controller, load_pair, model_paths


@dataclass
class BenchConfig:
    prompts: str = "mt_bench"
    limit: int | None = 20
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    methods: list[str] = field(default_factory=lambda: ["ar", "hf", "hf-pld", "chain:3", "tree:3", "radar"])
    repeats: int = 1
    seed: int = 0
    model: str | None = None
    draft: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    tree_tokens: int | None = None
    max_calls: int | None = None  # the tree's t_max (radar, threshold:P); None: the device's default tree
    controller: str | None = None  # for method radar; None: the bundled controllers

    def __post_init__(self) -> None:
        # One name per method (`off` is `ar`), each once: unknown names raise a clear error here.
        self.methods = list(dict.fromkeys(m if m in HF_METHODS else str(Method.parse(m)) for m in self.methods))
        if "ar" not in self.methods:
            self.methods = ["ar", *self.methods]  # speedups are against ar, measured in the same run
        if self.repeats < 1 or self.max_new_tokens < 1:
            raise ValueError("repeats and max_new_tokens must be >= 1")


@dataclass
class Run:
    outputs: list[list[int]]
    wall_s: float
    new_tokens: int
    accept_lengths: list[int]
    draft_calls: list[int]
    tree_tokens: list[int] = field(default_factory=list)
    cycle_s: list[float] = field(default_factory=list)


def run_method(
    pair: ModelPair, hf: HFRunner | None, method: str, prompt_ids: list[list[int]], cfg: BenchConfig, first: int = 0
) -> Run:
    """Decode every prompt once with `method` (prompt i of the set is `first + i`, which seeds it); wall time covers
    decoding only, not tokenisation."""
    sampling = Sampling(cfg.temperature, cfg.top_p)
    outputs, taus, calls, sizes, cycle_s, wall = [], [], [], [], [], 0.0
    for i, ids in enumerate(prompt_ids, first):
        seed = cfg.seed + i
        if method in HF_METHODS:
            t0 = time.perf_counter()
            out = hf(method, ids, sampling, cfg.max_new_tokens, seed)
            if pair.target.device.type == "cuda":
                torch.cuda.synchronize()
            wall += time.perf_counter() - t0
        else:
            stamps: list[float] = []
            result = pair.generate(ids, method, sampling, cfg.max_new_tokens, seed,
                                   on_commit=lambda _: stamps.append(time.perf_counter()) or True)
            out, wall = result.token_ids, wall + result.stats.wall_s
            taus += result.stats.accept_lengths
            calls += result.stats.draft_calls_per_cycle
            sizes += result.stats.tree_tokens_per_cycle
            cycle_s += result.stats.cycle_s
            if not result.stats.cycle_s:  # the target alone: its steps after the first, one token each, as cycles
                steps = [b - a for a, b in zip(stamps, stamps[1:])]
                cycle_s += steps
                taus += [1] * len(steps)
                calls += [0] * len(steps)
                sizes += [0] * len(steps)
        outputs.append(out)
    return Run(outputs, wall, sum(map(len, outputs)), taus, calls, sizes, cycle_s)


def progress_steps(cfg: BenchConfig) -> int:
    """How many times `benchmark` calls its `on_step`: once per method, prompt and repeat."""
    return cfg.repeats * len(cfg.methods) * len(load_prompts(cfg.prompts, cfg.limit))


def run_bench(
    pair: ModelPair,
    prompts: list[Prompt],
    cfg: BenchConfig,
    hf: HFRunner | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Benchmark `cfg.methods` on `prompts`; returns the JSON-ready result (see module docstring)."""
    prompt_ids = [pair.chat_ids(p.text) for p in prompts]
    for method in cfg.methods:  # warm-up: one short decode each, excluded
        run_method(pair, hf, method, prompt_ids[:1], BenchConfig(**{**asdict(cfg), "max_new_tokens": 8}))
    runs: dict[str, list[Run]] = {m: [] for m in cfg.methods}
    for _ in range(cfg.repeats):
        # Methods take turns prompt by prompt, so a change in the machine's load hits all of them alike.
        parts: dict[str, list[Run]] = {m: [] for m in cfg.methods}
        for i, ids in enumerate(prompt_ids):
            for method in cfg.methods:
                parts[method].append(run_method(pair, hf, method, [ids], cfg, first=i))
                if on_step:
                    on_step(method)
        for method, pieces in parts.items():
            runs[method].append(Run([o for p in pieces for o in p.outputs], sum(p.wall_s for p in pieces),
                                    sum(p.new_tokens for p in pieces), [a for p in pieces for a in p.accept_lengths],
                                    [c for p in pieces for c in p.draft_calls],
                                    [n for p in pieces for n in p.tree_tokens], [t for p in pieces for t in p.cycle_s]))

    results = {}
    for method, reps in runs.items():
        median = sorted(reps, key=lambda r: r.wall_s)[len(reps) // 2]
        # No cycles: the target alone decoded (ar, hf, a radar controller that does not draft), except for
        # transformers' speculative methods, whose cycles it does not report.
        alone = method not in ("hf-pld", "hf-assisted")
        results[method] = {
            "tokens_per_s": median.new_tokens / median.wall_s,
            "tau": statistics.fmean(median.accept_lengths) if median.accept_lengths else (1.0 if alone else None),
            "draft_calls_per_cycle": (statistics.fmean(median.draft_calls) if median.draft_calls
                                      else (0.0 if alone else None)),
            "wall_s": median.wall_s,
            "wall_s_repeats": [r.wall_s for r in reps],
            "new_tokens": median.new_tokens,
            "outputs": median.outputs,
        }
        if median.cycle_s:  # the cycles themselves, for `radar calibrate`
            results[method]["cycles"] = {"draft_calls": median.draft_calls, "tree_tokens": median.tree_tokens,
                                         "committed": median.accept_lengths, "seconds": median.cycle_s}
            results[method]["cycle_tokens_per_s"] = sum(median.accept_lengths) / sum(median.cycle_s)
    base = results["ar"]["tokens_per_s"]
    for r in results.values():
        r["speedup_vs_ar"] = r["tokens_per_s"] / base
    ar_out = results["ar"]["outputs"]
    return {
        "config": {**asdict(cfg), "tree": asdict(pair.tree), "prompt_count": len(prompts),
                   "device": str(pair.target.device), "precision": precision_of(pair.target)},
        "methods": results,
        "greedy_outputs_match_ar": {m: r["outputs"] == ar_out for m, r in results.items()} if cfg.temperature == 0 else None,
    }


def benchmark(
    cfg: BenchConfig,
    out: str | Path | None = None,
    pair: ModelPair | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """The `radar bench` operation: load the pair (unless given), decode every method and write the JSON result to
    `out`; `log_benchmark` then records it in MLflow."""
    prompts = load_prompts(cfg.prompts, cfg.limit)
    if pair is None:
        model, draft = model_paths(cfg.model, cfg.draft)
        cfg.model, cfg.draft = str(model), str(draft) if draft else None
    if "hf-assisted" in cfg.methods and cfg.draft and is_eagle3_dir(cfg.draft):
        raise ValueError(f"method hf-assisted needs a small LM as draft; {cfg.draft} is an EAGLE-3 head, which "
                         "transformers' assisted generation cannot use (drop hf-assisted from --methods)")
    if pair is None:
        pair = load_pair(cfg.model, cfg.draft, cfg.device, cfg.dtype, tree_tokens=cfg.tree_tokens,
                         max_calls=cfg.max_calls)
    if "radar" in cfg.methods:
        attach_controller(pair, cfg.controller)
    # Only assisted generation needs the draft in transformers (an EAGLE-3 head is no transformers model)
    hf_draft = cfg.draft if "hf-assisted" in cfg.methods else None
    hf = HFRunner(cfg.model, hf_draft, pair.target.device, pair.target.dtype) if set(cfg.methods) & set(HF_METHODS) \
        else None
    result = run_bench(pair, prompts, cfg, hf, on_step)
    if out:
        write_atomic(out, json.dumps(result, indent=1) + "\n")
    return result


def log_benchmark(cfg: BenchConfig, result: dict, run_name: str | None = None, tags: dict | None = None) -> str:
    """Log a benchmark's settings, per-method metrics and JSON to MLflow (experiment radar-bench); the run id."""
    from radar.common import tracking

    with tracking.run(tracking.BENCH_EXPERIMENT, run_name=run_name, params={**asdict(cfg), **(tags or {})}) as active:
        tracking.log_metrics({m: {k: v for k, v in r.items() if k != "outputs"} for m, r in result["methods"].items()})
        tracking.log_json(result, "bench.json")
        return active.info.run_id
