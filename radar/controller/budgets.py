"""The joint (draft calls, verification budget) table of a record set: what every (depth, budget) policy is
priced with.

A schema-2 record keeps its cycle's pool nodes with each node's acceptance probability p(v) (the target's
probability of v's token given its parent). With reach(v) = the product of p along v's path, the walk reaches v
with probability reach(v) and stops there with reach(v) - sum of reach over v's children in the tree. Summed by
depth, the law of the accepted length of any tree S closed under ancestors is

    d_S(l) = R_l - R_{l+1},   R_l = sum of reach(v) over the nodes of S at depth l (R_0 = 1, the root),

which is `radar.decoding.verify.acceptance_distribution` for that tree. The engine's tree after i calls with
budget b is the b best nodes by cumulative log-prob among those of depth <= i (`select_tree`); since a record holds
the union of those trees at its collection budget, every b up to that budget is exact, and larger ones are refused.
A tree after i calls of branching k holds min(b, k + k^2 (i - 1)) tokens, which is what its verification costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radar.controller.dataset import RecordSet
from radar.controller.mdp import CostModel, expected_accepted


def default_budgets(budget: int) -> list[int]:
    """A few budgets up to the collection budget, about 1.5-2x apart: the choices a budget head picks among."""
    if budget < 1:
        raise ValueError("records without a known collection budget (schema 1) hold one budget only; re-collect "
                         "them (radar collect) to choose budgets")
    return sorted({max(1, round(budget * f)) for f in (0.1, 0.2, 0.33, 0.5, 0.75, 1.0)})


def parse_budgets(text: str | None, budget: int) -> list[int] | None:
    """Budgets from a command line: None or "" (none), "auto" (`default_budgets` of the records' budget) or a
    comma-separated list of tree sizes."""
    if not text:
        return None
    if text.strip() == "auto":
        return default_budgets(budget)
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"budgets must be 'auto' or comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"budgets must be tree sizes >= 1, got {text!r}")
    return values


def tree_tokens(t_max: int, k: int, budgets: list[int]) -> torch.Tensor:
    """(t_max, len(budgets)) long: the tokens the engine verifies after i calls with budget b."""
    pool = k + k * k * torch.arange(t_max, dtype=torch.long)  # nodes after 1..t_max calls
    return torch.minimum(pool[:, None], torch.tensor(budgets, dtype=torch.long)[None, :])


def budget_dists(records: RecordSet, budgets: list[int]) -> torch.Tensor:
    """(N, t_max, len(budgets), t_max + 1) acceptance laws of every (calls, budget) tree, from the records' nodes."""
    if records.nodes is None:
        raise ValueError("these records (schema 1) keep no pool nodes, so only their own budget can be priced; "
                         "re-collect them with this radar (radar collect)")
    if max(budgets) > records.budget or min(budgets) < 1:
        raise ValueError(f"budgets must be in 1..{records.budget}, the tree tokens these records were collected "
                         f"with; got {budgets}")
    nodes = records.nodes.double()
    n, width, _ = nodes.shape
    t_max = records.t_max
    parent, depth, score, p = nodes[..., 0].long(), nodes[..., 1].long(), nodes[..., 2], nodes[..., 3]
    real = depth > 0
    # reach, with column 0 the root: parents precede children, so one pass per depth level fills it
    reach = torch.ones(n, width + 1, dtype=torch.float64)
    for level in range(1, t_max + 1):
        at = real & (depth == level)
        step = reach.gather(1, (parent + 1).clamp(min=0)) * p
        reach[:, 1:] = torch.where(at, step, reach[:, 1:])
    node_reach = reach[:, 1:] * real
    out = torch.zeros(n, t_max, len(budgets), t_max + 1, dtype=torch.float64)
    b = torch.tensor(budgets)
    for i in range(1, t_max + 1):
        allowed = real & (depth <= i)
        keyed = torch.where(allowed, score, torch.tensor(float("-inf"), dtype=torch.float64))
        order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(width).expand(n, width).contiguous())
        member = allowed[:, None, :] & (rank[:, None, :] < b[None, :, None])  # (N, B, width)
        levels = torch.zeros(n, len(budgets), t_max + 2, dtype=torch.float64)
        levels[..., 0] = 1.0
        levels.scatter_add_(2, depth[:, None, :].expand_as(member).clamp(max=t_max + 1),
                            node_reach[:, None, :] * member)
        out[:, i - 1] = (levels[..., :-1] - levels[..., 1:]).clamp_min(0)
    return out.float()


@dataclass
class JointTable:
    """Expected tokens per cycle (N, t_max, B) and seconds per cycle (t_max, B) of every (calls, budget) pair."""

    budgets: list[int]
    tokens: torch.Tensor  # E[l | i, b] + 1, float64
    time: torch.Tensor  # T_gen(i, b), float64
    charged_eye: bool

    def at(self, calls: torch.Tensor, budget_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, time) of each record's chosen (calls, budget index): (N,) each."""
        rows = torch.arange(self.tokens.shape[0])
        return self.tokens[rows, calls - 1, budget_index], self.time[calls - 1, budget_index]


def joint_table(records: RecordSet, cost: CostModel, budgets: list[int], controller: bool = False) -> JointTable:
    """The `JointTable` of `records` for `budgets`, priced by `cost`'s verification curve."""
    if records.t_max != cost.t_max:
        raise ValueError(f"records have t_max={records.t_max} but the cost model has t_max={cost.t_max}")
    tokens = expected_accepted(budget_dists(records, budgets).double()) + 1
    sizes = tree_tokens(records.t_max, records.k, budgets)
    calls = torch.arange(1, records.t_max + 1)[:, None].expand_as(sizes)
    return JointTable(list(budgets), tokens, cost.cycle_times(calls, sizes, controller), controller)




def depth_times(cost: CostModel, t_max: int, k: int, budget: int, controller: bool = False) -> torch.Tensor:
    """(t_max,) seconds of a cycle with 1..t_max calls at one budget (the records'): the verification priced at the
    tokens such a tree really holds, so one call's narrow tree costs less than a deep one's."""
    if cost.verify_tokens and budget < 1:
        budget = cost.budget or 0
        if budget < 1:
            raise ValueError("the cost model has a verification curve but neither it nor the records say which "
                             "tree budget depth-only policies verify")
    sizes = tree_tokens(t_max, k, [max(budget, 1)])[:, 0]
    return cost.cycle_times(torch.arange(1, t_max + 1), sizes, controller)


__all__ = ["default_budgets", "parse_budgets", "tree_tokens", "budget_dists", "JointTable", "joint_table",
           "depth_times"]
