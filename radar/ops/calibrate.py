"""The `radar calibrate` operation: does the simulator predict live speed? Each method is priced twice on the same
prompts, once offline from the records and the cost file, once live by `radar bench`, and the gap is split in two:

    cost error        the cost file's price of the cycles that really ran (their draft calls and tree sizes)
                      against their measured seconds: is the cost model right about time?
    acceptance error  the records' expected tokens per cycle for the method's choices against the live tau: do
                      the records say what the engine accepts?

and the total is the simulator's predicted tokens/s against the live decoding tokens/s (cycles only; prefill is
outside both). The speedup error compares the two as speedups over AR, each side against its own AR (the cost
file's AR step, the bench's AR decode): on a machine whose speed moves between the profile and the bench it is
what stays comparable, and it is what a policy's choice (and `radar train`'s verdict) turns on. Records must come from the same prompts (their prompt ids), the tree the pair decodes with, and the
temperature of the bench.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import torch

from radar.common.files import write_atomic
from radar.common.prompts import load_prompts
from radar.controller.budgets import depth_times, joint_table
from radar.controller.dataset import RecordSet, read_records
from radar.controller.mdp import CostModel, expected_accepted
from radar.controller.policy import LSTMController
from radar.controller.simulate import controller_choices, controller_depths, threshold_depths
from radar.decoding.methods import Method
from radar.decoding.pair import precision_of
from radar.ops.bench import BenchConfig, run_bench
from radar.ops.models import attach_controller, controller_path, load_pair, model_paths


@dataclass
class CalibrateConfig:
    """The records and costs to price with, and the live run (`bench`: prompts, methods, models; its temperature and
    tree come from the records)."""

    records: str
    costs: str
    bench: BenchConfig = field(default_factory=lambda: BenchConfig(prompts="gsm8k", limit=10,
                                                                    methods=["tree:2", "tree:4", "radar"]))
    out: str | None = None
    profile_repeats: int = 20  # with costs="measure"


MEASURE = "measure"


def check_priceable(records: RecordSet, methods: list[Method]) -> None:
    """A one-line error for a method these records cannot price."""
    unpriced = [str(m) for m in methods if m.kind not in ("tree", "threshold", "radar")]
    if unpriced:
        raise ValueError(f"method(s) {', '.join(unpriced)} cannot be priced from tree records (tree:D, threshold:P "
                         "or radar)")
    for m in methods:
        if m.kind == "tree" and m.depth > records.t_max:
            raise ValueError(f"{m}: the records cover at most {records.t_max} draft calls")
        if m.budget is not None and m.budget != records.budget and (records.nodes is None or m.budget > records.budget):
            raise ValueError(f"{m}: these records price budgets up to {records.budget} tree tokens"
                             + ("" if records.nodes is not None else " (schema 1: their own budget only)"))


def predicted(records: RecordSet, cost: CostModel, method: Method, controller: LSTMController | None) -> dict:
    """The simulator's tokens per cycle, seconds per cycle and tokens/s of `method` on `records`."""
    n = len(records)
    if method.kind == "tree":
        depths, budget, charged = torch.full((n,), min(method.depth, records.t_max)), method.budget, False
    elif method.kind == "threshold":
        depths, budget, charged = threshold_depths(records.states, method.threshold), method.budget, False
    elif method.kind == "radar":
        if controller is None:
            raise ValueError("method radar needs a controller")
        charged = True
        if controller.budgets:
            depths, picks = controller_choices(controller, records.states)
            table = joint_table(records, cost, controller.budgets, controller=True)
            tok, time = table.at(depths, picks)
            return _summary(tok, time)
        depths, budget = controller_depths(controller, records.states), None
    else:
        raise ValueError(f"method {method} cannot be priced from tree records (tree:D, threshold:P or radar)")
    if budget is None or budget == records.budget:  # the records' own budget: their dists, any schema
        tokens = (expected_accepted(records.dists.double()) + 1)[torch.arange(n), depths - 1]
        return _summary(tokens, depth_times(cost, records.t_max, records.k, records.budget, charged)[depths - 1])
    table = joint_table(records, cost, [budget], controller=charged)
    tok, time = table.at(depths, torch.zeros(n, dtype=torch.long))
    return _summary(tok, time)


def _summary(tokens: torch.Tensor, time: torch.Tensor) -> dict:
    return {"tokens_per_cycle": float(tokens.mean()), "ms_per_cycle": 1000 * float(time.mean()),
            "tokens_per_s": float(tokens.sum() / time.sum())}


def live(result: dict, cost: CostModel, method: Method) -> dict:
    """Tokens/s of the cycles a bench ran, and the cost file's price of those very cycles."""
    cycles = result["cycles"]
    committed = torch.tensor(cycles["committed"], dtype=torch.float64)
    seconds = torch.tensor(cycles["seconds"], dtype=torch.float64)
    priced = cost.cycle_times(torch.tensor(cycles["draft_calls"]), torch.tensor(cycles["tree_tokens"]),
                              controller=method.kind == "radar")
    return {"tokens_per_cycle": float(committed.mean()), "ms_per_cycle": 1000 * float(seconds.mean()),
            "tokens_per_s": float(committed.sum() / seconds.sum()),
            "priced_ms_per_cycle": 1000 * float(priced.mean()), "cycles": len(cycles["seconds"])}


