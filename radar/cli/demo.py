"""`radar demo`: the whole pipeline on the default pair (or the --model/--draft checkpoints)."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import typer
from rich.markup import escape

from radar.cli import options as opt
from radar.cli.errors import err, say, user_error_types, user_errors


def demo(
    work_dir: Path = typer.Option(Path("runs/demo"), help="Where every stage's output and stages.json go."),
    fresh: bool = typer.Option(False, "--fresh", help="Redo every stage (the fetched target is kept)."),
    model: opt.Model = None,
    draft: opt.Draft = None,
    limit_per_set: int = typer.Option(24, help="Prompts collected from each of MT-bench and Alpaca."),
    workers: int = typer.Option(2, help="Ray actors collecting records."),
    epochs: int = typer.Option(40, help="Training epochs of the controller."),
    trials: int = typer.Option(4, help="Trials of the tuning sweep."),
    tune_epochs: int = typer.Option(10, help="Training epochs per trial at most."),
    bench_limit: int = typer.Option(10, help="MT-bench prompts to benchmark."),
    max_new_tokens: int = typer.Option(128, help="New tokens per prompt at most (collection and bench)."),
    repeats: int = typer.Option(1, help="Timed bench repeats per method; the median is kept."),
    quick: bool = typer.Option(False, "--quick", help="A few minutes: 8 prompts a set, 64-token answers, 2 trials, "
                               "5 bench prompts (overrides the size options)."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N] (the tree follows the device and the precision)"),
    dtype: opt.Dtype = "auto",
    track: bool = typer.Option(True, help="Log to MLflow and register the champion controller."),
) -> None:
    """The whole pipeline on SmolLM2-135M-Instruct and its EAGLE-3 head: fetch the target, measure the costs,
    collect records on Ray actors, train a controller, run a small tuning sweep, register the better controller
    as the champion, and benchmark ar, hf, hf prompt lookup, the best fixed tree, the tuned threshold rule and radar. Every stage skips work already done (WORK_DIR/stages.json);
    after a failure, the same command resumes from the failed stage."""
    from radar.demo.config import DemoRunConfig
    from radar.demo.pipeline import run_demo
    from radar.demo.stages import StageError

    with user_errors():
        cfg = DemoRunConfig.from_options(
            work_dir=str(work_dir), model=opt.path_or_none(model), draft=opt.path_or_none(draft),
            limit_per_set=limit_per_set, workers=workers, epochs=epochs, trials=trials, tune_epochs=tune_epochs,
            bench_limit=bench_limit, max_new_tokens=max_new_tokens, repeats=repeats, quick=quick, device=device,
            dtype=dtype, track=track)
    try:
        result = run_demo(cfg, fresh=fresh, log=lambda line: err.print(line, markup=False, highlight=False,
                                                                       soft_wrap=True))
    except StageError as exc:
        if not isinstance(exc.cause, user_error_types()):
            traceback.print_exception(exc.cause, file=sys.stderr)  # not the user's mistake: keep the trace
        say(f"[bold red]error:[/] {escape(str(exc))}; the stages before it are kept in {escape(str(work_dir))}: "
            "fix the cause and run the same command again to resume from there")
        raise typer.Exit(1) from None
    say(f"demo finished in {result.seconds:.0f}s")
