"""The `radar` command line."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lossless speculative decoding with a learned draft controller.")
err = Console(stderr=True)

DEVICE_HELP = "auto (CUDA if present, else CPU), cpu or cuda[:N]"
DTYPE_HELP = "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16"
CONTROLLER_HELP = ("Controller for method radar: a directory from radar train, a reference .pt file or "
                   "models:/radar-controller@champion. Default: the controller trained for the demo pair.")


class UserError(Exception):
    """A mistake the user can fix; reported as one line, never as a traceback."""


@contextmanager
def user_errors():
    """Turn the errors a user can cause into a one-line message and exit code 2."""
    from radar.decoding.model import ModelLoadError

    try:
        yield
    except (UserError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _model_paths(model: Optional[Path], draft: Optional[Path]) -> tuple[Path, Optional[Path]]:
    if model is None:
        from radar.ops.demo_pair import ensure_demo_pair

        if draft is not None:
            raise UserError("--draft given without --model: name the target too")
        err.print("No --model given: using the demo pair (built on first use).")
        return ensure_demo_pair()
    return model, draft


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    model: Optional[Path] = typer.Option(None, help="Target checkpoint directory (HF format). Default: the demo target."),
    draft: Optional[Path] = typer.Option(None, help="Draft checkpoint directory sharing the target's tokenizer."),
    method: str = typer.Option("tree:4", help="ar, radar, chain:D or tree:D (D = draft calls per cycle)."),
    controller: Optional[str] = typer.Option(None, help=CONTROLLER_HELP),
    temperature: float = typer.Option(0.0, help="0 for greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(128, help="New tokens at most."),
    seed: int = typer.Option(0, help="Sampling seed."),
    tree_tokens: Optional[int] = typer.Option(None, help="Tree nodes verified per cycle (default 60 on GPU, 12 on CPU)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Generate text for one prompt with the target alone (ar) or speculatively."""
    from dataclasses import replace

    from radar.decoding.methods import Method
    from radar.decoding.pair import ModelPair
    from radar.decoding.verify import Sampling
    from radar.ops.models import attach_controller

    with user_errors():
        parsed = Method.parse(method)
        sampling = Sampling(temperature, top_p)
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if not prompt.strip():
            raise UserError("the prompt is empty")
        model, draft = _model_paths(model, draft)
        if parsed.kind != "ar" and draft is None:
            raise UserError(f"--method {method} needs --draft PATH (or use --method ar)")
        pair = ModelPair.load(model, draft, device=device, dtype=dtype)
        if parsed.kind == "radar":
            attach_controller(pair, controller)
        if tree_tokens is not None:
            pair.tree = replace(pair.tree, total_tokens=tree_tokens)
        ids = pair.encode(prompt)
        result = pair.generate(ids, parsed, sampling, max_new_tokens, seed)
    text = pair.decode(result.token_ids)
    if as_json:
        out = {"text": text, "token_ids": result.token_ids, "method": str(parsed), **result.stats.summary()}
        sys.stdout.write(json.dumps(out) + "\n")
        return
    sys.stdout.write(text + "\n")
    s = result.stats
    err.print(
        f"[dim]{s.new_tokens} tokens in {s.wall_s:.2f}s ({s.tokens_per_s:.1f} tok/s), tau {s.tau:.2f}, "
        f"{s.mean_draft_calls:.2f} draft calls/cycle, {s.target_calls} target calls, finish: {s.finish_reason}[/]"
    )


