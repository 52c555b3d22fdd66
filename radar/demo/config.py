"""The demo run's settings: the operations' own configs, with the few knobs that only the pipeline has."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from radar.cluster.tune.sweep import SweepConfig
from radar.controller.train import TrainConfig
from radar.decoding.tree import TreeConfig
from radar.ops.bench import BenchConfig


@dataclass
class CollectPlan:
    """Which prompts the collection stage decodes and on how many Ray actors."""

    sets: tuple[str, ...] = ("mt_bench", "alpaca")
    limit_per_set: int = 24
    workers: int = 2  # Ray actors, one model pair each
    cpus_per_worker: float = 1.0
    shard_size: int = 8


def _demo_train() -> TrainConfig:
    # The exact expected throughput, started from the tuned threshold rule: from a random start every variant
    # settles on one draft call on the default pair's records (benchmarks/README.md, "Depth and verification
    # budget"); 40 epochs keep the demo short.
    return TrainConfig(variant="exact", init="threshold", alpha=0.0, gamma=0.99, lr=1e-3, epochs=40, batch_size=256)


def _demo_sweep() -> SweepConfig:
    # `data`, `costs`, `storage`, `seed`, `eval_fraction` and `track` are filled in by the run.
    return SweepConfig(data="", num_samples=4, search="optuna", space="demo", epochs=10, batch_size=64,
                       name="radar-tune", resume=True, cpus_per_trial=1.0, max_concurrent=1, verbose=0)


def _demo_bench() -> BenchConfig:
    # `methods`, the models and the controller are filled in by the run.
    return BenchConfig(prompts="mt_bench", limit=10, repeats=1)


@dataclass
class DemoRunConfig:
    """Every setting of a demo run. The defaults are the default pair's on a CPU, sized for a short run on a laptop
    (benchmarks/README.md has its measured time)."""

    work_dir: str = "runs/demo"
    model: str | None = None  # target checkpoint directory; None: the default pair (target fetched on first use)
    draft: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 2  # torch intra-op threads for the stages in this process (costs, bench): benchmarks/README.md
    ray_cpus: int = 2  # for a local Ray this run starts (one already connected is reused as it is)
    track: bool = True  # MLflow: runs in radar-train, radar-tune, radar-bench and the champion in the registry
    # Shared by costs, collect and bench; None: the device's and precision's default (radar.decoding.pair.default_tree).
    tree: TreeConfig | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    eval_fraction: float = 0.2  # prompts held out for the simulated speedup (train, tune and register share it)
    # The trained controller's budget head: "auto" (a few tree sizes up to the tree's budget) or "1,2,4"; None: the
    # paper's depth-only controller. (The tune sweep trains depth-only controllers.)
    budgets: str | None = "auto"
    profile_repeats: int = 50
    collect: CollectPlan = field(default_factory=CollectPlan)
    train: TrainConfig = field(default_factory=_demo_train)
    tune: SweepConfig = field(default_factory=_demo_sweep)
    bench: BenchConfig = field(default_factory=_demo_bench)

    def __post_init__(self) -> None:
        if self.draft is not None and self.model is None:
            raise ValueError("--draft given without --model: name the target too")
        if self.model is not None and self.draft is None:
            raise ValueError("the pipeline needs a draft model: pass --draft PATH with --model")
        if not self.collect.sets:
            raise ValueError("no prompt sets to collect from")
        if self.tree is not None and self.tree.max_calls < 2:
            raise ValueError("t_max must be >= 2: with one draft call there is nothing for the controller to decide")

    @property
    def work(self) -> Path:
        return Path(self.work_dir)

    @classmethod
    def from_options(cls, limit_per_set: int = 24, workers: int = 2, epochs: int = 40, trials: int = 4,
                     tune_epochs: int = 10, bench_limit: int = 10, repeats: int = 1, quick: bool = False,
                     **top) -> "DemoRunConfig":
        """A config from `radar demo`'s flat options (the operations' configs check the rest); `quick` shrinks
        every stage to a few minutes' work (QUICK), overriding those options."""
        knobs = dict(limit_per_set=limit_per_set, workers=workers, epochs=epochs, trials=trials,
                     tune_epochs=tune_epochs, bench_limit=bench_limit, repeats=repeats)
        if "max_new_tokens" in top:
            knobs["max_new_tokens"] = top["max_new_tokens"]
        if quick:
            knobs.update(QUICK)
            top.update(max_new_tokens=QUICK["max_new_tokens"], profile_repeats=QUICK["profile_repeats"])
        for name, value in knobs.items():
            if value < 1:  # named as the user typed it, before a config would name its own field
                raise ValueError(f"{name} must be >= 1, got {value}")
        cfg = cls(**top)
        cfg.collect.limit_per_set, cfg.collect.workers = knobs["limit_per_set"], knobs["workers"]
        cfg.train.epochs, cfg.tune.num_samples, cfg.tune.epochs = knobs["epochs"], knobs["trials"], knobs["tune_epochs"]
        cfg.bench.limit, cfg.bench.repeats = knobs["bench_limit"], knobs["repeats"]
        return cfg


# `radar demo --quick`: the same stages on a few prompts and short answers.
QUICK = dict(limit_per_set=8, epochs=20, trials=2, tune_epochs=5, bench_limit=5, repeats=1, max_new_tokens=64,
             profile_repeats=20)