def calibrate(cfg: CalibrateConfig) -> dict:
    """Price every method offline and live on the records' prompts; the errors per method (module docstring).
    `cfg.costs == "measure"` profiles the pair right before the live run, in the same process: a machine whose speed
    drifts (a shared CPU) then prices both sides alike."""
    records = read_records(cfg.records)
    cost = None if cfg.costs == MEASURE else CostModel.resolve(cfg.costs)
    ids = set(records.meta["prompt_id"])
    run = cfg.bench
    prompts = [p for p in load_prompts(run.prompts, run.limit) if str(p.id) in ids]
    if not prompts:
        raise ValueError(f"none of the {run.prompts} prompts is in {cfg.records}; calibrate on the prompts the "
                         "records were collected from")
    records = records[records.meta["prompt_id"].isin([str(p.id) for p in prompts]).to_numpy()]
    temperatures = set(records.meta["temperature"])
    if len(temperatures) != 1:
        raise ValueError(f"records mix temperatures {sorted(temperatures)}; calibrate one temperature at a time")
    methods = [Method.parse(m) for m in run.methods if m != "ar"]
    check_priceable(records, methods)  # before minutes of live decoding, not after
    model, draft = model_paths(run.model, run.draft)
    pair = load_pair(model, draft, run.device, run.dtype, tree_tokens=records.budget or None)
    pair.tree = replace(pair.tree, branching=records.k, max_calls=records.t_max)
    controller = None
    if any(m.kind == "radar" for m in methods):
        # Calibration prices the controller's drafting cycles: radar drafts here even where its meta says not to.
        attach_controller(pair, run.controller, always_draft=True)
        controller = pair.stop_policy(0, _sampling(temperatures)).controller
    if cost is None:
        from radar.controller.profile import profile_costs

        cost = profile_costs(pair, t_max=records.t_max, k=records.k, total_tokens=records.budget or None,
                             repeats=cfg.profile_repeats, controller=controller,
                             temperature=next(iter(temperatures)))
    bench = run_bench(pair, prompts, replace(run, temperature=float(temperatures.pop()),
                                             tree_tokens=records.budget or None, max_calls=records.t_max))
    ar_live = bench["methods"]["ar"].get("cycle_tokens_per_s")
    rows = {}
    for m in methods:
        pred, got = predicted(records, cost, m, controller), live(bench["methods"][str(m)], cost, m)
        rows[str(m)] = {
            "predicted": pred, "live": got,
            "error": pred["tokens_per_s"] / got["tokens_per_s"] - 1,
            "cost_error": got["priced_ms_per_cycle"] / got["ms_per_cycle"] - 1,
            "acceptance_error": pred["tokens_per_cycle"] / got["tokens_per_cycle"] - 1,
            "residual_ms_per_cycle": got["ms_per_cycle"] - got["priced_ms_per_cycle"],
            "speedup_error": (pred["tokens_per_s"] * cost.ar_time) / (got["tokens_per_s"] / ar_live) - 1
            if ar_live else None,
        }
    out = {"config": asdict(cfg), "records": len(records), "prompts": len(prompts), "tree": asdict(pair.tree),
           "controller": str(controller_path(run.controller, precision_of(pair.target))) if controller else None,
           "methods": rows, "ar_tokens_per_s": bench["methods"]["ar"]["tokens_per_s"],
           "ar_decode_tokens_per_s": ar_live,
           "predicted_ar_tokens_per_s": 1 / cost.ar_time, "cost": cost.to_dict()}
    if cfg.out:
        write_atomic(cfg.out, json.dumps(out, indent=1) + "\n")
    return out


def _sampling(temperatures: set):
    from radar.decoding.verify import Sampling

    return Sampling(temperature=float(next(iter(temperatures))))


def table(result: dict) -> str:
    """The calibration as plain text, one row per method."""
    head = (f"{'method':<16} {'pred tok/s':>10} {'live tok/s':>10} {'error':>7} {'vs-AR err':>9} {'cost err':>8} "
            f"{'accept err':>10} {'residual ms/cycle':>17}")
    rows = [head, "-" * len(head)]
    for name, r in result["methods"].items():
        rows.append(f"{name:<16} {r['predicted']['tokens_per_s']:>10.2f} {r['live']['tokens_per_s']:>10.2f} "
                    f"{100 * r['error']:>+6.1f}% {_percent(r.get('speedup_error')):>9} {100 * r['cost_error']:>+7.1f}% "
                    f"{100 * r['acceptance_error']:>+9.1f}% "
                    f"{r['residual_ms_per_cycle']:>17.2f}")
    rows.append(f"{result['records']} records of {result['prompts']} prompts; live tok/s counts decoding cycles only "
                "(prefill excluded, as in the simulator)")
    decode = result.get("ar_decode_tokens_per_s")
    rows.append(f"ar: predicted {result['predicted_ar_tokens_per_s']:.2f} tok/s (1 / the AR step), live "
                + (f"{decode:.2f} decoding only, " if decode else "") + f"{result['ar_tokens_per_s']:.2f} prefill included")
    return "\n".join(rows)


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


__all__ = ["CalibrateConfig", "calibrate", "predicted", "live", "table"]
