"""`radar demo`: the whole pipeline on one model pair, resumable stage by stage (bookkeeping: radar.demo.stages).

    pair      SmolLM2-135M-Instruct, fetched once, and its bundled EAGLE-3 head (or the --model/--draft checkpoints)
    costs     the cost file measured on this machine           -> WORK/costs.json
    collect   records from MT-bench + Alpaca on Ray actors     -> WORK/records/
    train     one controller (MLflow experiment radar-train)   -> WORK/controller/
    tune      a small Ray Tune sweep (experiment radar-tune)   -> WORK/tune/, best trial in WORK/tuned/
    register  the better of the two by simulated held-out speedup, as models:/radar-controller@champion
                                                               -> WORK/champion/, WORK/simulate.json
    bench     ar, hf, hf-pld, tree:D (the best fixed depth), threshold:P (the tuned rule) and radar (radar-bench)
                                                               -> WORK/bench.json

Each stage calls the operation a user would run by hand (radar.ops). Outputs are written atomically, so a failed or
interrupted stage leaves the earlier ones intact; a stage rerun with the same inputs resumes where it can (the
collection keeps its finished shards and the sweep its finished trials).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from radar.decoding.tree import TreeConfig
from radar.demo.config import DemoRunConfig
from radar.demo.stages import (STAGES, StageError, StageLog, StageReport, content_digest, controller_digest,
                               records_digest, stat_digest, stderr_log)


@dataclass
class DemoResult:
    """What `run_demo` made: per-stage reports, the bench and simulation results, and the champion."""

    work_dir: Path
    stages: list[StageReport]
    bench: dict
    simulation: dict
    champion: dict
    seconds: float
    answers: list[dict] = field(default_factory=list)  # a few prompts with radar's answers, as text
    tracking_uri: str | None = None

    @property
    def skipped(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "skipped"]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleave(groups: list[list]) -> list:
    """a0, b0, a1, b1, ...: a prompt list whose held-out split and shards mix the sets."""
    out = []
    for i in range(max(map(len, groups))):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def tracking_store(track: bool) -> str | None:
    """Where a run logs, part of the inputs of every stage that logs (another store means running again)."""
    if not track:
        return None
    from radar.common.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # The default store is relative to the working directory: run elsewhere, it is another store.
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


class DemoPipeline:
    """Runs the stages in order, skipping those already done with the same inputs."""

    def __init__(self, cfg: DemoRunConfig, fresh: bool = False, log: Callable[[str], None] | None = None):
        self.cfg, self.work = cfg, cfg.work.expanduser()
        self.log = log or stderr_log
        self.stages = StageLog(self.work, fresh, self.log)
        self.store = tracking_store(cfg.track)
        self._pair = None  # the ModelPair, loaded once when a stage in this process needs it
        self._ray_started = False

    def model_pair(self, pair: dict):
        """The target+draft loaded in this process with the pipeline's tree (once per run)."""
        if self._pair is None:
            from radar.ops.models import load_pair

            self._pair = load_pair(pair["target"], pair["draft"], self.cfg.device, self.cfg.dtype, tree=self.tree)
        return self._pair

    def ensure_ray(self) -> None:
        """Connect to Ray once per run (see `radar.cluster.ray_session.ensure_ray`)."""
        from radar.cluster.ray_session import ensure_ray

        self._ray_started = ensure_ray(self.cfg.ray_cpus, self.log) or self._ray_started

    def close(self) -> None:
        """Shut down the Ray instance this run started (never one it found connected)."""
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    @functools.cached_property
    def precision(self) -> str:
        """The resolved precision: `auto` means another one on another CPU or for a checkpoint without its GGUF."""
        from radar.decoding.pair import resolve_device, resolve_precision
        from radar.ops.fetch import model_dir
        from radar.ops.models import DEFAULT_MODEL

        target = self.cfg.model or model_dir(DEFAULT_MODEL)
        return resolve_precision(self.cfg.dtype, resolve_device(self.cfg.device), target)

    @functools.cached_property
    def tree(self) -> TreeConfig:
        """The run's tree: the config's, else the default for the device and precision."""
        from radar.decoding.pair import default_tree, resolve_device

        return self.cfg.tree or default_tree(resolve_device(self.cfg.device), self.precision)

    def hardware_inputs(self) -> dict:
        """What a timing depends on besides the pair: the tree, the device, the precision and the threads."""
        cfg = self.cfg
        return {"tree": asdict(self.tree), "device": cfg.device, "precision": self.precision, "threads": cfg.threads}

    # ---- the stages ----

    def stage_pair(self) -> dict:
        """The checkpoints: always resolved (the default target's fetch is itself cached), reported as skipped when
        they are the ones the last run used."""
        t0, total = time.perf_counter(), len(STAGES)
        try:
            if self.cfg.model is None:
                from radar.ops.models import default_pair

                target, draft = default_pair()
            else:
                target, draft = Path(self.cfg.model), Path(self.cfg.draft)
                for role, p in (("--model", target), ("--draft", draft)):
                    if not p.is_dir():
                        raise FileNotFoundError(f"{role} {p}: no such checkpoint directory")
            outputs = {"target": str(target.resolve()), "draft": str(draft.resolve()),
                       "digest": stat_digest([target, draft])}
        except Exception as exc:
            self.log(f"[1/{total}] pair: FAILED: {type(exc).__name__}: {exc}")
            self.stages.reports.append(StageReport("pair", "failed", time.perf_counter() - t0, str(exc)))
            raise StageError("pair", exc) from exc
        entry = self.stages.manifest["stages"].get("pair")
        summary, seconds = f"{target} + {draft}", time.perf_counter() - t0
        if entry and entry.get("status") == "done" and entry.get("outputs") == outputs:
            self.log(f"[1/{total}] pair: skipped (done)")
            self.stages.reports.append(StageReport("pair", "skipped", 0.0, summary))
        else:
            from radar.demo.stages import inputs_key

            self.stages.record("pair", {"key": inputs_key(outputs), "inputs": {"model": self.cfg.model,
                               "draft": self.cfg.draft}, "status": "done", "seconds": round(seconds, 2),
                               "outputs": outputs})
            self.log(f"[1/{total}] pair: done in {seconds:.1f}s ({summary})")
            self.stages.reports.append(StageReport("pair", "done", seconds, summary))
        return outputs

    def stage_costs(self, pair: dict) -> dict:
        """T_0, T_f, T_eye and the AR step of this pair on this machine, with the pipeline's tree."""
        from radar.ops.profile import ProfileConfig, profile

        cfg, path = self.cfg, self.work / "costs.json"
        job = ProfileConfig(out=str(path), model=pair["target"], draft=pair["draft"], t_max=self.tree.max_calls,
                            k=self.tree.branching, tree_tokens=self.tree.total_tokens, repeats=cfg.profile_repeats,
                            temperature=cfg.temperature)  # T_c and the AR step are measured at the records'
        inputs = {"pair": pair["digest"], "repeats": cfg.profile_repeats, "temperature": cfg.temperature,
                  **self.hardware_inputs()}

        def body(resume: bool) -> dict:
            cost = profile(job, self.model_pair(pair))
            return {"path": str(path), "digest": content_digest([path]), "T_0": cost.T_0, "T_f": cost.T_f,
                    "T_eye": cost.T_eye, "ar_step": cost.ar_step}

        return self.stages.run(
            "costs", inputs, body, check=lambda o: content_digest([path]) == o["digest"],
            start=f"profiling (t_max {job.t_max}, k {job.k}, {job.tree_tokens} tree tokens, {cfg.threads} thread)",
            summary=lambda o: (f"T_0 {o['T_0'] * 1e3:.2f} ms, T_f {o['T_f'] * 1e3:.2f} ms, T_eye "
                               f"{o['T_eye'] * 1e3:.3f} ms, AR step {o['ar_step'] * 1e3:.2f} ms"),
        )

    def stage_collect(self, pair: dict) -> dict:
        """Records of every decoding cycle on the first `limit_per_set` prompts of each set, on Ray actors."""
        from radar.cluster.shards import CollectConfig

        cfg, plan, out = self.cfg, self.cfg.collect, self.work / "records"
        config = CollectConfig(model=pair["target"], draft=pair["draft"], prompts="+".join(plan.sets),
                               t_max=self.tree.max_calls, k=self.tree.branching, total_tokens=self.tree.total_tokens,
                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                               device=cfg.device, dtype=cfg.dtype, shard_size=plan.shard_size)
        # Not the worker count: the records do not depend on it, and a rerun with another one must resume, not redo.
        inputs = {"pair": pair["digest"], "sets": list(plan.sets), "limit_per_set": plan.limit_per_set,
                  **{k: v for k, v in config.to_dict().items() if k not in ("model", "draft", "prompts")}}

        def body(resume: bool) -> dict:
            from radar.common.prompts import Prompt, load_prompts
            from radar.ops.collect import collect

            # Ids prefixed with the set: sets may reuse ids, and the held-out split groups records by prompt id.
            groups = [[Prompt(f"{s}/{p.id}", p.text, p.source) for p in load_prompts(s, plan.limit_per_set)]
                      for s in plan.sets]
            self.ensure_ray()
            summary = collect(interleave(groups), out, config, workers=plan.workers,
                              cpus_per_worker=plan.cpus_per_worker)
            return {"path": str(out), "digest": records_digest(out), "records": summary.records,
                    "prompts": sum(map(len, groups)), "shards_run": summary.shards_run,
                    "shards_reused": summary.shards_skipped}

        workers = f"up to {plan.workers} Ray actors" if plan.workers > 1 else "1 Ray actor"  # one per shard at most
        return self.stages.run(
            "collect", inputs, body, check=lambda o: records_digest(out) == o["digest"],
            start=f"{plan.limit_per_set} prompts from each of {', '.join(plan.sets)} on {workers}",
            summary=lambda o: f"{o['records']} records from {o['prompts']} prompts",
            clean=lambda: shutil.rmtree(out, ignore_errors=True),  # another config: its shards are of no use
        )

    def stage_train(self, costs: dict, records: dict) -> dict:
        """One controller with the fixed settings, evaluated every epoch on the held-out prompts."""
        from radar.controller.mdp import CostModel
        from radar.ops.train import TrainJob, train_controller

        cfg, out = self.cfg, self.work / "controller"
        train_cfg = replace(cfg.train, seed=cfg.seed)
        inputs = {"records": records["digest"], "costs": costs["digest"], "eval_fraction": cfg.eval_fraction,
                  "train": {k: v for k, v in asdict(train_cfg).items() if k != "cost"}, "tracking": self.store,
                  "budgets": cfg.budgets}

        def body(resume: bool) -> dict:
            job = TrainJob(data=records["path"], out=str(out), train=replace(train_cfg, cost=CostModel.load(
                costs["path"])), eval_fraction=cfg.eval_fraction, track=cfg.track, run_name="demo",
                source="radar demo", budgets=cfg.budgets)
            o = train_controller(job)
            return {"path": str(out), "digest": controller_digest(out), "run_id": o.run_id,
                    "eval_speedup": o.eval_speedup, "n_train": o.n_train, "n_eval": o.n_eval}

        return self.stages.run(
            "train", inputs, body, check=lambda o: controller_digest(out) == o["digest"],
            start=f"{train_cfg.variant} REINFORCE ({train_cfg.reward} reward, {train_cfg.baseline} baseline), "
                  f"{train_cfg.epochs} epochs",
            summary=lambda o: f"held-out simulated speedup {o['eval_speedup']:.3f}x" if o.get("eval_speedup") else "",
        )

    def stage_tune(self, costs: dict, records: dict) -> dict:
        """A small Optuna + ASHA sweep; its best checkpoint is copied to WORK/tuned."""
        from radar.ops.register import best_trial_run, export_best_trial
        from radar.ops.sweep import sweep

        cfg, storage, out = self.cfg, self.work / "tune", self.work / "tuned"
        # resume: an earlier attempt's sweep is ours (`clean` removed any other)
        job = replace(cfg.tune, data=records["path"], costs=costs["path"], storage=str(storage), seed=cfg.seed,
                      eval_fraction=cfg.eval_fraction, track=cfg.track, resume=True)
        inputs = {"records": records["digest"], "costs": costs["digest"], "tracking": self.store,
                  "sweep": {k: v for k, v in asdict(job).items() if k not in ("data", "costs", "storage", "verbose")}}

        def body(resume: bool) -> dict:
            self.ensure_ray()
            outcome = sweep(job)
            if outcome.unfinished:
                raise RuntimeError(f"the sweep stopped with {outcome.unfinished} trial(s) unfinished (rerun to "
                                   "resume it)")
            _, trial_id = export_best_trial(outcome.results, out)
            return {"path": str(out), "digest": controller_digest(out), "experiment": str(job.experiment_dir),
                    "trial_id": trial_id, "run_id": best_trial_run(trial_id) if cfg.track else None,
                    "errors": outcome.results.num_errors, "trials": len(outcome.results),
                    "restored": outcome.restored, "eval_speedup": outcome.best_speedup}

        return self.stages.run(
            "tune", inputs, body, check=lambda o: controller_digest(out) == o["digest"],
            start=f"{job.num_samples} trials x {job.epochs} epochs ({job.search}, ASHA, space {job.space}), "
                  f"one at a time",
            summary=lambda o: f"best trial {o['trial_id']}: held-out simulated speedup {o['eval_speedup']:.3f}x",
            clean=lambda: shutil.rmtree(storage / job.name, ignore_errors=True),  # Tune refuses a taken name
        )

    def stage_register(self, costs: dict, records: dict, trained: dict, tuned: dict) -> dict:
        """Simulate both controllers on the held-out records; the better one becomes WORK/champion and, with MLflow,
        models:/radar-controller@champion."""
        from radar.demo.champion import choose_champion

        cfg, out, sim_path = self.cfg, self.work / "champion", self.work / "simulate.json"
        inputs = {"records": records["digest"], "costs": costs["digest"], "trained": trained["digest"],
                  "tuned": tuned["digest"], "eval_fraction": cfg.eval_fraction, "seed": cfg.seed,
                  "tracking": self.store}

        def body(resume: bool) -> dict:
            return choose_champion(records["path"], costs["path"], {"trained": trained, "tuned": tuned}, out,
                                   sim_path, cfg.eval_fraction, cfg.seed, cfg.track)

        def check(o: dict) -> bool:
            from radar.ops.register import champion_version

            if controller_digest(out) != o["digest"] or not sim_path.is_file():
                return False
            return not cfg.track or champion_version() == o["version"]

        return self.stages.run(
            "register", inputs, body, check,
            start="simulating both controllers on the held-out prompts",
            summary=_champion_summary,
        )

    def stage_bench(self, pair: dict, champion: dict) -> dict:
        """Real decoding, side by side: ar, hf, hf prompt lookup, the best fixed-depth tree, the tuned threshold rule
        and radar with the champion."""
        from radar.decoding.eagle3 import is_eagle3_dir
        from radar.ops.bench import benchmark, log_benchmark, progress_steps

        cfg, path = self.cfg, self.work / "bench.json"
        # transformers' assisted generation takes a small LM as draft, not an EAGLE-3 head; prompt lookup needs none
        hf = ["hf", "hf-pld"] if is_eagle3_dir(pair["draft"]) else ["hf", "hf-pld", "hf-assisted"]
        # the rules beside radar: the best fixed depth and pair, the tuned threshold, alone and with its budget
        rules = [f"tree:{champion['best_fixed_depth']}", champion.get("best_fixed_pair")]
        threshold, with_budget = champion.get("tuned_threshold"), champion.get("tuned_threshold_budget")
        rules += [f"threshold:{threshold:.3g}" if threshold is not None else None,
                  f"threshold:{with_budget[0]:.3g}@{with_budget[1]}" if with_budget else None]
        rules = list(dict.fromkeys(r for r in rules if r))
        job = replace(cfg.bench, methods=["ar", *hf, *rules, "radar"],
                      controller="models:/radar-controller@champion" if cfg.track else champion["path"],
                      model=pair["target"], draft=pair["draft"], device=cfg.device, dtype=cfg.dtype,
                      tree_tokens=self.tree.total_tokens, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, seed=cfg.seed)
        inputs = {"pair": pair["digest"], "champion": champion["digest"], "version": champion["version"],
                  "bench": {k: v for k, v in asdict(job).items() if k not in ("model", "draft")},
                  "tracking": self.store, **self.hardware_inputs()}

        def body(resume: bool) -> dict:
            from rich.console import Console
            from rich.progress import Progress

            with Progress(console=Console(stderr=True), transient=True) as progress:
                task = progress.add_task(f"benchmarking {job.prompts}", total=progress_steps(job))
                result = benchmark(job, path, pair=self.model_pair(pair), on_step=lambda m: progress.advance(task))
            run_id = log_benchmark(job, result, run_name="demo", tags={"source": "radar demo"}) if cfg.track else None
            return {"path": str(path), "digest": content_digest([path]), "run_id": run_id,
                    "radar_speedup": result["methods"]["radar"]["speedup_vs_ar"],
                    "answers": self.sample_answers(job, result["methods"]["radar"]["outputs"], pair)}

        return self.stages.run(
            "bench", inputs, body, check=lambda o: content_digest([path]) == o["digest"],
            start=f"{', '.join(job.methods)} on {job.prompts} (first {job.limit}), {job.repeats} repeat(s)",
            summary=lambda o: f"radar {o['radar_speedup']:.2f}x ar",
        )

    def sample_answers(self, job, outputs: list[list[int]], pair: dict, n: int = 3) -> list[dict]:
        """The first `n` bench prompts and radar's answers as text, so the report shows what the pair really says."""
        from radar.common.prompts import load_prompts

        model_pair = self.model_pair(pair)
        return [{"prompt": p.text, "answer": model_pair.decode(ids)}
                for p, ids in zip(load_prompts(job.prompts, job.limit)[:n], outputs)]

    # ---- the run ----

    def run(self) -> DemoResult:
        """Run (or skip) every stage in order and return what they made."""
        t0 = time.perf_counter()
        self.work.mkdir(parents=True, exist_ok=True)
        self.stages.load()
        try:
            with torch_threads(self.cfg.threads):
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
            work_dir=self.work, stages=self.stages.reports, bench=json.loads(Path(bench["path"]).read_text()),
            answers=bench.get("answers", []),
            simulation=json.loads(Path(champion["simulation"]).read_text()), champion=champion,
            seconds=time.perf_counter() - t0, tracking_uri=self.store,
        )


def run_demo(cfg: DemoRunConfig, fresh: bool = False, log: Callable[[str], None] | None = None,
             report: bool = True) -> DemoResult:
    """Run the demo pipeline (skipping stages already done unless `fresh`), print the report, return the result."""
    result = DemoPipeline(cfg, fresh=fresh, log=log).run()
    if report:
        from radar.demo.report import print_report

        print_report(result)
    return result


def _champion_summary(o: dict) -> str:
    """The register stage's one line: the champion, and when a rule won, what it beat."""
    if o.get("rule"):
        lost = ", ".join(f"{name} {v:.3f}x" for name, v in o["speedups"].items())
        text = (f"champion: the rule {o['rule']} ({o['champion_speedup']:.3f}x simulated), written as a controller: "
                f"the trained and tuned controllers lost to it ({lost})")
    else:
        text = f"champion: the {o['choice']} controller, {o['speedups'][o['choice']]:.3f}x simulated"
    if not o.get("drafts", True):
        text += " (slower than AR there, so radar runs the target alone)"
    return text + (f", models:/radar-controller version {o['version']}" if o["version"] else "")
