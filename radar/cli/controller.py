"""The controller's commands: profile the costs, collect records, train, simulate, tune and register."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from radar.cli import options as opt
from radar.cli.decode import resolve_models
from radar.cli.errors import UserError, say, user_errors
from radar.common.files import write_atomic


def profile(
    model: opt.Model = None,
    draft: opt.Draft = None,
    out: Path = typer.Option(Path("costs.json"), help="Where to write the cost file."),
    t_max: int = typer.Option(8, help="Draft calls per cycle at most."),
    k: int = typer.Option(10, help="Tree branching."),
    tree_tokens: opt.TreeTokens = None,
    repeats: int = typer.Option(20),
    controller: Optional[Path] = typer.Option(None, help="Controller whose decisions T_eye times (default: an "
                                              "untrained one of the reference size)."),
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    temperature: float = typer.Option(0.0, help="Sampling temperature of the decoding loop T_c and the AR step are "
                                           "measured in: price records of this temperature with the file."),
) -> None:
    """Measure the verification curve, T_f, T_eye, the per-cycle cost beyond the forwards and the AR step (these
    two in the decoding loop) on this hardware; write a cost file."""
    from radar.ops.profile import ProfileConfig, profile as run_profile

    with user_errors():
        model, draft = resolve_models(model, draft)
        cost = run_profile(ProfileConfig(out=str(out), model=str(model), draft=opt.path_or_none(draft), t_max=t_max,
                                         k=k, tree_tokens=tree_tokens, repeats=repeats,
                                         controller=opt.path_or_none(controller), device=device, dtype=dtype,
                                         temperature=temperature))
    curve = ", ".join(f"{n}: {v * 1e3:.1f}" for n, v in zip(cost.verify_tokens, cost.verify_s))
    Console().print(f"T_0 {cost.T_0 * 1e3:.2f} ms, T_f {cost.T_f * 1e3:.2f} ms, T_eye {cost.T_eye * 1e3:.3f} ms, "
                    f"T_c {cost.T_c * 1e3:.2f} ms, AR step {cost.ar_step * 1e3:.2f} ms -> {out}\n"
                    f"verification, ms by tree tokens: {curve}")


def collect(
    prompts: opt.Prompts,
    out: Path = typer.Option(..., help="Directory for the Parquet shards and their manifest (a rerun resumes it)."),
    model: opt.Model = None,
    draft: opt.Draft = None,
    limit: Optional[int] = typer.Option(None, help="Use the first N prompts."),
    t_max: int = typer.Option(8), k: int = typer.Option(10),
    tree_tokens: opt.TreeTokens = None,
    temperature: float = typer.Option(0.0), max_new_tokens: int = typer.Option(128), seed: int = typer.Option(0),
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    workers: Optional[int] = typer.Option(None, help="Ray actors, each with one target+draft pair (one GPU each on a "
                                          "GPU cluster). Default: this process alone, or one per GPU on a cluster."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (host:6379 or ray://host:10001). Default: "
                                          "$RAY_ADDRESS (set by `ray job submit`), else a local Ray for --workers."),
    shard_size: int = typer.Option(8, help="Prompts per shard (the unit of work, of resume and of one file)."),
) -> None:
    """Collect acceptance-length records (one per decoding cycle) for controller training, in fixed prompt shards;
    a rerun into the same --out skips the finished shards."""
    from radar.cluster.shards import CollectConfig, CollectError
    from radar.common.prompts import load_prompts
    from radar.ops.collect import collect as run_collect

    with user_errors():
        items = load_prompts(prompts, limit)
        model, draft = resolve_models(model, draft)
        if draft is None:
            raise UserError("collecting records needs a draft model (--draft PATH)")
        config = CollectConfig(model=str(model), draft=str(draft), prompts=prompts, t_max=t_max, k=k,
                               total_tokens=tree_tokens, temperature=temperature, max_new_tokens=max_new_tokens,
                               seed=seed, device=device, dtype=dtype, shard_size=shard_size)
        try:
            summary = run_collect(items, out, config, workers=workers, address=address)
        except CollectError as exc:
            raise UserError(str(exc)) from None
    done = f"{summary.shards_run} shard(s) collected" + (f", {summary.shards_skipped} already done"
                                                       if summary.shards_skipped else "")
    Console().print(f"{summary.records} records from {len(items)} prompts ({done}) -> {out}")


def train(
    data: Path = typer.Option(..., help="Record file or directory written by radar collect."),
    out: Path = typer.Option(..., help="Directory for the trained controller."),
    costs: opt.Costs = "llama3.1-8b",
    alpha: float = typer.Option(0.02), gamma: float = typer.Option(0.99), lr: float = typer.Option(1e-4),
    epochs: int = typer.Option(100), batch_size: int = typer.Option(64),
    variant: str = typer.Option("improved", help="reinforce (paper-exact), improved (expected reward + group "
                                "baseline), ppo (clipped PPO steps on a throughput reward) or exact (the expected "
                                "throughput over every depth the records hold, no sampling)."),
    hidden_size: int = typer.Option(128), dropout: float = typer.Option(0.1), seed: int = typer.Option(0),
    budgets: Optional[str] = typer.Option(None, help="Give the controller a budget head choosing among these tree "
                                          "sizes (comma-separated, or 'auto' for a few up to the records' budget)."),
    init: str = typer.Option("random", help="random, or threshold: start from the threshold rule tuned on the "
                             "records (behaviour cloning), which keeps training off the one-depth trap."),
    eval_fraction: opt.EvalFraction = 0.2,
    track: bool = typer.Option(True, help="Log params, per-epoch metrics and the controller to MLflow "
                                          "(experiment radar-train)."),
) -> None:
    """Train the RADAR controller with REINFORCE on collected records."""
    from radar.common import tracking
    from radar.controller.mdp import CostModel
    from radar.controller.policy import ControllerConfig
    from radar.controller.train import TrainConfig
    from radar.ops.train import TrainJob, train_controller

    with user_errors():
        job = TrainJob(data=str(data), out=str(out), eval_fraction=eval_fraction, track=track,
                       train=TrainConfig(alpha=alpha, gamma=gamma, lr=lr, epochs=epochs, batch_size=batch_size,
                                         variant=variant, seed=seed, cost=CostModel.resolve(costs), init=init),
                       controller=ControllerConfig(hidden_size=hidden_size, dropout=dropout),
                       budgets=budgets)
        outcome = train_controller(job)
    Console().print(f"controller trained on {outcome.n_train} records -> {out}")
    if track:
        say(f"logged to MLflow at {tracking.tracking_uri()} (experiment {tracking.TRAIN_EXPERIMENT})")


def simulate(
    data: Path = typer.Option(..., help="Held-out records to evaluate on."),
    costs: opt.Costs = "llama3.1-8b",
    controller: Optional[Path] = typer.Option(None, help="A trained controller directory (or reference .pt file)."),
    train_data: Optional[Path] = typer.Option(None, help="Records to tune the confidence threshold on."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Save the speedup/depth plot (PNG) here."),
    out: Optional[Path] = typer.Option(None, help="Write the table as JSON here."),
    budgets: Optional[str] = typer.Option(None, help="Also price every (depth, budget) pair, the threshold rule "
                                          "with a tuned budget and the joint oracle: comma-separated tree sizes, or "
                                          "'auto' (needs records of schema 2)."),
    all_pairs: bool = typer.Option(False, help="Show every fixed (depth, budget) pair, not the best per depth."),
) -> None:
    """Expected speedup of fixed depths, the threshold rule, a controller and the oracles, offline."""
    from radar.controller.dataset import read_records
    from radar.controller.mdp import CostModel
    from radar.controller.policy import load_controller
    from radar.controller.plots import plot
    from radar.controller.simulate import simulate as run_simulation

    from radar.controller.budgets import parse_budgets

    with user_errors():
        records = read_records(data)
        result = run_simulation(
            records, CostModel.resolve(costs),
            controller=load_controller(controller) if controller else None,
            train_records=read_records(train_data) if train_data else None,
            budgets=parse_budgets(budgets, records.budget),
        )
    Console().print(result.table(all_pairs))
    if plot_path:
        plot(result, plot_path)
    if out:
        write_atomic(out, json.dumps(result.to_dict(), indent=1) + "\n")


def calibrate(
    data: Path = typer.Option(..., help="Records collected from the prompts below (radar collect)."),
    costs: str = typer.Option("measure", help="A cost file (radar profile), a preset, or 'measure' to profile the "
                              "pair right before the live run (a machine whose speed drifts prices both alike)."),
    prompts: opt.Prompts = "gsm8k",
    limit: Optional[int] = typer.Option(10, help="Use the first N prompts (those in the records)."),
    methods: str = typer.Option("tree:2,tree:4,radar", help="Comma-separated methods: tree:D, tree:D@B, "
                                "threshold:P, threshold:P@B or radar."),
    controller: opt.Controller = None,
    model: opt.Model = None,
    draft: opt.Draft = None,
    max_new_tokens: int = typer.Option(128),
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    out: Optional[Path] = typer.Option(None, help="Write the calibration as JSON here."),
) -> None:
    """Compare the simulator's predicted tokens/s of each method with a live run on the same prompts."""
    from radar.ops.bench import BenchConfig
    from radar.ops.calibrate import CalibrateConfig, calibrate as run_calibrate, table

    with user_errors():
        model, draft = resolve_models(model, draft)
        bench = BenchConfig(prompts=prompts, limit=limit, methods=methods.split(","), max_new_tokens=max_new_tokens,
                            controller=opt.path_or_none(controller), model=str(model), draft=opt.path_or_none(draft),
                            device=device, dtype=dtype)
        result = run_calibrate(CalibrateConfig(records=str(data), costs=str(costs), bench=bench,
                                               out=opt.path_or_none(out)))
    Console().print(table(result))
