"""Distributed collection of the controller's dataset: prompts in fixed shards, one Ray actor per target+draft pair.

Layout of an output directory:

    out/manifest.json          the collection's config and every finished shard (written atomically)
    out/shard-00000.parquet    the records of prompts [0, shard_size), written atomically by the driver
    out/shard-00001.parquet    ...

Shard i is always prompts[i * shard_size : (i + 1) * shard_size], and a prompt's records depend only on the prompt
and the config (`prompt_seed`), so a shard can be redone anywhere with the same result. The driver (this process)
writes a shard's file and then records it in the manifest; a rerun skips the shards the manifest lists, redoes the
others and overwrites their file if a crash left one, so nothing is lost or duplicated. Actors return records to the
driver instead of writing them, which needs no shared filesystem between nodes. Temp files start with "." and are
ignored by `read_records(out)`, which reads the union of the shards.

A killed actor is restarted (`max_restarts`) and its shard retried (`max_task_retries`); an actor that dies for good
hands its shard back to the queue for the others, and when none is left the run stops with an error, keeping every
finished shard for the next run.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from radar.cluster.ray_session import cluster_gpus
from radar.cluster.shards import (MANIFEST, CollectConfig, CollectError, CollectSummary, Shard, make_shards,
                                  manifest_text, open_manifest, shard_state)
from radar.common.files import write_atomic
from radar.common.prompts import Prompt
from radar.controller.dataset import Record, write_records


class CollectWorker:
    """Holds one loaded target+draft pair and collects shards with it (the body of the Ray actor)."""

    def __init__(self, config: dict, threads: int = 1) -> None:
        import torch

        from radar.decoding.pair import ModelPair

        torch.set_num_threads(max(1, threads))
        self.config = CollectConfig(**config)
        self.pair = None
        self.error: str | None = None
        try:
            self.pair = ModelPair.load(self.config.model, self.config.draft, device=self.config.device,
                                       dtype=self.config.dtype)
        except (ValueError, OSError) as exc:
            # Kept, not raised: a failing constructor would be restarted max_restarts times for nothing; the
            # first task reports it as a plain ValueError, which the CLI prints as one line.
            self.error = str(exc)

    def where(self) -> str:
        """pid@node of this worker (for the manifest); ValueError if its pair did not load."""
        if self.error is not None:
            raise ValueError(self.error)
        return f"{os.getpid()}@{socket.gethostname()}"

    def collect(self, shard: Shard) -> tuple[list[Record], str]:
        """The records of every prompt in the shard, in prompt order, and where they were made."""
        from radar.controller.collect import collect_prompt, model_names

        where = self.where()
        cfg = self.config
        names = model_names(self.pair, cfg.model, cfg.draft)
        records: list[Record] = []
        for prompt in shard.prompts:
            recs, _ = collect_prompt(
                self.pair, prompt, t_max=cfg.t_max, k=cfg.k, total_tokens=cfg.total_tokens,
                temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, names=names,
            )
            records.extend(recs)
        return records, where


# ---- the run ------------------------------------------------------------------------------------------


def collect_dataset(
    prompts: Sequence[Prompt],
    out: str | Path,
    config: CollectConfig,
    *,
    workers: int | None = 1,
    local: bool = False,
    cpus_per_worker: float = 0.5,
    max_restarts: int = 2,
    progress: bool = True,
    on_shard: Callable[[int, list, list], None] | None = None,
) -> CollectSummary:
    """Collect the records of `prompts` into shards under `out`, resuming a previous run of the same config.

    `local` runs the shards in this process (no Ray); otherwise `workers` Ray actors (default: one per cluster GPU,
    or 1) share them on the connected cluster (`radar.cluster.ray_session.connect`), each with one GPU when the
    cluster has GPUs and `cpus_per_worker` CPUs otherwise. `on_shard(index, busy, idle)` is called after each shard is saved, with the
    live actors that have a shard in flight and the others (a test hook, e.g. to kill a worker mid-shard)."""
    t0 = time.perf_counter()
    out = Path(out)
    config.check()
    if not prompts:
        raise ValueError("no prompts to collect")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    gpus, use_gpu = placement(config, local)
    config = config.resolved(use_gpu)
    log = ShardLog(out, open_manifest(out, config))
    shards = make_shards(prompts, config.shard_size)
    todo = [s for s in shards if log.state(s) == "todo"]
    n_workers = 1 if local else min(workers or max(1, gpus if use_gpu else 1), max(1, len(todo)))

    worker = None
    if todo and local:
        import torch

        worker = CollectWorker(config.to_dict(), threads=torch.get_num_threads())  # loaded before the progress bar
        if worker.error is not None:
            raise ValueError(worker.error)
    if todo:
        bar = _LazyBar(total=sum(len(s.prompts) for s in todo), unit="prompt", disable=not progress,
                       dynamic_ncols=True, desc=f"collect ({n_workers} worker{'s' * (n_workers > 1)})")

        def done(shard: Shard, records: list[Record], where: str, seconds: float, busy: list, idle: list) -> None:
            log.save(shard, records, where, seconds)
            bar.update(len(shard.prompts), shards=f"{log.finished}/{len(shards)}", records=log.records_run)
            if on_shard is not None:
                on_shard(shard.index, busy, idle)

        try:
            if worker is not None:
                bar.open()
                _run_local(worker, todo, done)
            else:
                _run_actors(config, todo, n_workers, use_gpu, cpus_per_worker, max_restarts, done, bar.open)
        finally:
            bar.close()

    return CollectSummary(
        out=out, shards=len(shards), shards_skipped=len(shards) - len(todo), shards_run=len(todo),
        records=log.records, records_run=log.records_run,
        prompts_run=sum(len(s.prompts) for s in todo), workers=n_workers if todo else 0,
        seconds=time.perf_counter() - t0, config=config.to_dict(),
    )


def placement(config: CollectConfig, local: bool) -> tuple[int, bool]:
    """(GPUs available, whether the workers use one each): in this process, or on the connected Ray cluster."""
    if local:
        import torch

        gpus = int(torch.cuda.is_available())
    else:
        gpus = cluster_gpus()
    use_gpu = config.device.startswith("cuda") or (config.device == "auto" and gpus > 0)
    if use_gpu and gpus == 0 and not local:
        print("no GPU in the Ray cluster yet: the workers wait for the autoscaler to add GPU nodes", file=sys.stderr)
    return gpus, use_gpu


class ShardLog:
    """The output directory's manifest as shards finish: each shard's file is written first, then the manifest that
    lists it, so a listed shard always has its file."""

    def __init__(self, out: Path, manifest: dict):
        self.out, self.manifest, self.records_run = out, manifest, 0

    def state(self, shard: Shard) -> str:
        """'done' or 'todo' for `shard` (see `shard_state`)."""
        return shard_state(self.out, shard, self.manifest["shards"].get(str(shard.index)))

    def save(self, shard: Shard, records: list[Record], where: str, seconds: float) -> None:
        """Write the shard's records and list it in the manifest, both atomically."""
        write_records(records, self.out / shard.file)
        self.manifest["shards"][str(shard.index)] = {
            "file": shard.file, "prompts": shard.fingerprint, "records": len(records), "worker": where,
            "seconds": round(seconds, 3),
        }
        write_atomic(self.out / MANIFEST, manifest_text(self.manifest))
        self.records_run += len(records)

    @property
    def finished(self) -> int:
        """Shards listed as done."""
        return len(self.manifest["shards"])

    @property
    def records(self) -> int:
        """Records in the directory, over all finished shards."""
        return sum(e["records"] for e in self.manifest["shards"].values())


