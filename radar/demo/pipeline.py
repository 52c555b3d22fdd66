"""`radar demo`: the whole pipeline on one model pair (DESIGN section 3), resumable stage by stage.

    pair      the demo pair, built once and cached (or the --model/--draft checkpoints)
    costs     the cost file measured on this machine           -> WORK/costs.json
    collect   records from MT-bench + Alpaca on Ray actors     -> WORK/records/
    train     one controller (MLflow experiment radar-train)   -> WORK/controller/
    tune      a small Ray Tune sweep (experiment radar-tune)   -> WORK/tune/, best trial in WORK/tuned/
    register  the better of the two by simulated held-out speedup, as models:/radar-controller@champion
                                                               -> WORK/champion/, WORK/simulate.json
    bench     ar, hf, hf-assisted, tree:D (the simulator's best fixed depth) and radar (experiment radar-bench)
                                                               -> WORK/bench.json

WORK/stages.json records, per stage, the inputs it ran with (its settings and digests of the upstream outputs it
read), its outputs and their digest, its status and its duration. A stage is skipped when its entry is done, its
inputs are the same and its outputs are still there unchanged; otherwise it runs, and every stage after it sees a new
upstream digest and runs too. Outputs are written atomically (temp file or directory, then rename), so a failed or
interrupted stage leaves the earlier ones intact. A stage rerun with the same inputs resumes where it can: the
collection keeps its finished shards and the sweep its finished trials.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

STAGES = ("pair", "costs", "collect", "train", "tune", "register", "bench")
MANIFEST = "stages.json"
MANIFEST_FORMAT = "radar-demo-stages/1"
TUNE_NAME = "radar-tune"  # the sweep's directory under WORK/tune
TUNE_SPACE, TUNE_SEARCH = "demo", "optuna"


class StageError(RuntimeError):
    """A stage failed; the stages before it are done and kept, and a rerun resumes from this one."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {cause}")
        self.stage, self.cause = stage, cause


