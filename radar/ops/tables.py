"""The tables a user reads: benchmark results and sweep trials, as Rich tables any entry point can print."""

from __future__ import annotations

from rich.table import Table


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def bench_table(result: dict, title: str) -> Table:
    """One row per method: tokens/s, speedup vs ar, tau, draft calls per cycle, wall time, new tokens."""
    table = Table(title=title)
    for col in ("method", "tokens/s", "speedup vs ar", "tau", "draft calls/cycle", "wall s", "new tokens"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, r in result["methods"].items():
        table.add_row(name, _fmt(r["tokens_per_s"], ".1f"), _fmt(r["speedup_vs_ar"], ".2f") + "x", _fmt(r["tau"], ".2f"),
                      _fmt(r["draft_calls_per_cycle"], ".2f"), _fmt(r["wall_s"], ".2f"), str(r["new_tokens"]))
    return table


def greedy_match_line(result: dict) -> str | None:
    """Whether every method's greedy output equals ar's (None for a sampled run)."""
    match = result.get("greedy_outputs_match_ar")
    if match is None:
        return None
    bad = [m for m, ok in match.items() if not ok]
    return "greedy outputs identical to ar: " + ("all methods" if not bad else f"NO for {', '.join(bad)}")


def trials_table(rows: list[dict], best_trial: str | None) -> Table:
    """One row per sweep trial, best first; the chosen one marked with *."""
    table = Table(title=f"{len(rows)} trials: expected speedup on held-out records, true costs")
    cols = ("trial", "alpha", "gamma", "lr", "hidden", "dropout", "variant", "T_0/T_f/T_eye x", "epochs", "best",
            "last", "best fixed")
    for col in cols:
        table.add_column(col, justify="left" if col in ("trial", "variant") else "right", no_wrap=True)
    for r in sorted(rows, key=lambda r: -(r["best"] or 0.0)):
        name = r["trial"] + (" *" if r["trial"] == best_trial else "") + (" (error)" if r["status"] != "ok" else "")
        scales = "/".join(_fmt(r[k], ".2f") for k in ("t0_scale", "tf_scale", "teye_scale"))
        table.add_row(name, _fmt(r["alpha"], ".3g"), _fmt(r["gamma"], ".3g"), _fmt(r["lr"], ".2g"),
                      _fmt(r["hidden_size"], "d"), _fmt(r["dropout"], ".2f"), str(r["variant"] or "-"), scales,
                      str(r["epochs"]), _fmt(r["best"], ".3f"), _fmt(r["last"], ".3f"), _fmt(r["best_fixed"], ".3f"))
    return table
