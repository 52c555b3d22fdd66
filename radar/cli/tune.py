"""`radar tune`: the Ray Tune sweep of the controller, its table, and the champion's registration."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from radar.cli import options as opt
from radar.cli.errors import UserError, say, user_errors


def print_trials(rows: list[dict], best_trial: str | None) -> None:
    """The trials table, wide enough for every column even when stdout is a file or a pipe."""
    from radar.ops.tables import trials_table

    console = Console()
    Console(width=None if console.is_terminal else 140).print(trials_table(rows, best_trial))


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
    eval_fraction: opt.EvalFraction = 0.2,
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
    from radar.cluster.tune.sweep import SweepConfig
    from radar.common import tracking
    from radar.ops.register import register_best_trial
    from radar.ops.sweep import sweep

    with user_errors():
        if register and not track:
            raise UserError("--register needs MLflow: drop --no-track, or pass --no-register")
        cfg = SweepConfig(data=str(data), num_samples=num_samples, search=search, space=space, costs=costs,
                          epochs=epochs, batch_size=batch_size, report_every=report_every, eval_fraction=eval_fraction,
                          seed=seed, storage=str(storage), name=name, resume=resume, cpus_per_trial=cpus_per_trial,
                          max_concurrent=max_concurrent, track=track, verbose=verbose)
        outcome = sweep(cfg)
        if outcome.restored:
            say(f"resumed the sweep in {cfg.experiment_dir} (its own search settings apply)")
        if outcome.unfinished:
            # Interrupted (Ctrl-C): Tune saved its state; registering a half-run sweep's best would mislead.
            print_trials(outcome.rows, None)
            say(f"sweep interrupted with {outcome.unfinished} trial(s) unfinished; continue with: radar tune --data "
                f"{data} --storage {storage} --name {name} --resume")
            raise typer.Exit(130)
        print_trials(outcome.rows, outcome.best_trial)
        if outcome.results.num_errors:
            say(f"[yellow]{outcome.results.num_errors} trial(s) errored[/]; logs under "
                f"{outcome.results.experiment_path}")
        Console().print(f"best trial {outcome.best_trial}: eval speedup {outcome.best_speedup:.3f} "
                        f"with {json.dumps(outcome.best_params)}")
        if register:
            version, _ = register_best_trial(outcome.results)
            Console().print(f"registered models:/{tracking.REGISTERED_MODEL} version {version} as "
                            f"@{tracking.CHAMPION} (tracking URI {tracking.tracking_uri()})")
