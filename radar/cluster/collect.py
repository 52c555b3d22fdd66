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

import hashlib
import json
import os
import socket
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from radar.controller.dataset import SCHEMA_VERSION, Record, shard_files, write_records
from radar.common.prompts import Prompt

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "radar-collect-manifest/1"
# Settings that change what the records are: a rerun must match all of them to add to a directory.
CONFIG_KEYS = ("prompts", "model", "draft", "t_max", "k", "total_tokens", "temperature", "max_new_tokens", "seed",
               "device", "dtype", "shard_size", "schema_version")


class CollectError(RuntimeError):
    """The run could not finish (workers died); the shards it finished are kept."""


@dataclass(frozen=True)
class CollectConfig:
    """What a collection run makes; `device`, `dtype` and `total_tokens` are resolved before the run starts."""

    model: str
    draft: str
    prompts: str = "mt_bench"  # the prompt set's name or file, as given
    t_max: int = 8
    k: int = 10
    total_tokens: int | None = None  # None: the device's default tree budget
    temperature: float = 0.0
    max_new_tokens: int = 128
    seed: int = 0
    device: str = "auto"  # auto, cpu or cuda
    dtype: str = "auto"
    shard_size: int = 8
    schema_version: int = SCHEMA_VERSION

    def check(self) -> None:
        """Raise ValueError for settings no run can use."""
        if self.t_max < 1 or self.k < 1:
            raise ValueError("t_max and k must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {self.shard_size}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device {self.device!r}: use auto, cpu or cuda")

    def resolved(self, gpu: bool) -> "CollectConfig":
        """The config with auto settings fixed: the device the workers get (cuda when `gpu`), its dtype and tree
        budget. Stored in the manifest, so a resumed run on other hardware cannot silently change them."""
        import torch

        from radar.decoding.pair import DTYPES, default_tree, resolve_dtype

        device = ("cuda" if gpu else "cpu") if self.device == "auto" else self.device.split(":")[0]
        dtype = resolve_dtype(self.dtype, torch.device(device))
        dtype_name = next(name for name, dt in DTYPES.items() if dt == dtype)
        total = self.total_tokens if self.total_tokens is not None else default_tree(torch.device(device)).total_tokens
        return replace(self, device=device, dtype=dtype_name, total_tokens=total)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Shard:
    """A fixed chunk of prompts: shard `index` holds prompts[index * size : (index + 1) * size]."""

    index: int
    prompts: tuple[Prompt, ...]

    @property
    def file(self) -> str:
        return f"shard-{self.index:05d}.parquet"

    @property
    def fingerprint(self) -> list[list[str]]:
        """[id, hash of text] per prompt: what the manifest compares on a rerun."""
        return [[p.id, hashlib.sha256(p.text.encode()).hexdigest()[:16]] for p in self.prompts]


@dataclass
class CollectSummary:
    """What a run did: shards and records in the directory, and how many of them this run made."""

    out: Path
    shards: int
    shards_skipped: int
    shards_run: int
    records: int  # in the directory, over all finished shards
    records_run: int
    prompts_run: int
    workers: int
    seconds: float
    config: dict = field(default_factory=dict)


def make_shards(prompts: Sequence[Prompt], shard_size: int) -> list[Shard]:
    """Cut the prompt list into fixed, index-identified shards."""
    return [Shard(i // shard_size, tuple(prompts[i: i + shard_size])) for i in range(0, len(prompts), shard_size)]


# ---- the manifest ---------------------------------------------------------------------------------------


def _manifest_text(manifest: dict) -> str:
    """The manifest as JSON with one line per shard (readable and diffable)."""
    entries = sorted(manifest["shards"].items(), key=lambda item: int(item[0]))  # by index, not completion order
    shards = ",\n".join(f"  {json.dumps(key)}: {json.dumps(entry)}" for key, entry in entries)
    head = {k: v for k, v in manifest.items() if k != "shards"}
    return json.dumps(head, indent=1)[:-2] + ',\n "shards": {\n' + shards + "\n }\n}\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # hidden: never mistaken for data
    tmp.write_text(text)
    os.replace(tmp, path)


def read_manifest(out: str | Path) -> dict | None:
    """The manifest of a collection directory, or None when there is none."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg}); it is not a radar collection manifest") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a radar collection manifest (format {MANIFEST_FORMAT})")
    return data


def _open_manifest(out: Path, config: CollectConfig) -> dict:
    """The directory's manifest, or a new one for `config` (written with the first shard, so a run that fails
    before any shard, e.g. on a wrong model path, leaves nothing to mismatch); ValueError when the directory was
    collected with another config."""
    manifest = read_manifest(out)
    wanted = {key: config.to_dict()[key] for key in CONFIG_KEYS}
    if manifest is None:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a directory for the shards")
        if out.exists() and shard_files(out):
            raise ValueError(f"{out} already holds Parquet files but no {MANIFEST}; collect into a new directory")
        return {"format": MANIFEST_FORMAT, "config": wanted, "shards": {}}
    have = manifest.get("config", {})
    diff = [f"{key}: {have.get(key)!r} there, {wanted[key]!r} now" for key in CONFIG_KEYS if have.get(key) != wanted[key]]
    if diff:
        raise ValueError(f"{out} was collected with other settings ({'; '.join(diff)}); "
                         "use a new --out directory or the same settings")
    return manifest


def _shard_state(out: Path, shard: Shard, entry: dict | None) -> str:
    """'done', 'todo' or raise: compare a shard with what the manifest says was collected for its index."""
    if entry is None or not (out / entry["file"]).exists():
        return "todo"
    have, now = entry["prompts"], shard.fingerprint
    if have[: len(now)] == now:
        return "done"  # the same prompts (or, after a smaller --limit, more of them)
    if now[: len(have)] == have:
        return "todo"  # a larger --limit grew the last shard: redo it whole, replacing its file
    pos = next(i for i, (a, b) in enumerate(zip(have, now)) if a != b)
    what = "text" if have[pos][0] == now[pos][0] else f"id ({have[pos][0]!r} there, {now[pos][0]!r} now)"
    raise ValueError(f"{out}: shard {shard.index} was collected from other prompts (its prompt {pos + 1} has another "
                     f"{what}); use a new --out directory")


# ---- the worker ---------------------------------------------------------------------------------------


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


# ---- Ray ---------------------------------------------------------------------------------------------


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Raise ValueError unless something listens at the address's host:port (ray.init would hang retrying)."""
    hp = _host_port(address)
    if hp is None:
        raise ValueError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://head:10001)")
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"cannot reach the Ray cluster at {address}: {reason}; is `ray start --head` running "
                         "there and the port open?") from None


