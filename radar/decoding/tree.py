"""The EAGLE-2 style dynamic draft tree, built one draft call at a time, with a stop hook before each call.

Call 0 drafts the top-k children of the root (the last committed token). Every further call feeds the k
frontier nodes to the drafter, scores their top-k children by cumulative log-prob and keeps the k best of those
k*k candidates as the next frontier; all candidates stay in the pool. After the last call the pool is reranked
and the best `total_tokens` nodes form the tree the target verifies. Because a child's cumulative log-prob never
exceeds its parent's, the top of the ranking is closed under ancestors (ties go to the earlier, shallower node).

Before every call after the first, `policy.decide(calls_so_far, frontier_scores)` may end drafting: that is where
fixed depths, confidence thresholds and the RADAR controller plug in (`radar.decoding.stop`); a policy may also
choose the cycle's verification budget once drafting ends (`choose_budget`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from radar.decoding.drafters import Drafter
from radar.decoding.stop import StopPolicy


@dataclass
class TreeConfig:
    """Shape of one cycle's draft tree: branching, draft calls at most, nodes verified."""

    branching: int = 10  # k: children drafted per expanded node, and frontier width
    max_calls: int = 8  # t_max: draft calls per cycle at most (= deepest node)
    total_tokens: int = 60  # nodes the target verifies per cycle

    def __post_init__(self) -> None:
        if self.branching < 1 or self.max_calls < 1 or self.total_tokens < 1:
            raise ValueError("branching, max_calls and total_tokens must all be >= 1")

    @property
    def max_nodes(self) -> int:
        """Nodes a cycle can draft at most: k children of the root, then k*k per further call."""
        return self.branching + (self.max_calls - 1) * self.branching**2


@dataclass
class DraftTree:
    """Nodes in parent-before-child order; parent -1 is the root (the last committed token)."""

    tokens: torch.Tensor  # (N,) long
    parents: torch.Tensor  # (N,) long
    depths: torch.Tensor  # (N,) long, 1 for the root's children
    scores: torch.Tensor  # (N,) cumulative draft log-prob
    ancestors: torch.Tensor  # (N, N) bool: [i, j] when node j is node i or one of its ancestors
    draft_slots: list[int]  # the drafter's state slot holding each node, -1 if never fed to it
    draft_base: int  # the drafter's first tree slot: everything before it is committed prefix
    draft_calls: int

    def __len__(self) -> int:
        return self.tokens.numel()

    def children(self) -> dict[int, dict[int, int]]:
        """For the root (-1) and every node: {child token: child index}."""
        out: dict[int, dict[int, int]] = {-1: {}}
        for i, (p, t) in enumerate(zip(self.parents.tolist(), self.tokens.tolist())):
            out.setdefault(p, {})[t] = i
            out.setdefault(i, {})
        return out


