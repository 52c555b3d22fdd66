"""The rules without learning, written as controller networks: a fixed depth and a confidence threshold, each with
an optional fixed budget, as `LSTMController`s whose greedy decisions are exactly the rule's.

Why: when a trained controller loses to a rule on held-out records, the pipeline registers the rule instead, and
everything that loads a champion (bench, Serve, the registry) loads controllers. The constructions:

- threshold P: the head's first two units are relu(s_1 - log P) and relu(log P - s_1), s_1 the best frontier score
  (states are sorted descending); the continue-minus-stop logit is their difference, s_1 - log P, so the network
  continues exactly when the best path is at least P likely (ties aside, which have probability zero).
- fixed depth D: LSTM weights zero; input, forget and output gates saturated open (sigmoid(20) is 1.0 in float32)
  and the cell input tanh(b) = 0.1, so after t steps h_t = tanh(0.1 t), increasing in t. The head continues while
  h_t < tanh(0.1 (D - 0.5)), that is for t < D.
- a fixed budget: the budget head's weights zero and its bias largest at the chosen budget.
"""

from __future__ import annotations

import math

import torch

from radar.controller.policy import CONTINUE, STOP, ControllerConfig, LSTMController

_OPEN = 20.0  # sigmoid(20) rounds to 1.0 in float32
_STEP = 0.1


def _blank(k: int, budgets: list[int] | None, hidden: int) -> LSTMController:
    model = LSTMController(ControllerConfig(input_size=k, hidden_size=hidden, mlp_hidden=max(hidden, 2),
                                            dropout=0.0, budgets=list(budgets or [])))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model.eval()


def _head_on(model: LSTMController, column: int, cut: float) -> None:
    """Continue-minus-stop logit = cut - x[column], x = concat(h, s), through two ReLU units."""
    first, last = model.mlp[0], model.mlp[3]
    first.weight[0, column], first.bias[0] = -1.0, cut
    first.weight[1, column], first.bias[1] = 1.0, -cut
    last.weight[CONTINUE, 0], last.weight[CONTINUE, 1] = 1.0, -1.0
    last.weight[STOP].zero_()


def _fix_budget(model: LSTMController, budget: int | None) -> None:
    if not model.budgets:
        if budget is not None:
            raise ValueError("a fixed budget needs the list of budgets the head chooses among")
        return
    if budget not in model.budgets:
        raise ValueError(f"budget {budget} is not one of {model.budgets}")
    model.budget_head.bias[model.budgets.index(budget)] = 10.0


@torch.no_grad()
def threshold_controller(threshold: float, k: int, budgets: list[int] | None = None, budget: int | None = None,
                         hidden: int = 2) -> LSTMController:
    """A controller that decides exactly as `ThresholdPolicy(threshold)` (and verifies `budget` tokens)."""
    if threshold <= 0:  # never stops: as many calls as the tree allows
        return fixed_depth_controller(10**6, k, budgets, budget, hidden)
    model = _blank(k, budgets, hidden)
    # logit = s_1 - log P, i.e. cut - x with x = -s_1: flip the sign of the state's best score
    first, last = model.mlp[0], model.mlp[3]
    column, cut = hidden, -math.log(threshold)
    first.weight[0, column], first.bias[0] = 1.0, cut
    first.weight[1, column], first.bias[1] = -1.0, -cut
    last.weight[CONTINUE, 0], last.weight[CONTINUE, 1] = 1.0, -1.0
    _fix_budget(model, budget)
    return model


@torch.no_grad()
def fixed_depth_controller(depth: int, k: int, budgets: list[int] | None = None, budget: int | None = None,
                           hidden: int = 2) -> LSTMController:
    """A controller that makes exactly `depth` draft calls every cycle (and verifies `budget` tokens)."""
    if depth < 1:
        raise ValueError("depth must be >= 1")
    model = _blank(k, budgets, hidden)
    lstm, h = model.lstm, hidden
    lstm.bias_ih_l0[0:h] = _OPEN  # input gate
    lstm.bias_ih_l0[h:2 * h] = _OPEN  # forget gate
    lstm.bias_ih_l0[2 * h:3 * h] = math.atanh(_STEP)  # cell input: +0.1 per step
    lstm.bias_ih_l0[3 * h:] = _OPEN  # output gate
    _head_on(model, 0, math.tanh(_STEP * (depth - 0.5)))
    _fix_budget(model, budget)
    return model


__all__ = ["threshold_controller", "fixed_depth_controller"]
