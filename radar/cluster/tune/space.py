"""The controller's hyperparameter search space for Ray Tune (alpha, gamma, T_0, T_f, T_eye, lr,
hidden size, dropout, training variant) and the fixed settings every trial shares.

The cost constants are searched as scales around the given (true) cost file: a scale changes only the reward the
controller is trained on; the held-out speedup every trial reports is always priced with the true, unscaled costs,
so trials with different scales stay comparable.
"""

from __future__ import annotations

from typing import Any

from ray import tune

METRIC = "eval_speedup"  # simulated expected speedup of the greedy controller on held-out records, true costs
MODE = "max"
SEARCHES = ("optuna", "random", "grid")
SPACES = ("full", "demo")
SCALE_KEYS = ("t0_scale", "tf_scale", "teye_scale")


def search_space(space: str = "full") -> dict[str, Any]:
    """The searched hyperparameters as Tune domains: "full" (the paper's ranges, widened) or "demo" (small, for
    quick sweeps and tests: tiny networks and a learning rate that moves in a few epochs)."""
    if space == "full":
        return {
            "alpha": tune.loguniform(1e-3, 0.09),  # the reference grid spans 0.001-0.09
            "gamma": tune.uniform(0.95, 1.0),
            "lr": tune.loguniform(3e-5, 1e-3),
            "hidden_size": tune.choice([32, 64, 128, 256]),
            "dropout": tune.uniform(0.0, 0.3),
            "variant": tune.choice(["reinforce", "improved"]),
            "t0_scale": tune.loguniform(0.5, 2.0),
            "tf_scale": tune.loguniform(0.5, 2.0),
            "teye_scale": tune.loguniform(0.5, 2.0),
        }
    if space == "demo":
        return {
            "alpha": tune.loguniform(1e-3, 0.05),
            "gamma": tune.uniform(0.97, 1.0),
            "lr": tune.loguniform(1e-3, 1e-2),
            "hidden_size": tune.choice([8, 16]),
            "dropout": tune.choice([0.0, 0.1]),
            "variant": tune.choice(["reinforce", "improved"]),
            "t0_scale": tune.uniform(0.8, 1.25),
            "tf_scale": tune.uniform(0.8, 1.25),
            "teye_scale": tune.uniform(0.8, 1.25),
        }
    raise ValueError(f"unknown search space {space!r}; spaces: {', '.join(SPACES)}")


def grid_space(space: str = "full") -> dict[str, Any]:
    """A small exhaustive grid (the reference grid for "full": lr x dropout x gamma at the reference alpha, both
    variants); everything not in the grid is held at the reference value and the true costs."""
    if space == "full":
        grid = {"lr": [5e-5, 1e-4], "dropout": [0.1, 0.2], "gamma": [0.99, 0.98], "variant": ["reinforce", "improved"]}
        fixed = {"alpha": 0.02, "hidden_size": 128}
    elif space == "demo":
        grid = {"alpha": [0.005, 0.02], "variant": ["reinforce", "improved"]}
        fixed = {"gamma": 0.99, "lr": 5e-3, "hidden_size": 8, "dropout": 0.0}
    else:
        raise ValueError(f"unknown search space {space!r}; spaces: {', '.join(SPACES)}")
    return {**fixed, **{k: 1.0 for k in SCALE_KEYS}, **{k: tune.grid_search(v) for k, v in grid.items()}}


def param_space(
    data: str,
    cost: dict,
    epochs: int,
    space: str = "full",
    search: str = "optuna",
    batch_size: int = 64,
    eval_fraction: float = 0.2,
    seed: int = 0,
    report_every: int = 1,
    grid_seeds: int = 1,
) -> dict[str, Any]:
    """The Tune `param_space`: the searched hyperparameters (a grid for search="grid", run with `grid_seeds`
    training seeds) plus the fixed settings the trainable needs (absolute record path, the true cost file as a dict,
    epochs, the held-out split, which every trial shares so their speedups compare)."""
    if search not in SEARCHES:
        raise ValueError(f"unknown search algorithm {search!r}; choose one of {', '.join(SEARCHES)}")
    if epochs < 1 or report_every < 1 or grid_seeds < 1:
        raise ValueError("epochs, report_every and grid_seeds must be >= 1")
    searched = grid_space(space) if search == "grid" else search_space(space)
    if search == "grid" and grid_seeds > 1:
        # Repeats of a grid only differ by their training seed; Tune's num_samples would repeat identical trials.
        searched["seed"] = tune.grid_search(list(range(seed, seed + grid_seeds)))
    fixed = {"data": data, "cost": cost, "epochs": epochs, "batch_size": batch_size, "eval_fraction": eval_fraction,
             "split_seed": seed, "seed": seed, "report_every": report_every}
    return {**fixed, **searched}