@dataclass
class DraftPool:
    """Every node drafted in one cycle, before the rerank; `frontiers[i]` are the nodes fed by call i+1."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor
    ancestors: torch.Tensor
    draft_slots: torch.Tensor
    draft_base: int
    frontier_scores: list[torch.Tensor]  # the policy's view before each call after the first
    draft_calls: int


def draft_pool(
    drafter: Drafter,
    pending: torch.Tensor,
    root_position: int,
    cfg: TreeConfig,
    policy: StopPolicy,
) -> DraftPool:
    """Run the draft calls of one cycle; `pending` are committed tokens the drafter has not seen, root last."""
    k, device = cfg.branching, pending.device
    positions = torch.arange(root_position - pending.numel() + 1, root_position + 1, device=device)
    logp = drafter.forward(pending, positions, None)[-1]
    tree_base = drafter.length

    cap = cfg.max_nodes
    tokens = torch.empty(cap, dtype=torch.long, device=device)
    parents = torch.empty(cap, dtype=torch.long, device=device)
    depths = torch.empty(cap, dtype=torch.long, device=device)
    scores = torch.empty(cap, dtype=torch.float32, device=device)
    slots = torch.full((cap,), -1, dtype=torch.long, device=device)
    ancestors = torch.zeros(cap, cap, dtype=torch.bool, device=device)

    top = logp.topk(k)
    tokens[:k], parents[:k], depths[:k], scores[:k] = drafter.target_ids(top.indices), -1, 1, top.values
    ancestors[:k, :k] = torch.eye(k, dtype=torch.bool, device=device)
    n, frontier, fed = k, torch.arange(k, device=device), torch.empty(0, dtype=torch.long, device=device)
    seen, calls = [], 1

    while calls < cfg.max_calls:
        frontier_scores = scores[frontier]
        seen.append(frontier_scores)
        if not policy.decide(calls, frontier_scores):
            break
        mask = torch.cat((ancestors[frontier][:, fed], torch.eye(frontier.numel(), dtype=torch.bool, device=device)), 1)
        logp = drafter.forward(tokens[frontier], root_position + depths[frontier], mask)
        slots[frontier] = tree_base + fed.numel() + torch.arange(frontier.numel(), device=device)
        fed = torch.cat((fed, frontier))
        calls += 1

        child = logp.topk(k)  # (f, k)
        m = child.indices.numel()
        new = torch.arange(n, n + m, device=device)
        parent_of_new = frontier.repeat_interleave(k)
        tokens[new] = drafter.target_ids(child.indices).reshape(-1)
        parents[new] = parent_of_new
        depths[new] = calls
        scores[new] = (frontier_scores[:, None] + child.values).reshape(-1)
        ancestors[new] = ancestors[parent_of_new]
        ancestors[new, new] = True
        frontier = new[scores[new].topk(min(k, m)).indices]
        n += m

    return DraftPool(tokens[:n], parents[:n], depths[:n], scores[:n], ancestors[:n, :n], slots[:n], tree_base, seen, calls)


def select_tree(pool: DraftPool, total_tokens: int) -> DraftTree:
    """Rerank the pool by cumulative log-prob and keep the best `total_tokens` nodes as the tree to verify."""
    order = torch.sort(pool.scores, descending=True, stable=True).indices[:total_tokens]
    return induced_tree(pool, order.sort().values)  # pool order is parent-before-child, so keep it


def induced_tree(pool: DraftPool, keep: torch.Tensor) -> DraftTree:
    """The tree of the pool nodes `keep` (sorted, closed under ancestors), re-indexed from 0."""
    remap = torch.full((pool.tokens.numel() + 1,), -1, dtype=torch.long, device=keep.device)
    remap[keep] = torch.arange(keep.numel(), device=keep.device)
    parents = pool.parents[keep]
    parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
    return DraftTree(
        tokens=pool.tokens[keep],
        parents=parents,
        depths=pool.depths[keep],
        scores=pool.scores[keep],
        ancestors=pool.ancestors[keep][:, keep],
        draft_slots=pool.draft_slots[keep].tolist(),
        draft_base=pool.draft_base,
        draft_calls=pool.draft_calls,
    )


def build_tree(
    drafter: Drafter, pending: torch.Tensor, root_position: int, cfg: TreeConfig, policy: StopPolicy
) -> DraftTree:
    """Draft one cycle's tree: the pool of `draft_pool`, reranked to the verification budget, which a policy with
    a `choose_budget(calls, frontier_scores)` method picks per cycle (None keeps the configured one)."""
    pool = draft_pool(drafter, pending, root_position, cfg, policy)
    budget = cfg.total_tokens
    choose = getattr(policy, "choose_budget", None)
    if choose is not None:
        budget = choose(pool.draft_calls, pool.scores[pool.depths == pool.draft_calls]) or budget
    cap = getattr(policy, "cap_budget", None)  # a load-aware policy may verify fewer (radar.decoding.batching)
    if cap is not None:
        budget = cap(torch.sort(pool.scores, descending=True).values, budget)
    return select_tree(pool, budget)


def empty_tree(draft_base: int, device: torch.device) -> DraftTree:
    """A tree of no nodes: a cycle that verifies the root alone (one token, as autoregression does)."""
    none, scores, ancestors = _empty(torch.device(device))
    return DraftTree(none, none, none, scores, ancestors, [], draft_base, 0)


@functools.cache
def _empty(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Shared by every empty tree (nothing writes into a tree's tensors): an undrafted cycle allocates none.
    none = torch.empty(0, dtype=torch.long, device=device)
    return none, none.float(), torch.empty(0, 0, dtype=torch.bool, device=device)
