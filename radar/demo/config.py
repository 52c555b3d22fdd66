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
    limit_per_set: int = 40
    workers: int = 2  # Ray actors, one model pair each
    cpus_per_worker: float = 1.0
    shard_size: int = 8


def _demo_train() -> TrainConfig:
    # 40 epochs at lr 3e-3: benchmarks/controller_demo.py trains 100 at this rate; 40 keeps the demo short.
    return TrainConfig(variant="improved", alpha=0.02, gamma=0.99, lr=3e-3, epochs=40, batch_size=256)


def _demo_sweep() -> SweepConfig:
    # `data`, `costs`, `storage`, `seed`, `eval_fraction` and `track` are filled in by the run.
    return SweepConfig(data="", num_samples=4, search="optuna", space="demo", epochs=10, batch_size=64,
                       name="radar-tune", resume=True, cpus_per_trial=1.0, max_concurrent=1, verbose=0)


def _demo_bench() -> BenchConfig:
    # `methods`, the models and the controller are filled in by the run.
    return BenchConfig(prompts="mt_bench", limit=20, repeats=2)


@dataclass
class DemoRunConfig:
    """Every setting of a demo run. The defaults are the default pair's on a CPU, sized for a short run on a laptop
    (benchmarks/README.md has its measured time)."""

    work_dir: str = "runs/demo"
    model: str | None = None  # target checkpoint directory; None: the default pair (target fetched on first use)
    draft: str | None = None
    device: str = "cpu"  # the tree below is the CPU one; on a GPU pass a wider tree
    dtype: str = "auto"
    threads: int = 1  # torch intra-op threads in this process: small models decode fastest on one (README)
    ray_cpus: int = 2  # for a local Ray this run starts (one already connected is reused as it is)
    track: bool = True  # MLflow: runs in radar-train, radar-tune, radar-bench and the champion in the registry
    # Shared by costs, collect and bench.
    tree: TreeConfig = field(default_factory=lambda: TreeConfig(branching=2, max_calls=8, total_tokens=12))
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    eval_fraction: float = 0.2  # prompts held out for the simulated speedup (train, tune and register share it)
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
        if self.tree.max_calls < 2:
            raise ValueError("t_max must be >= 2: with one draft call there is nothing for the controller to decide")

    @property
    def work(self) -> Path:
        return Path(self.work_dir)

    @classmethod
    def from_options(cls, limit_per_set: int = 40, workers: int = 2, epochs: int = 40, trials: int = 4,
                     tune_epochs: int = 10, bench_limit: int = 20, repeats: int = 2, **top) -> "DemoRunConfig":
        """A config from `radar demo`'s flat options (the operations' configs check the rest)."""
        knobs = dict(limit_per_set=limit_per_set, workers=workers, epochs=epochs, trials=trials,
                     tune_epochs=tune_epochs, bench_limit=bench_limit, repeats=repeats)
        if "max_new_tokens" in top:
            knobs["max_new_tokens"] = top["max_new_tokens"]
        for name, value in knobs.items():
            if value < 1:  # named as the user typed it, before a config would name its own field
                raise ValueError(f"{name} must be >= 1, got {value}")
        cfg = cls(**top)
        cfg.collect.limit_per_set, cfg.collect.workers = limit_per_set, workers
        cfg.train.epochs, cfg.tune.num_samples, cfg.tune.epochs = epochs, trials, tune_epochs
        cfg.bench.limit, cfg.bench.repeats = bench_limit, repeats
        return cfg
