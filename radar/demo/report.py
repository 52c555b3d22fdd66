"""What `radar demo` prints at the end: the bench table, the simulator's table, the stages, where to look."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from radar.ops.tables import bench_table, greedy_match_line


def simulation_table(simulation: dict) -> str:
    """The simulator's table (fixed depths, threshold, controller, oracles) of the champion, as text."""
    from radar.controller.simulate import PolicyResult, SimulationResult

    table = dict(simulation["table"])
    table.pop("best_fixed", None)
    table.pop("best_fixed_pair", None)
    policies = {name: PolicyResult(**p) for name, p in table.pop("policies").items()}
    return SimulationResult(policies=policies, **table).table()


def stages_table(result) -> Table:
    """One row per stage: status, seconds and its summary."""
    table = Table(title=f"demo pipeline, {result.seconds:.0f}s")
    for col in ("stage", "status", "seconds", "result"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for s in result.stages:
        status = "skipped (done)" if s.status == "skipped" else s.status
        table.add_row(s.name, status, "-" if s.status == "skipped" else f"{s.seconds:.1f}", s.summary)
    return table


def print_report(result) -> None:
    """Print the bench table, a few answers, the simulated table, per-stage times and where to look in MLflow."""
    out = Console()
    cfg = result.bench["config"]
    out.print(bench_table(result.bench, f"{cfg['prompts']} (first {cfg['prompt_count']}), {cfg['max_new_tokens']} "
                                        f"new tokens, T={cfg['temperature']:g}, {cfg['device']}"))
    line = greedy_match_line(result.bench)
    if line:
        out.print(line)
    for a in result.answers:
        out.print(f"\n[bold]Q:[/] {escape(a['prompt'])}\n[bold]radar:[/] {escape(a['answer'].strip())}", soft_wrap=True)
    sim, champion = result.simulation, result.champion
    others = ", ".join(f"{n} {s:.3f}x" for n, s in sim["controller_speedups"].items())
    out.print(f"\nSimulated on the held-out prompts under the measured costs (controllers: {others}; champion: "
              f"{sim['champion']}; bench's tree depth: the best fixed depth, {sim['best_fixed_depth']})",
              highlight=False)
    out.print(simulation_table(sim), markup=False, highlight=False, soft_wrap=True)
    # Wide enough for the summaries when stdout is a file or a pipe (rich would squeeze to 80 columns there).
    Console(width=None if out.is_terminal else 130).print(stages_table(result))
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