class _LazyBar:
    """A tqdm bar opened when the first worker is ready, so an error before that prints only its own line."""

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.bar = kwargs, None

    def open(self) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(**self.kwargs)

    def update(self, n: int, **postfix) -> None:
        self.open()
        self.bar.update(n)
        self.bar.set_postfix(**postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_local(worker: CollectWorker, todo: list[Shard], done: Callable) -> None:
    """Run the shards one after another in this process."""
    for shard in todo:
        t = time.perf_counter()
        records, where = worker.collect(shard)
        done(shard, records, where, time.perf_counter() - t, [], [])


def _run_actors(config: CollectConfig, todo: list[Shard], n_workers: int, use_gpu: bool, cpus: float,
                max_restarts: int, done: Callable, started: Callable[[], None], warn_after_s: float = 300.0) -> None:
    """Give the shards to `n_workers` actors, one shard in flight per actor, until all are saved.

    An actor gets work only once its pair is loaded, so one that never finds resources (more workers than GPUs)
    just never takes a shard, and the others finish the run."""
    import ray
    from ray.exceptions import RayActorError

    resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": cpus}
    remote = ray.remote(CollectWorker).options(
        **resources, max_restarts=max_restarts, max_task_retries=max_restarts,  # a restarted actor redoes its shard
    )
    actors = [remote.remote(config.to_dict(), threads=1 if use_gpu else max(1, int(cpus))) for _ in range(n_workers)]
    starting = {actor.where.remote(): i for i, actor in enumerate(actors)}  # ready ref -> actor index
    inflight: dict = {}  # shard ref -> (actor index, shard, start time)
    queue, idle, alive = deque(todo), [], set(range(n_workers))
    warned = False

    def submit(i: int) -> None:
        if queue:
            shard = queue.popleft()
            inflight[actors[i].collect.remote(shard)] = (i, shard, time.perf_counter())
        else:
            idle.append(i)

    def lost(i: int, shard: Shard | None) -> None:
        # Dead for good (restarts used up, or killed without restart): its shard goes back to the others.
        alive.discard(i)
        if shard is not None:
            queue.appendleft(shard)
        if not alive:
            raise CollectError(f"all {n_workers} collection workers died ({len(queue) + len(inflight)} shard(s) not "
                               "collected; the finished ones are kept); rerun the same command to resume")
        while idle and queue:
            submit(idle.pop())

    try:
        while queue or inflight:
            ready, _ = ray.wait([*starting, *inflight], num_returns=1, timeout=warn_after_s)
            if not ready:
                if not inflight and not warned:
                    print(f"no collection worker has started after {warn_after_s:.0f}s: the cluster has "
                          f"{ray.cluster_resources()}, each worker needs {resources}", file=sys.stderr)
                    warned = True
                continue
            ref = ready[0]
            if ref in starting:
                i = starting.pop(ref)
                try:
                    _get(ref)
                except RayActorError:
                    lost(i, None)
                    continue
                started()
                submit(i)
                continue
            i, shard, start = inflight.pop(ref)
            try:
                records, where = _get(ref)
            except RayActorError:
                lost(i, shard)
                continue
            busy = {j for j, _, _ in inflight.values()}
            done(shard, records, where, time.perf_counter() - start, [actors[j] for j in sorted(busy)],
                 [actors[j] for j in sorted(alive - busy)])
            submit(i)
    finally:
        for actor in actors:
            ray.kill(actor)  # frees their GPUs/CPUs now rather than when the handles are collected


def _get(ref):
    """ray.get, re-raising a task's ValueError/FileNotFoundError (the user's mistake, e.g. a bad model path) as
    itself, without the remote traceback, so the CLI prints it as one line."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, (ValueError, FileNotFoundError)):
            raise exc.cause from None
        raise