@dataclass
class DemoRunConfig:
    """Every setting of a demo run. The defaults are benchmarks/controller_demo.py's settings for the demo pair on a
    CPU, sized so the whole run takes well under 20 minutes on 2 cores."""

    work_dir: str = "runs/demo"
    model: str | None = None  # target checkpoint directory; None: the demo pair (built on first use, cached)
    draft: str | None = None
    device: str = "cpu"  # the tree below is the CPU one; on a GPU pass a wider tree (k, tree_tokens)
    dtype: str = "auto"
    threads: int = 1  # torch intra-op threads in this process: small models decode fastest on one (README)
    # The tree and decoding, shared by costs, collect and bench.
    t_max: int = 8
    k: int = 2
    tree_tokens: int = 12
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    profile_repeats: int = 50
    # collect
    collect_sets: tuple[str, ...] = ("mt_bench", "alpaca")
    limit_per_set: int = 40
    workers: int = 2  # Ray actors, one model pair each
    cpus_per_worker: float = 1.0
    shard_size: int = 8
    ray_cpus: int = 2  # for a local Ray this run starts (one already connected is reused as it is)
    # train
    variant: str = "improved"
    alpha: float = 0.02
    gamma: float = 0.99
    lr: float = 3e-3  # with 40 epochs; benchmarks/controller_demo.py trains 100 epochs at this rate
    epochs: int = 40
    batch_size: int = 256
    eval_fraction: float = 0.2  # prompts held out for the simulated speedup (train, tune and register share it)
    # tune
    trials: int = 4
    tune_epochs: int = 10
    tune_batch_size: int = 64
    # bench
    bench_prompts: str = "mt_bench"
    bench_limit: int = 20
    repeats: int = 2
    track: bool = True  # MLflow: runs in radar-train, radar-tune, radar-bench and the champion in the registry

    def __post_init__(self) -> None:
        self.collect_sets = tuple(self.collect_sets)
        if self.draft is not None and self.model is None:
            raise ValueError("--draft given without --model: name the target too")
        if self.model is not None and self.draft is None:
            raise ValueError("the pipeline needs a draft model: pass --draft PATH with --model")
        if not self.collect_sets:
            raise ValueError("no prompt sets to collect from")
        for name in ("t_max", "k", "tree_tokens", "max_new_tokens", "profile_repeats", "limit_per_set", "workers",
                     "shard_size", "epochs", "batch_size", "trials", "tune_epochs", "tune_batch_size", "bench_limit",
                     "repeats", "threads", "ray_cpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.t_max < 2:
            raise ValueError("t_max must be >= 2: with one draft call there is nothing for the controller to decide")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def work(self) -> Path:
        return Path(self.work_dir)


@dataclass
class StageReport:
    """How one stage went in this run."""

    name: str
    status: str  # "done", "skipped" or "failed"
    seconds: float
    summary: str = ""


@dataclass
class DemoResult:
    """What `run_demo` made: per-stage reports, the bench and simulation results, and the champion."""

    work_dir: Path
    stages: list[StageReport]
    bench: dict
    simulation: dict
    champion: dict
    seconds: float
    tracking_uri: str | None = None

    @property
    def skipped(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "skipped"]


# ---- small helpers --------------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _key(inputs: dict) -> str:
    """The digest a stage's inputs are compared by."""
    return _sha(json.dumps(inputs, sort_keys=True, default=str).encode())


def _content_digest(paths: list[Path]) -> str | None:
    """Digest of the named files' contents (None when one is missing)."""
    h = hashlib.sha256()
    for p in paths:
        if not p.is_file():
            return None
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _stat_digest(dirs: list[Path]) -> str:
    """Digest of the files' names, sizes and modification times in each directory: cheap for multi-GB checkpoints,
    and changed by any rebuild."""
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
            st = f.stat()
            h.update(f"{d.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _controller_digest(path: Path) -> str | None:
    from radar.controller.policy import CONFIG_FILE, WEIGHTS_FILE

    return _content_digest([path / CONFIG_FILE, path / WEIGHTS_FILE])


def _records_digest(path: Path) -> str | None:
    """The collection's manifest plus every shard's name and size (the manifest lists the finished shards)."""
    from radar.cluster.collect import MANIFEST as COLLECT_MANIFEST

    manifest = path / COLLECT_MANIFEST
    if not manifest.is_file():
        return None
    shards = "".join(f"{f.name}:{f.stat().st_size}\n" for f in sorted(path.glob("*.parquet")))
    return _sha(manifest.read_bytes() + shards.encode())


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _replace_dir(src: Path, dest: Path) -> None:
    """Move the finished directory `src` to `dest`, replacing what was there (the old one is moved aside first,
    so `dest` is at every moment either the old whole directory or the new one)."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
        os.replace(dest, old / "x")
        shutil.rmtree(old, ignore_errors=True)
    os.replace(src, dest)


@contextmanager
def _new_dir(dest: Path) -> Iterator[Path]:
    """A temporary sibling of `dest` to write into; it becomes `dest` when the block finishes without error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-new-", dir=dest.parent))
    try:
        yield tmp
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _interleave(groups: list[list]) -> list:
    """a0, b0, a1, b1, ...: a prompt list whose held-out split and shards mix the sets."""
    out = []
    for i in range(max(map(len, groups))):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- the pipeline ---------------------------------------------------------------------------------------


class DemoPipeline:
    """Runs the stages in order, skipping those already done with the same inputs (see the module docstring)."""

    def __init__(self, cfg: DemoRunConfig, fresh: bool = False, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.work = cfg.work.expanduser()
        self.fresh = fresh
        self.log = log or _stderr_log
        self.reports: list[StageReport] = []
        self._pair = None  # the ModelPair, loaded once when a stage in this process needs it
        self._ray_started = False
        self.manifest: dict = {"format": MANIFEST_FORMAT, "stages": {}}

    # ---- the stage manifest ----

    def _load_manifest(self) -> None:
        path = self.work / MANIFEST
        if path.exists() and not self.fresh:
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                data = None
            if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT:
                self.manifest = data
            else:  # unreadable: every stage reruns (outputs are replaced atomically, nothing is lost)
                self.log(f"{path} is not a demo stage manifest; running every stage")

    def _record(self, name: str, entry: dict) -> None:
        self.manifest["stages"][name] = entry
        _write_atomic(self.work / MANIFEST, json.dumps(self.manifest, indent=1, default=str) + "\n")

    @property
    def _tracking(self) -> str | None:
        """Where this run logs, part of the inputs of every stage that logs (another store means running again)."""
        if not self.cfg.track:
            return None
        from radar.common.tracking import tracking_uri

        uri = tracking_uri()
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # The default store is relative to the working directory: run elsewhere, it is another store.
            uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
        return uri

    def _stage(
        self,
        name: str,
        inputs: dict,
        run: Callable[[bool], dict],
        check: Callable[[dict], bool],
        start: str = "",
        summary: Callable[[dict], str] = lambda o: "",
        clean: Callable[[], None] | None = None,
    ) -> dict:
        """Skip stage `name` when it is done with these inputs and `check(outputs)` holds; else run it: `run(resume)`
        returns the outputs (`resume`: an earlier attempt with the same inputs left work to reuse). `clean` removes
        partial work of other inputs first."""
        index = STAGES.index(name) + 1
        tag = f"[{index}/{len(STAGES)}] {name}"
        key = _key(inputs)
        entry = self.manifest["stages"].get(name)
        if entry and entry.get("status") == "done" and entry.get("key") == key and check(entry["outputs"]):
            self.log(f"{tag}: skipped (done)")
            self.reports.append(StageReport(name, "skipped", 0.0, summary(entry["outputs"])))
            return entry["outputs"]
        resume = bool(entry) and entry.get("key") == key
        if not resume and clean is not None:
            clean()
        self.log(f"{tag}: {start or 'running'} ...")
        base = {"key": key, "inputs": inputs, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._record(name, {**base, "status": "running"})
        t0 = time.perf_counter()
        try:
            outputs = run(resume)
        except BaseException as exc:
            seconds = time.perf_counter() - t0
            self._record(name, {**base, "status": "failed", "seconds": round(seconds, 2),
                                "error": f"{type(exc).__name__}: {exc}"})
            self.log(f"{tag}: FAILED after {seconds:.1f}s: {type(exc).__name__}: {exc}")
            self.reports.append(StageReport(name, "failed", seconds, str(exc)))
            if isinstance(exc, Exception):
                raise StageError(name, exc) from exc
            raise  # KeyboardInterrupt and friends stay what they are
        seconds = time.perf_counter() - t0
        self._record(name, {**base, "status": "done", "seconds": round(seconds, 2), "outputs": outputs})
        text = summary(outputs)
        self.log(f"{tag}: done in {seconds:.1f}s" + (f" ({text})" if text else ""))
        self.reports.append(StageReport(name, "done", seconds, text))
        return outputs

    # ---- shared resources ----

    def _model_pair(self, target: str, draft: str):
        """The target+draft loaded in this process with the pipeline's tree (once per run)."""
        if self._pair is None:
            from radar.decoding.pair import ModelPair
            from radar.decoding.tree import TreeConfig

            tree = TreeConfig(branching=self.cfg.k, max_calls=self.cfg.t_max, total_tokens=self.cfg.tree_tokens)
            self._pair = ModelPair.load(target, draft, device=self.cfg.device, dtype=self.cfg.dtype, tree=tree)
        return self._pair

    def _ensure_ray(self) -> None:
        """Connect to Ray once: reuse a connection this process already has (and leave it alone), join the cluster
        at $RAY_ADDRESS (as under `ray job submit`), or start a local instance with `ray_cpus` CPUs."""
        import ray

        if ray.is_initialized():
            return
        if os.environ.get("RAY_ADDRESS"):
            from radar.cluster.collect import connect

            self._ray_started = connect(None)
            return
        self.log(f"starting a local Ray instance with {self.cfg.ray_cpus} CPUs (shut down at the end of the run)")
        ray.init(num_cpus=self.cfg.ray_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        self._ray_started = True

    def close(self) -> None:
        """Shut down the Ray instance this run started (never one it found connected)."""
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    # ---- the stages ----

    def stage_pair(self) -> dict:
        """The checkpoints: always resolved (`ensure_demo_pair` is itself cached), reported as skipped when they are
        the ones the last run used."""
        t0 = time.perf_counter()
        try:
            if self.cfg.model is None:
                from radar.ops.demo_pair import ensure_demo_pair

                target, draft = ensure_demo_pair()
            else:
                target, draft = Path(self.cfg.model), Path(self.cfg.draft)
                for role, p in (("--model", target), ("--draft", draft)):
                    if not p.is_dir():
                        raise FileNotFoundError(f"{role} {p}: no such checkpoint directory")
            outputs = {"target": str(target.resolve()), "draft": str(draft.resolve()),
                       "digest": _stat_digest([target, draft])}
        except Exception as exc:
            self.log(f"[1/{len(STAGES)}] pair: FAILED: {type(exc).__name__}: {exc}")
            self.reports.append(StageReport("pair", "failed", time.perf_counter() - t0, str(exc)))
            raise StageError("pair", exc) from exc
        entry = self.manifest["stages"].get("pair")
        tag = f"[1/{len(STAGES)}] pair"
        summary = f"{target.parent if self.cfg.model is None else target}"
        seconds = time.perf_counter() - t0
        if entry and entry.get("status") == "done" and entry.get("outputs") == outputs:
            self.log(f"{tag}: skipped (done)")
            self.reports.append(StageReport("pair", "skipped", 0.0, summary))
        else:
            self._record("pair", {"key": _key(outputs), "inputs": {"model": self.cfg.model, "draft": self.cfg.draft},
                                  "status": "done", "seconds": round(seconds, 2), "outputs": outputs})
            self.log(f"{tag}: done in {seconds:.1f}s ({summary})")
            self.reports.append(StageReport("pair", "done", seconds, summary))
        return outputs

    def stage_costs(self, pair: dict) -> dict:
        """T_0, T_f, T_eye and the AR step of this pair on this machine, with the pipeline's tree."""
        cfg, path = self.cfg, self.work / "costs.json"
        inputs = {"pair": pair["digest"], "t_max": cfg.t_max, "k": cfg.k, "tree_tokens": cfg.tree_tokens,
                  "repeats": cfg.profile_repeats, "device": cfg.device, "dtype": cfg.dtype, "threads": cfg.threads}

        def run(resume: bool) -> dict:
            from radar.controller.profile import profile_costs

            cost = profile_costs(self._model_pair(pair["target"], pair["draft"]), t_max=cfg.t_max, k=cfg.k,
                                 total_tokens=cfg.tree_tokens, repeats=cfg.profile_repeats,
                                 target_name=pair["target"], draft_name=pair["draft"])
            _write_atomic(path, json.dumps(cost.to_dict(), indent=2, sort_keys=True) + "\n")
            return {"path": str(path), "digest": _content_digest([path]), "T_0": cost.T_0, "T_f": cost.T_f,
                    "T_eye": cost.T_eye, "ar_step": cost.ar_step}

        return self._stage(
            "costs", inputs, run, check=lambda o: _content_digest([path]) == o["digest"],
            start=f"profiling (t_max {cfg.t_max}, k {cfg.k}, {cfg.tree_tokens} tree tokens, {cfg.threads} thread)",
            summary=lambda o: (f"T_0 {o['T_0'] * 1e3:.2f} ms, T_f {o['T_f'] * 1e3:.2f} ms, T_eye "
                               f"{o['T_eye'] * 1e3:.3f} ms, AR step {o['ar_step'] * 1e3:.2f} ms"),
        )

    def stage_collect(self, pair: dict) -> dict:
        """Records of every decoding cycle on the first `limit_per_set` prompts of each set, on Ray actors."""
        from radar.cluster.collect import CollectConfig

        cfg, out = self.cfg, self.work / "records"
        config = CollectConfig(model=pair["target"], draft=pair["draft"], prompts="+".join(cfg.collect_sets),
                               t_max=cfg.t_max, k=cfg.k, total_tokens=cfg.tree_tokens, temperature=cfg.temperature,
                               max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                               shard_size=cfg.shard_size)
        inputs = {"pair": pair["digest"], "sets": list(cfg.collect_sets), "limit_per_set": cfg.limit_per_set,
                  **{k: v for k, v in config.to_dict().items() if k not in ("model", "draft", "prompts")}}

        def run(resume: bool) -> dict:
            from radar.cluster.collect import collect_dataset
            from radar.common.prompts import Prompt, load_prompts

            # Ids prefixed with the set: sets may reuse ids, and the held-out split groups records by prompt id.
            groups = [[Prompt(f"{s}/{p.id}", p.text, p.source) for p in load_prompts(s, cfg.limit_per_set)]
                      for s in cfg.collect_sets]
            self._ensure_ray()
            summary = collect_dataset(_interleave(groups), out, config, workers=cfg.workers,
                                      cpus_per_worker=cfg.cpus_per_worker)
            return {"path": str(out), "digest": _records_digest(out), "records": summary.records,
                    "prompts": sum(map(len, groups)), "shards_run": summary.shards_run,
                    "shards_reused": summary.shards_skipped}

        workers = f"up to {cfg.workers} Ray actors" if cfg.workers > 1 else "1 Ray actor"  # one per shard at most
        return self._stage(
            "collect", inputs, run, check=lambda o: _records_digest(out) == o["digest"],
            start=f"{cfg.limit_per_set} prompts from each of {', '.join(cfg.collect_sets)} on {workers}",
            summary=lambda o: f"{o['records']} records from {o['prompts']} prompts",
            clean=lambda: shutil.rmtree(out, ignore_errors=True),  # another config: its shards are of no use
        )

    def _split(self, records_path: str):
        from radar.controller.dataset import read_records, train_test_split

        records = read_records(records_path)
        fit, held = train_test_split(records, self.cfg.eval_fraction, seed=self.cfg.seed)
        return records, fit, held

    def stage_train(self, costs: dict, records: dict) -> dict:
        """One controller with the fixed settings, evaluated every epoch on the held-out prompts."""
        cfg, out = self.cfg, self.work / "controller"
        inputs = {"records": records["digest"], "costs": costs["digest"], "variant": cfg.variant, "alpha": cfg.alpha,
                  "gamma": cfg.gamma, "lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                  "eval_fraction": cfg.eval_fraction, "seed": cfg.seed, "tracking": self._tracking}

        def run(resume: bool) -> dict:
            from radar.controller.mdp import CostModel
            from radar.controller.policy import ControllerConfig
            from radar.controller.train import TrainConfig, train
            from radar.common import tracking

            all_records, fit, held = self._split(records["path"])
            tcfg = TrainConfig(variant=cfg.variant, alpha=cfg.alpha, gamma=cfg.gamma, lr=cfg.lr, epochs=cfg.epochs,
                               batch_size=cfg.batch_size, seed=cfg.seed, cost=CostModel.load(costs["path"]))
            ctrl_cfg = ControllerConfig(input_size=all_records.k)
            params = {"train": tcfg.to_dict(), "controller": asdict(ctrl_cfg), "records": records["path"],
                      "n_train": len(fit), "n_eval": len(held), "source": "radar demo"}
            run_id = None
            with tracking.run("radar-train", run_name="demo", params=params) if cfg.track else nullcontext() as active:
                on_epoch = (lambda m, _: tracking.log_metrics(m, step=int(m["epoch"]))) if cfg.track else None
                controller, history = train(fit, tcfg, ctrl_cfg, on_epoch=on_epoch, eval_records=held)
                with _new_dir(out) as tmp:
                    controller.save(tmp, meta={"train": tcfg.to_dict(), "records": records["path"],
                                               "history": history.epochs[-1:]})
                    if cfg.track:
                        tracking.log_dir(tmp, tracking.CONTROLLER_ARTIFACT)
                        run_id = active.info.run_id
            last = history.epochs[-1]
            return {"path": str(out), "digest": _controller_digest(out), "run_id": run_id,
                    "eval_speedup": last.get("eval_speedup"), "n_train": len(fit), "n_eval": len(held)}

        return self._stage(
            "train", inputs, run, check=lambda o: _controller_digest(out) == o["digest"],
            start=f"{cfg.variant} REINFORCE, {cfg.epochs} epochs",
            summary=lambda o: f"held-out simulated speedup {o['eval_speedup']:.3f}x" if o.get("eval_speedup") else "",
        )

    def stage_tune(self, costs: dict, records: dict) -> dict:
        """A small Optuna + ASHA sweep over the demo space; its best checkpoint is copied to WORK/tuned."""
        cfg = self.cfg
        storage, out = self.work / "tune", self.work / "tuned"
        inputs = {"records": records["digest"], "costs": costs["digest"], "trials": cfg.trials,
                  "epochs": cfg.tune_epochs, "batch_size": cfg.tune_batch_size, "space": TUNE_SPACE,
                  "search": TUNE_SEARCH, "eval_fraction": cfg.eval_fraction, "seed": cfg.seed,
                  "tracking": self._tracking}

        def run(resume: bool) -> dict:
            from radar.controller.policy import CONFIG_FILE, WEIGHTS_FILE
            from radar.cluster.tune.space import METRIC, MODE
            from radar.cluster.tune.sweep import SweepConfig, _trial_run_id, best_result, run_sweep, unfinished

            sweep = SweepConfig(data=records["path"], num_samples=cfg.trials, search=TUNE_SEARCH, space=TUNE_SPACE,
                                costs=costs["path"], epochs=cfg.tune_epochs, batch_size=cfg.tune_batch_size,
                                eval_fraction=cfg.eval_fraction, seed=cfg.seed, storage=str(storage), name=TUNE_NAME,
                                resume=True,  # an earlier attempt's sweep is ours (clean removed any other)
                                cpus_per_trial=1.0, max_concurrent=1, track=cfg.track, verbose=0)
            self._ensure_ray()
            results, restored = run_sweep(sweep)
            owed = unfinished(sweep, results, restored)
            if owed:
                raise RuntimeError(f"the sweep stopped with {owed} trial(s) unfinished (rerun to resume it)")
            best = best_result(results)
            ckpt = best.get_best_checkpoint(METRIC, MODE) or best.checkpoint
            if ckpt is None:
                raise RuntimeError(f"the best trial ({best.path}) left no checkpoint")
            with ckpt.as_directory() as d, _new_dir(out) as tmp:
                for f in (CONFIG_FILE, WEIGHTS_FILE):  # only the controller: the checkpoint may hold Tune's files
                    shutil.copy2(Path(d) / f, tmp / f)
            trial_id = str(best.metrics.get("trial_id", ""))
            run_id = None
            if cfg.track and trial_id:
                from radar.common.tracking import registry_errors

                with registry_errors("looking up the best trial's MLflow run"):
                    run_id = _trial_run_id(trial_id)
            return {"path": str(out), "digest": _controller_digest(out), "experiment": str(sweep.experiment_dir),
                    "trial_id": trial_id, "run_id": run_id, "errors": results.num_errors, "trials": len(results),
                    "restored": restored, "eval_speedup": float(best.metrics_dataframe[METRIC].max())}

        return self._stage(
            "tune", inputs, run, check=lambda o: _controller_digest(out) == o["digest"],
            start=f"{cfg.trials} trials x {cfg.tune_epochs} epochs ({TUNE_SEARCH}, ASHA, space {TUNE_SPACE}), "
                  f"one at a time",
            summary=lambda o: f"best trial {o['trial_id']}: held-out simulated speedup {o['eval_speedup']:.3f}x",
            clean=lambda: shutil.rmtree(storage / TUNE_NAME, ignore_errors=True),  # Tune refuses a taken name
        )

    def stage_register(self, costs: dict, records: dict, trained: dict, tuned: dict) -> dict:
        """Simulate both controllers on the held-out records; the better one becomes WORK/champion and, with MLflow,
        models:/radar-controller@champion."""
        cfg, out, sim_path = self.cfg, self.work / "champion", self.work / "simulate.json"
        inputs = {"records": records["digest"], "costs": costs["digest"], "trained": trained["digest"],
                  "tuned": tuned["digest"], "eval_fraction": cfg.eval_fraction, "seed": cfg.seed,
                  "tracking": self._tracking}

        def run(resume: bool) -> dict:
            from radar.controller.mdp import CostModel
            from radar.controller.policy import load_controller
            from radar.controller.simulate import simulate
            from radar.common import tracking

            _, fit, held = self._split(records["path"])
            cost = CostModel.load(costs["path"])
            candidates = {"trained": trained, "tuned": tuned}  # on a tie the trained one (listed first) wins
            sims = {name: simulate(held, cost, controller=load_controller(c["path"]), train_records=fit)
                    for name, c in candidates.items()}
            speedups = {name: s.policies["controller"].speedup for name, s in sims.items()}
            choice = max(speedups, key=lambda n: speedups[n])
            sim = sims[choice]
            depth = int(sim.best_fixed.name.removeprefix("fixed-"))
            with _new_dir(out) as tmp:
                for f in Path(candidates[choice]["path"]).iterdir():
                    shutil.copy2(f, tmp / f.name)
            _write_atomic(sim_path, json.dumps({"champion": choice, "controller_speedups": speedups,
                                                "best_fixed_depth": depth, "table": sim.to_dict()}, indent=1) + "\n")
            version = None
            if cfg.track:
                metrics = {"eval_speedup": speedups[choice], "best_fixed_speedup": sim.best_fixed.speedup,
                           "best_fixed_depth": depth, "candidate": choice, "source": "radar demo"}
                experiment = "radar-train" if choice == "trained" else "radar-tune"
                version = tracking.register_controller(out, candidates[choice]["run_id"], metrics=metrics,
                                                       experiment=experiment)
            return {"path": str(out), "digest": _controller_digest(out), "choice": choice, "speedups": speedups,
                    "best_fixed_depth": depth, "best_fixed_speedup": sim.best_fixed.speedup, "version": version,
                    "simulation": str(sim_path)}

        def check(o: dict) -> bool:
            if _controller_digest(out) != o["digest"] or not sim_path.is_file():
                return False
            return not cfg.track or self._champion_version() == o["version"]

        return self._stage(
            "register", inputs, run, check,
            start="simulating both controllers on the held-out prompts",
            summary=lambda o: (f"champion: the {o['choice']} controller, {o['speedups'][o['choice']]:.3f}x simulated"
                               + (f", models:/radar-controller version {o['version']}" if o["version"] else "")),
        )

    def _champion_version(self) -> int | None:
        """The version models:/radar-controller@champion points at now (None when there is none)."""
        try:
            import mlflow

            from radar.common.tracking import CHAMPION, REGISTERED_MODEL, tracking_uri

            client = mlflow.MlflowClient(tracking_uri())
            return int(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version)
        except Exception:  # no such model or alias, or an unreadable store: register again
            return None

    def stage_bench(self, pair: dict, champion: dict) -> dict:
        """Real decoding, side by side: ar, hf, hf-assisted, the best fixed-depth tree and radar with the champion."""
        cfg, path = self.cfg, self.work / "bench.json"
        methods = ["ar", "hf", "hf-assisted", f"tree:{champion['best_fixed_depth']}", "radar"]
        controller = "models:/radar-controller@champion" if cfg.track else champion["path"]
        inputs = {"pair": pair["digest"], "champion": champion["digest"], "version": champion["version"],
                  "methods": methods, "prompts": cfg.bench_prompts, "limit": cfg.bench_limit,
                  "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "repeats": cfg.repeats,
                  "seed": cfg.seed, "t_max": cfg.t_max, "k": cfg.k, "tree_tokens": cfg.tree_tokens,
                  "device": cfg.device, "dtype": cfg.dtype, "threads": cfg.threads, "tracking": self._tracking}

        def run(resume: bool) -> dict:
            result, run_id = self._run_bench(pair, methods, controller)
            _write_atomic(path, json.dumps(result, indent=1) + "\n")
            return {"path": str(path), "digest": _content_digest([path]), "run_id": run_id,
                    "radar_speedup": result["methods"]["radar"]["speedup_vs_ar"]}

        return self._stage(
            "bench", inputs, run, check=lambda o: _content_digest([path]) == o["digest"],
            start=f"{', '.join(methods)} on {cfg.bench_prompts} (first {cfg.bench_limit}), {cfg.repeats} repeat(s)",
            summary=lambda o: f"radar {o['radar_speedup']:.2f}x ar",
        )

    def _run_bench(self, pair: dict, methods: list[str], controller: str) -> tuple[dict, str | None]:
        """Decode the bench prompts with every method (`run_bench`); log the result to MLflow when tracking."""
        from rich.console import Console
        from rich.progress import Progress

        from radar.ops.bench import HF_METHODS, BenchConfig, HFRunner, run_bench
        from radar.ops.models import attach_controller
        from radar.common.prompts import load_prompts

        cfg = self.cfg
        bench_cfg = BenchConfig(prompts=cfg.bench_prompts, limit=cfg.bench_limit, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, methods=methods, repeats=cfg.repeats, seed=cfg.seed,
                                model=pair["target"], draft=pair["draft"], device=cfg.device, dtype=cfg.dtype,
                                tree_tokens=cfg.tree_tokens, controller=controller)
        prompts = load_prompts(cfg.bench_prompts, cfg.bench_limit)
        model_pair = self._model_pair(pair["target"], pair["draft"])
        attach_controller(model_pair, controller)
        hf = HFRunner(pair["target"], pair["draft"], model_pair.target.device, model_pair.target.dtype) \
            if set(methods) & set(HF_METHODS) else None
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(f"benchmarking {len(prompts)} prompts", total=cfg.repeats * len(methods))
            result = run_bench(model_pair, prompts, bench_cfg, hf, on_step=lambda m: progress.advance(task))
        if not cfg.track:
            return result, None
        from radar.common import tracking

        with tracking.run("radar-bench", run_name="demo", params={**asdict(bench_cfg), "source": "radar demo"}) as run:
            tracking.log_metrics({m: {k: v for k, v in r.items() if k != "outputs"}
                                  for m, r in result["methods"].items()})
            tracking.log_json(result, "bench.json")
            return result, run.info.run_id

    # ---- the run ----

    def run(self) -> DemoResult:
        """Run (or skip) every stage in order and return what they made."""
        t0 = time.perf_counter()
        self.work.mkdir(parents=True, exist_ok=True)
        self._load_manifest()
        try:
            with _torch_threads(self.cfg.threads):
                pair = self.stage_pair()
                costs = self.stage_costs(pair)
                records = self.stage_collect(pair)
                trained = self.stage_train(costs, records)
                tuned = self.stage_tune(costs, records)
                champion = self.stage_register(costs, records, trained, tuned)
                bench = self.stage_bench(pair, champion)
        finally:
            self.close()
        return DemoResult(
            work_dir=self.work, stages=self.reports, bench=json.loads(Path(bench["path"]).read_text()),
            simulation=json.loads(Path(champion["simulation"]).read_text()), champion=champion,
            seconds=time.perf_counter() - t0, tracking_uri=self._tracking,
        )


# ---- the report -------------------------------------------------------------------------------------------


def simulation_table(simulation: dict) -> str:
    """The simulator's table (fixed depths, threshold, controller, oracles) of the champion, as text."""
    from radar.controller.simulate import PolicyResult, SimulationResult

    table = dict(simulation["table"])
    table.pop("best_fixed", None)
    policies = {name: PolicyResult(**p) for name, p in table.pop("policies").items()}
    return SimulationResult(policies=policies, **table).table()


def print_report(result: DemoResult) -> None:
    """Print the bench table, the simulated table, per-stage times and where to look in MLflow."""
    from rich.console import Console
    from rich.table import Table

    from radar.cli.app import _print_bench_table

    out = Console()
    cfg = result.bench["config"]
    _print_bench_table(result.bench, f"{cfg['prompts']} (first {cfg['prompt_count']}), {cfg['max_new_tokens']} new "
                                     f"tokens, T={cfg['temperature']:g}, {cfg['device']}")
    sim, champion = result.simulation, result.champion
    others = ", ".join(f"{n} {s:.3f}x" for n, s in sim["controller_speedups"].items())
    out.print(f"\nSimulated on the held-out prompts under the measured costs (controllers: {others}; champion: "
              f"{sim['champion']}; bench's tree depth: the best fixed depth, {sim['best_fixed_depth']})",
              highlight=False)
    out.print(simulation_table(sim), markup=False, highlight=False, soft_wrap=True)

    table = Table(title=f"demo pipeline, {result.seconds:.0f}s")
    for col in ("stage", "status", "seconds", "result"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for s in result.stages:
        status = "skipped (done)" if s.status == "skipped" else s.status
        table.add_row(s.name, status, "-" if s.status == "skipped" else f"{s.seconds:.1f}", s.summary)
    # Wide enough for the summaries when stdout is a file or a pipe (rich would squeeze to 80 columns there).
    Console(width=None if out.is_terminal else 130).print(table)
    out.print(f"outputs in {result.work_dir}/ (stages.json, costs.json, records/, controller/, tune/, champion/, "
              "simulate.json, bench.json)", highlight=False, soft_wrap=True)
    if result.tracking_uri is None:
        out.print("MLflow tracking was off (--no-track): nothing was logged or registered.")
        return
    out.print(
        f"MLflow: mlflow ui --backend-store-uri {result.tracking_uri}   (then http://127.0.0.1:5000)\n"
        f"  experiments radar-train (the trained controller), radar-tune (a run per trial), "
        f"radar-bench (this table)\n"
        f"  model radar-controller: version {champion['version']} is @champion "
        f"(models:/radar-controller@champion)",
        highlight=False, soft_wrap=True,
    )


def run_demo(cfg: DemoRunConfig, fresh: bool = False, log: Callable[[str], None] | None = None,
             report: bool = True) -> DemoResult:
    """Run the demo pipeline (skipping stages already done unless `fresh`), print the report, return the result."""
    result = DemoPipeline(cfg, fresh=fresh, log=log).run()
    if report:
        print_report(result)
    return result


__all__ = ["DemoPipeline", "DemoResult", "DemoRunConfig", "StageError", "StageReport", "STAGES", "print_report",
           "run_demo", "simulation_table"]