def connect(address: str | None = None) -> bool:
    """Connect to Ray: `address`, else $RAY_ADDRESS (as under `ray job submit`), else a new local instance.
    Returns True when this call started the connection (the caller then shuts it down)."""
    import ray

    env = os.environ.get("RAY_ADDRESS")
    target = address or ("auto" if env else None)
    check = address if address not in (None, "auto", "local") else (env if target == "auto" and env else None)
    if check and check.startswith(("http://", "https://")):
        raise ValueError(f"{check} is a dashboard (job submission) address; ray.init needs the cluster's address "
                         "(host:6379, or ray://host:10001); use it with `ray job submit --address` instead")
    if check:
        check_reachable(check)
    if ray.is_initialized():
        return False
    try:
        ray.init(address=target, ignore_reinit_error=True)
    except ConnectionError as exc:
        hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            " (if the cluster uses token authentication, set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or "
            "~/.ray/auth_token)")
        raise ValueError(f"cannot connect to Ray at {target}: {str(exc).splitlines()[0]}{hint}") from None
    return True


def cluster_gpus() -> int:
    """GPUs the connected Ray cluster has now."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


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
    or 1) share them on the connected cluster (see `connect`), each with one GPU when the cluster has GPUs and
    `cpus_per_worker` CPUs otherwise. `on_shard(index, busy, idle)` is called after each shard is saved, with the
    live actors that have a shard in flight and the others (a test hook, e.g. to kill a worker mid-shard)."""
    t0 = time.perf_counter()
    out = Path(out)
    config.check()
    if not prompts:
        raise ValueError("no prompts to collect")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if local:
        import torch

        gpus = int(torch.cuda.is_available())
    else:
        gpus = cluster_gpus()
    use_gpu = config.device.startswith("cuda") or (config.device == "auto" and gpus > 0)
    if use_gpu and gpus == 0 and not local:
        print("no GPU in the Ray cluster yet: the workers wait for the autoscaler to add GPU nodes", file=sys.stderr)
    config = config.resolved(use_gpu)

    manifest = _open_manifest(out, config)
    shards = make_shards(prompts, config.shard_size)
    todo = [s for s in shards if _shard_state(out, s, manifest["shards"].get(str(s.index))) == "todo"]
    n_workers = 1 if local else min(workers or max(1, gpus if use_gpu else 1), max(1, len(todo)))

    records_run = 0

    def save(shard: Shard, records: list[Record], where: str, seconds: float) -> None:
        nonlocal records_run
        write_records(records, out / shard.file)  # atomic: temp file + rename
        manifest["shards"][str(shard.index)] = {
            "file": shard.file, "prompts": shard.fingerprint, "records": len(records), "worker": where,
            "seconds": round(seconds, 3),
        }
        _write_atomic(out / MANIFEST, _manifest_text(manifest))  # after the file: a listed shard always has its file
        records_run += len(records)

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
            save(shard, records, where, seconds)
            bar.update(len(shard.prompts), shards=f"{len(manifest['shards'])}/{len(shards)}", records=records_run)
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
        records=sum(e["records"] for e in manifest["shards"].values()), records_run=records_run,
        prompts_run=sum(len(s.prompts) for s in todo), workers=n_workers if todo else 0,
        seconds=time.perf_counter() - t0, config=config.to_dict(),
    )


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


def main(argv: list[str] | None = None) -> None:
    """`python -m radar.cluster.collect ARGS` is `radar collect ARGS` (an entrypoint for `ray job submit`)."""
    from radar.cli.app import app

    app(["collect", *(sys.argv[1:] if argv is None else argv)], prog_name="radar")


__all__ = ["CollectConfig", "CollectError", "CollectSummary", "CollectWorker", "Shard", "collect_dataset",
           "make_shards", "read_manifest", "connect", "check_reachable", "cluster_gpus", "MANIFEST"]


if __name__ == "__main__":  # pragma: no cover - entrypoint
    main()
