"""The `radar collect` operation: acceptance-length records of a prompt set, on Ray actors or in this process."""

from __future__ import annotations

import os
from pathlib import Path

from radar.cluster.collect import collect_dataset
from radar.cluster.ray_session import connect
from radar.cluster.shards import CollectConfig, CollectSummary
from radar.common.prompts import Prompt


def uses_ray(workers: int | None, address: str | None) -> bool:
    """Ray runs the collection when workers or a cluster are named, or under `ray job submit` ($RAY_ADDRESS)."""
    return workers is not None or address is not None or bool(os.environ.get("RAY_ADDRESS"))


def collect(
    prompts: list[Prompt],
    out: str | Path,
    config: CollectConfig,
    workers: int | None = None,
    address: str | None = None,
    cpus_per_worker: float = 0.5,
) -> CollectSummary:
    """Collect into `out` (resuming a run of the same config); connects to Ray only when `uses_ray`, and shuts
    down only a connection it opened itself."""
    config.check()
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not uses_ray(workers, address):
        return collect_dataset(prompts, out, config, local=True)
    started = connect(address)
    try:
        return collect_dataset(prompts, out, config, workers=workers, cpus_per_worker=cpus_per_worker)
    finally:
        if started:
            import ray

            ray.shutdown()