def _print_bench_table(result: dict, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("method", "tokens/s", "speedup vs ar", "tau", "draft calls/cycle", "wall s", "new tokens"):
        table.add_column(col, justify="left" if col == "method" else "right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for name, r in result["methods"].items():
        table.add_row(name, fmt(r["tokens_per_s"], ".1f"), fmt(r["speedup_vs_ar"], ".2f") + "x", fmt(r["tau"], ".2f"),
                      fmt(r["draft_calls_per_cycle"], ".2f"), fmt(r["wall_s"], ".2f"), str(r["new_tokens"]))
    Console().print(table)
    match = result.get("greedy_outputs_match_ar")
    if match is not None:
        bad = [m for m, ok in match.items() if not ok]
        Console().print("greedy outputs identical to ar: " + ("all methods" if not bad else f"NO for {', '.join(bad)}"))


def run_benchmark(cfg, out: Optional[Path], track: bool, title: str) -> dict:
    """Load the pair, run the benchmark with a progress bar, print the table, write JSON, log to MLflow."""
    from dataclasses import asdict, replace

    from rich.progress import Progress

    from radar.decoding.pair import ModelPair
    from radar.ops.bench import HF_METHODS, HFRunner, run_bench
    from radar.common.prompts import load_prompts

    prompts = load_prompts(cfg.prompts, cfg.limit)
    model, draft = _model_paths(Path(cfg.model) if cfg.model else None, Path(cfg.draft) if cfg.draft else None)
    cfg.model, cfg.draft = str(model), str(draft) if draft else None
    pair = ModelPair.load(model, draft, device=cfg.device, dtype=cfg.dtype)
    if "radar" in cfg.methods:
        from radar.ops.models import attach_controller

        attach_controller(pair, cfg.controller)
    if cfg.tree_tokens is not None:
        pair.tree = replace(pair.tree, total_tokens=cfg.tree_tokens)
    hf = HFRunner(cfg.model, cfg.draft, pair.target.device, pair.target.dtype) if set(cfg.methods) & set(HF_METHODS) else None
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task(f"benchmarking {len(prompts)} prompts", total=cfg.repeats * len(cfg.methods))
        result = run_bench(pair, prompts, cfg, hf, on_step=lambda m: progress.advance(task))
    _print_bench_table(result, title)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        err.print(f"results written to {out}")
    if track:
        from radar.common import tracking

        with tracking.run("radar-bench", params=asdict(cfg)):
            tracking.log_metrics({m: {k: v for k, v in r.items() if k != "outputs"} for m, r in result["methods"].items()})
            tracking.log_json(result, "bench.json")
        err.print(f"logged to MLflow at {tracking.tracking_uri()} (experiment radar-bench)")
    return result


@app.command()
def bench(
    prompts: str = typer.Option("mt_bench", help="A jsonl file, or a bundled set: mt_bench, gsm8k, alpaca, mbpp."),
    limit: Optional[int] = typer.Option(20, help="Use the first N prompts."),
    max_new_tokens: int = typer.Option(128, help="New tokens per prompt at most."),
    temperature: float = typer.Option(0.0, help="0 for greedy."),
    top_p: float = typer.Option(1.0),
    methods: str = typer.Option("ar,hf,hf-assisted,chain:4,tree:4", help="Comma-separated: ar, hf, hf-assisted, radar, chain:D, tree:D."),
    controller: Optional[str] = typer.Option(None, help=CONTROLLER_HELP),
    repeats: int = typer.Option(3, help="Timed repeats per method; the median is kept."),
    seed: int = typer.Option(0),
    model: Optional[Path] = typer.Option(None, help="Target checkpoint directory. Default: the demo target."),
    draft: Optional[Path] = typer.Option(None, help="Draft checkpoint directory. Default: the demo draft."),
    tree_tokens: Optional[int] = typer.Option(None, help="Tree nodes verified per cycle (default 60 on GPU, 12 on CPU)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    out: Optional[Path] = typer.Option(None, help="Write the results as JSON here."),
    track: bool = typer.Option(True, help="Log the run to MLflow."),
) -> None:
    """Benchmark decoding methods side by side on the same prompts, in one run."""
    from radar.ops.bench import BenchConfig

    with user_errors():
        cfg = BenchConfig(
            prompts=prompts, limit=limit, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            methods=[m.strip() for m in methods.split(",") if m.strip()], repeats=repeats, seed=seed,
            model=str(model) if model else None, draft=str(draft) if draft else None, device=device, dtype=dtype,
            tree_tokens=tree_tokens, controller=controller,
        )
        run_benchmark(cfg, out, track, title=f"{cfg.prompts}, {len(cfg.methods)} methods, T={temperature}")


@app.command("demo-models")
def demo_models(
    out: Optional[Path] = typer.Option(None, help="Where to put the pair. Default: ~/.cache/radar/demo (or $RADAR_HOME/demo)."),
    seed: int = typer.Option(0, help="Training seed: the same seed gives the same weights."),
) -> None:
    """Train the demo tokenizer, target and distilled draft (about 10 minutes on 2 CPU cores); a complete pair
    built with the same settings is reused (delete the directory to rebuild)."""
    from radar.ops.demo_pair import DemoConfig, ensure_demo_pair

    with user_errors():
        target, draft = ensure_demo_pair(DemoConfig(seed=seed), out)
    Console().print(f"target: {target}\ndraft:  {draft}")


@app.command()
def demo(
    work_dir: Path = typer.Option(Path("runs/demo"), help="Where every stage's output and stages.json go."),
    fresh: bool = typer.Option(False, "--fresh", help="Redo every stage (the cached demo pair is kept)."),
    model: Optional[Path] = typer.Option(None, help="Target checkpoint directory. Default: the demo target."),
    draft: Optional[Path] = typer.Option(None, help="Draft checkpoint directory. Default: the demo draft."),
    limit_per_set: int = typer.Option(40, help="Prompts collected from each of MT-bench and Alpaca."),
    workers: int = typer.Option(2, help="Ray actors collecting records."),
    epochs: int = typer.Option(40, help="Training epochs of the controller."),
    trials: int = typer.Option(4, help="Trials of the tuning sweep."),
    tune_epochs: int = typer.Option(10, help="Training epochs per trial at most."),
    bench_limit: int = typer.Option(20, help="MT-bench prompts to benchmark."),
    max_new_tokens: int = typer.Option(128, help="New tokens per prompt at most (collection and bench)."),
    repeats: int = typer.Option(2, help="Timed bench repeats per method; the median is kept."),
    device: str = typer.Option("cpu", help="cpu (the tree settings are the CPU ones) or cuda[:N]."),
    track: bool = typer.Option(True, help="Log to MLflow and register the champion controller."),
) -> None:
    """The whole pipeline on the demo pair: build (or reuse) it, measure its costs, collect records on Ray actors,
    train a controller, run a small tuning sweep, register the better controller as the champion, and benchmark
    ar, hf, hf-assisted, the best fixed tree and radar. Every stage skips work already done (WORK_DIR/stages.json);
    after a failure, the same command resumes from the failed stage."""
    import traceback

    from rich.markup import escape

    from radar.decoding.model import ModelLoadError
    from radar.demo.pipeline import DemoRunConfig, StageError, run_demo

    with user_errors():
        cfg = DemoRunConfig(work_dir=str(work_dir), model=str(model) if model else None,
                            draft=str(draft) if draft else None, limit_per_set=limit_per_set, workers=workers,
                            epochs=epochs, trials=trials, tune_epochs=tune_epochs, bench_limit=bench_limit,
                            max_new_tokens=max_new_tokens, repeats=repeats, device=device, track=track)
    try:
        result = run_demo(cfg, fresh=fresh, log=lambda line: err.print(line, markup=False, highlight=False,
                                                                       soft_wrap=True))
    except StageError as exc:
        if not isinstance(exc.cause, (UserError, ModelLoadError, ValueError, FileNotFoundError)):
            traceback.print_exception(exc.cause, file=sys.stderr)  # not the user's mistake: keep the trace
        err.print(f"[bold red]error:[/] {escape(str(exc))}; the stages before it are kept in {escape(str(work_dir))}: "
                  "fix the cause and run the same command again to resume from there", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    err.print(f"demo finished in {result.seconds:.0f}s")


# ------------------------------------------------------------------------------------------- the controller


@app.command()
def profile(
    model: Optional[Path] = typer.Option(None, help="Target checkpoint directory. Default: the demo target."),
    draft: Optional[Path] = typer.Option(None, help="Draft checkpoint directory. Default: the demo draft."),
    out: Path = typer.Option(Path("costs.json"), help="Where to write the cost file."),
    t_max: int = typer.Option(8, help="Draft calls per cycle at most."),
    k: int = typer.Option(10, help="Tree branching."),
    tree_tokens: Optional[int] = typer.Option(None, help="Tree nodes verified per cycle (default 60 on GPU, 12 on CPU)."),
    repeats: int = typer.Option(20),
    controller: Optional[Path] = typer.Option(None, help="Controller whose decisions T_eye times (default: an "
                                              "untrained one of the reference size)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
) -> None:
    """Measure the cost constants T_0, T_f, T_eye and the AR step on this hardware; write a cost file."""
    from radar.controller.policy import load_controller
    from radar.controller.profile import profile_costs
    from radar.decoding.pair import ModelPair

    with user_errors():
        model, draft = _model_paths(model, draft)
        pair = ModelPair.load(model, draft, device=device, dtype=dtype)
        ctrl = load_controller(controller, pair.target.device) if controller else None
        cost = profile_costs(pair, t_max=t_max, k=k, total_tokens=tree_tokens, repeats=repeats, out=out,
                             target_name=str(model), draft_name=str(draft), controller=ctrl)
    Console().print(f"T_0 {cost.T_0 * 1e3:.2f} ms, T_f {cost.T_f * 1e3:.2f} ms, T_eye {cost.T_eye * 1e3:.3f} ms, "
                    f"AR step {cost.ar_step * 1e3:.2f} ms -> {out}")


@app.command()
def collect(
    prompts: str = typer.Option(..., help="A jsonl file, or a bundled set: mt_bench, gsm8k, alpaca, mbpp."),
    out: Path = typer.Option(..., help="Directory for the Parquet shards and their manifest (a rerun resumes it)."),
    model: Optional[Path] = typer.Option(None, help="Target checkpoint directory. Default: the demo target."),
    draft: Optional[Path] = typer.Option(None, help="Draft checkpoint directory. Default: the demo draft."),
    limit: Optional[int] = typer.Option(None, help="Use the first N prompts."),
    t_max: int = typer.Option(8), k: int = typer.Option(10),
    tree_tokens: Optional[int] = typer.Option(None, help="Tree nodes verified per cycle (default 60 on GPU, 12 on CPU)."),
    temperature: float = typer.Option(0.0), max_new_tokens: int = typer.Option(128), seed: int = typer.Option(0),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    workers: Optional[int] = typer.Option(None, help="Ray actors, each with one target+draft pair (one GPU each on a "
                                          "GPU cluster). Default: this process alone, or one per GPU on a cluster."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (host:6379 or ray://host:10001). Default: "
                                          "$RAY_ADDRESS (set by `ray job submit`), else a local Ray for --workers."),
    shard_size: int = typer.Option(8, help="Prompts per shard (the unit of work, of resume and of one file)."),
) -> None:
    """Collect acceptance-length records (one per decoding cycle) for controller training, in fixed prompt shards;
    a rerun into the same --out skips the finished shards."""
    import os

    from radar.cluster.collect import CollectConfig, CollectError, collect_dataset, connect
    from radar.common.prompts import load_prompts

    with user_errors():
        items = load_prompts(prompts, limit)
        model, draft = _model_paths(model, draft)
        if draft is None:
            raise UserError("collecting records needs a draft model (--draft PATH)")
        config = CollectConfig(model=str(model), draft=str(draft), prompts=prompts, t_max=t_max, k=k,
                               total_tokens=tree_tokens, temperature=temperature, max_new_tokens=max_new_tokens,
                               seed=seed, device=device, dtype=dtype, shard_size=shard_size)
        config.check()
        if workers is not None and workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        use_ray = workers is not None or address is not None or bool(os.environ.get("RAY_ADDRESS"))
        started = connect(address) if use_ray else False
        try:
            summary = collect_dataset(items, out, config, workers=workers, local=not use_ray)
        except CollectError as exc:
            raise UserError(str(exc)) from None
        finally:
            if started:
                import ray

                ray.shutdown()
    done = f"{summary.shards_run} shard(s) collected" + (f", {summary.shards_skipped} already done"
                                                       if summary.shards_skipped else "")
    Console().print(f"{summary.records} records from {len(items)} prompts ({done}) -> {out}")


@app.command()
def train(
    data: Path = typer.Option(..., help="Record file or directory written by radar collect."),
    out: Path = typer.Option(..., help="Directory for the trained controller."),
    costs: str = typer.Option("llama3.1-8b", help="Cost file from radar profile, or a preset name."),
    alpha: float = typer.Option(0.02), gamma: float = typer.Option(0.99), lr: float = typer.Option(1e-4),
    epochs: int = typer.Option(100), batch_size: int = typer.Option(64),
    variant: str = typer.Option("improved", help="reinforce (paper-exact) or improved (expected reward + group baseline)."),
    hidden_size: int = typer.Option(128), dropout: float = typer.Option(0.1), seed: int = typer.Option(0),
    eval_fraction: float = typer.Option(0.2, help="Share of prompts held out for the per-epoch simulated speedup."),
    track: bool = typer.Option(True, help="Log params, per-epoch metrics and the controller to MLflow "
                                          "(experiment radar-train)."),
) -> None:
    """Train the RADAR controller with REINFORCE on collected records."""
    from contextlib import nullcontext
    from dataclasses import asdict

    from radar.controller.dataset import read_records, train_test_split
    from radar.controller.mdp import CostModel
    from radar.controller.policy import ControllerConfig
    from radar.controller.train import TrainConfig, train as train_controller
    from radar.common import tracking

    with user_errors():
        records = read_records(data)
        fit, held = train_test_split(records, eval_fraction, seed=seed)
        cfg = TrainConfig(alpha=alpha, gamma=gamma, lr=lr, epochs=epochs, batch_size=batch_size, variant=variant,
                          seed=seed, cost=CostModel.resolve(costs))
        ctrl_cfg = ControllerConfig(input_size=records.k, hidden_size=hidden_size, dropout=dropout)
        params = {"train": cfg.to_dict(), "controller": asdict(ctrl_cfg), "records": str(data), "n_train": len(fit),
                  "n_eval": len(held)}
        # The run opens before training so an unreachable tracking server fails fast, not after the epochs.
        with tracking.run("radar-train", params=params) if track else nullcontext():
            on_epoch = (lambda m, _: tracking.log_metrics(m, step=int(m["epoch"]))) if track else None
            controller, history = train_controller(fit, cfg, ctrl_cfg, on_epoch=on_epoch,
                                                   eval_records=held if len(held) else None)
            controller.save(out, meta={"train": cfg.to_dict(), "records": str(data), "history": history.epochs[-1:]})
            if track:
                tracking.log_dir(out, tracking.CONTROLLER_ARTIFACT)
    Console().print(f"controller trained on {len(fit)} records -> {out}")
    if track:
        err.print(f"logged to MLflow at {tracking.tracking_uri()} (experiment radar-train)")


@app.command()
def simulate(
    data: Path = typer.Option(..., help="Held-out records to evaluate on."),
    costs: str = typer.Option("llama3.1-8b", help="Cost file from radar profile, or a preset name."),
    controller: Optional[Path] = typer.Option(None, help="A trained controller directory (or reference .pt file)."),
    train_data: Optional[Path] = typer.Option(None, help="Records to tune the confidence threshold on."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Save the speedup/depth plot (PNG) here."),
    out: Optional[Path] = typer.Option(None, help="Write the table as JSON here."),
) -> None:
    """Expected speedup of fixed depths, the threshold rule, a controller and the oracles, offline."""
    from radar.controller.dataset import read_records
    from radar.controller.mdp import CostModel
    from radar.controller.policy import load_controller
    from radar.controller.simulate import plot, simulate as run_simulation

    with user_errors():
        result = run_simulation(
            read_records(data), CostModel.resolve(costs),
            controller=load_controller(controller) if controller else None,
            train_records=read_records(train_data) if train_data else None,
        )
    Console().print(result.table())
    if plot_path:
        plot(result, plot_path)
    if out:
        out.write_text(json.dumps(result.to_dict(), indent=1) + "\n")


# ------------------------------------------------------------------ the platform: tuning and the model registry


def _print_trials(rows: list[dict], best_trial: str | None) -> None:
    from rich.table import Table

    table = Table(title=f"{len(rows)} trials: expected speedup on held-out records, true costs")
    cols = ("trial", "alpha", "gamma", "lr", "hidden", "dropout", "variant", "T_0/T_f/T_eye x", "epochs", "best",
            "last", "best fixed")
    for col in cols:
        table.add_column(col, justify="left" if col in ("trial", "variant") else "right", no_wrap=True)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in sorted(rows, key=lambda r: -(r["best"] or 0.0)):
        name = r["trial"] + (" *" if r["trial"] == best_trial else "") + (" (error)" if r["status"] != "ok" else "")
        scales = "/".join(fmt(r[k], ".2f") for k in ("t0_scale", "tf_scale", "teye_scale"))
        table.add_row(name, fmt(r["alpha"], ".3g"), fmt(r["gamma"], ".3g"), fmt(r["lr"], ".2g"),
                      fmt(r["hidden_size"], "d"), fmt(r["dropout"], ".2f"), str(r["variant"] or "-"), scales,
                      str(r["epochs"]), fmt(r["best"], ".3f"), fmt(r["last"], ".3f"), fmt(r["best_fixed"], ".3f"))
    # Wide enough for every column when stdout is a file or a pipe (rich would squeeze to 80 columns there).
    console = Console()
    Console(width=None if console.is_terminal else 140).print(table)


@app.command()
def tune(
    data: Path = typer.Option(..., help="Record file or directory written by radar collect."),
    num_samples: int = typer.Option(20, help="Trials to sample (with --search grid: training seeds per grid point)."),
    search: str = typer.Option("optuna", help="optuna (Bayesian, TPE), random, or grid (a small fixed grid)."),
    space: str = typer.Option("full", help="full (the paper's ranges) or demo (tiny networks, for quick sweeps)."),
    costs: str = typer.Option("llama3.1-8b", help="The true cost file (radar profile) or a preset; trials search "
                                                 "scales around it, and are all scored with it."),
    epochs: int = typer.Option(100, help="Training epochs per trial at most (ASHA stops poor trials earlier)."),
    batch_size: int = typer.Option(64),
    report_every: int = typer.Option(1, help="Evaluate, report and checkpoint every N epochs."),
    eval_fraction: float = typer.Option(0.2, help="Share of prompts held out for the reported speedup."),
    seed: int = typer.Option(0),
    storage: Path = typer.Option(Path("runs/tune"), help="Where Tune keeps the experiment (results, checkpoints)."),
    name: str = typer.Option("radar-tune", help="Experiment name: the sweep lives in STORAGE/NAME."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep in STORAGE/NAME (unfinished trials run "
                                                        "again, finished ones are kept)."),
    cpus_per_trial: float = typer.Option(1.0, help="CPUs per trial; fractions pack several trials per core."),
    max_concurrent: int = typer.Option(0, help="Trials at once at most (0: as many as the CPUs allow)."),
    register: bool = typer.Option(True, help="Register the best trial's controller as "
                                             "models:/radar-controller@champion."),
    track: bool = typer.Option(True, help="Log every trial to MLflow (experiment radar-tune)."),
    verbose: int = typer.Option(1, help="Ray Tune's progress output: 0 none, 1 status updates, 2 every result."),
) -> None:
    """Sweep the controller's hyperparameters with Ray Tune (Optuna or random/grid search, ASHA early stopping),
    scoring each trial by its simulated held-out speedup; register the best controller in MLflow."""
    from radar.common import tracking
    from radar.cluster.tune.sweep import SweepConfig, best_result, register_best, run_sweep, trial_rows, unfinished

    with user_errors():
        if register and not track:
            raise UserError("--register needs MLflow: drop --no-track, or pass --no-register")
        cfg = SweepConfig(data=str(data), num_samples=num_samples, search=search, space=space, costs=costs,
                          epochs=epochs, batch_size=batch_size, report_every=report_every, eval_fraction=eval_fraction,
                          seed=seed, storage=str(storage), name=name, resume=resume, cpus_per_trial=cpus_per_trial,
                          max_concurrent=max_concurrent, track=track, verbose=verbose)
        results, restored = run_sweep(cfg)
        if restored:
            err.print(f"resumed the sweep in {cfg.experiment_dir} (its own search settings apply)")
        owed = unfinished(cfg, results, restored)
        if owed:
            # Interrupted (Ctrl-C): Tune saved its state; registering a half-run sweep's best would mislead.
            _print_trials(trial_rows(results), None)
            err.print(f"sweep interrupted with {owed} trial(s) unfinished; continue with: radar tune --data {data} "
                      f"--storage {storage} --name {name} --resume")
            raise typer.Exit(130)
        best = best_result(results)
        best_trial = str(best.metrics.get("trial_id"))
        _print_trials(trial_rows(results), best_trial)
        if results.num_errors:
            err.print(f"[yellow]{results.num_errors} trial(s) errored[/]; logs under {results.experiment_path}")
        params = {k: best.config.get(k) for k in ("alpha", "gamma", "lr", "hidden_size", "dropout", "variant",
                                                  "t0_scale", "tf_scale", "teye_scale")}
        Console().print(f"best trial {best_trial}: eval speedup {best.metrics_dataframe['eval_speedup'].max():.3f} "
                        f"with {json.dumps(params)}")
        if register:
            version, _ = register_best(results)
            Console().print(f"registered models:/{tracking.REGISTERED_MODEL} version {version} as "
                            f"@{tracking.CHAMPION} (tracking URI {tracking.tracking_uri()})")


# --------------------------------------------------------------------------------------------------- serving


def _wait_for_interrupt() -> None:
    """Block the foreground until Ctrl-C (a separate function so tests can skip the wait)."""
    import time

    while True:
        time.sleep(3600)


@app.command("serve")
def serve_command(
    port: Optional[int] = typer.Option(None, help="HTTP port. Default: 8000 (or the config file's)."),
    host: Optional[str] = typer.Option(None, help="Address to listen on. Default: 127.0.0.1 (0.0.0.0 exposes it)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with ServeConfig fields, or a Serve config "
                                          "file such as serve_config.yaml (its first application's args)."),
    model: Optional[Path] = typer.Option(None, help="Target checkpoint directory. Default: the demo target."),
    draft: Optional[Path] = typer.Option(None, help="Draft checkpoint directory. Default: the demo draft."),
    controller: Optional[str] = typer.Option(None, help=CONTROLLER_HELP),
    speculation: Optional[str] = typer.Option(None, help="Default per request: radar, tree:D or off."),
    api_key: Optional[str] = typer.Option(None, envvar="RADAR_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on every route but /health."),
    replicas: Optional[int] = typer.Option(None, help="Replicas, one model each. Default: 1."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Serve the decoder behind an OpenAI-compatible HTTP API (Ray Serve), in the foreground; Ctrl-C stops it."""
    from pydantic import ValidationError

    from radar.ops.models import BUNDLED_CONTROLLER, bundled_controller_available, controller_path, model_paths
    from radar.serve.app import ServeConfig, config_fields_from_file

    with user_errors():
        fields = config_fields_from_file(config) if config else {}
        flags = {"port": port, "host": host, "model": model, "draft": draft, "controller": controller,
                 "speculation": speculation, "api_key": api_key, "replicas": replicas, "device": device}
        fields.update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None})
        if fields.get("model") is None:
            err.print("No --model given: serving the demo pair (built on first use).")
            target, draft_dir = model_paths(None, fields.get("draft"))
            fields.update(model=str(target), draft=str(draft_dir), model_name=fields.get("model_name") or "radar-demo")
        for key in ("model", "draft"):
            if fields.get(key) and not Path(fields[key]).is_dir():
                raise UserError(f"--{key} {fields[key]}: no such checkpoint directory")
        if fields.get("controller"):
            # Resolved here: a typo fails now with one line, and a models:/ URI is downloaded once, not per replica.
            fields["controller"] = str(controller_path(fields["controller"]))
        elif not bundled_controller_available():
            err.print(f"[yellow]no --controller and no bundled controller at {BUNDLED_CONTROLLER}: speculation "
                      "'radar' is unavailable, the default becomes tree:4[/]")
        try:
            cfg = ServeConfig.model_validate(fields)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise UserError(f"serve config: {problems}") from None

    import signal

    import ray
    from ray import serve

    from radar.serve.app import run as run_app, startup_error

    def _stop(signum, frame):  # `kill` / a process manager stops it as cleanly as Ctrl-C
        raise KeyboardInterrupt

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs its own (logging) SIGTERM handler
    try:
        try:
            url = run_app(cfg)
        except RuntimeError as exc:  # a replica failed to start: say why in one line, the log has the rest
            reason = startup_error(cfg.app_name) or str(exc).strip().splitlines()[-1]
            err.print(f"[bold red]error:[/] the server failed to start: {reason} (full traceback in the Serve "
                      "replica log under /tmp/ray/session_latest/logs/serve/)", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        key_header = " -H 'Authorization: Bearer KEY'" if cfg.api_key else ""
        Console().print(
            f"RADAR serving [bold]{cfg.model_name or Path(cfg.model).name}[/] at {url} (Ctrl-C stops it)\n"
            f"  curl {url}/v1/completions{key_header} -H 'Content-Type: application/json' "
            f"-d '{{\"prompt\": \"Question: What is 2+2?\\nAnswer:\", \"max_tokens\": 32, \"temperature\": 0}}'",
            highlight=False, soft_wrap=True,
        )
        sys.stdout.flush()
        _wait_for_interrupt()
    except KeyboardInterrupt:
        err.print("stopping")
    finally:
        serve.shutdown()
        ray.shutdown()


from radar.cli.models_cmd import models_app  # noqa: E402

app.add_typer(models_app, name="models")


def main() -> None:  # pragma: no cover - console entry
    app()
