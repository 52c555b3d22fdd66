"""Verification of a draft tree by the target: the one forward over root + tree, the lossless acceptance walk
(greedy and sampled), cache compaction to the accepted path, and the exact law of the accepted length.

Drafted candidates are deterministic (the drafter's top-k), so recursive rejection sampling at a node v reduces
to this: child x is accepted with probability p(x); on rejection x is removed from p and p renormalised; when no
child is accepted the bonus token comes from what is left of p. Accepting child x_j therefore has probability
exactly p(x_j), and the bonus token has probability p(y) for every y that is not a child. Drawing y ~ p once and
descending into the child whose token is y (or stopping with bonus y) has the same joint law, so that is what
`walk` does: it is literally sampling from the target, which is why the output distribution is the target's.
Greedy is the same walk with argmax in place of the draw.

A cycle is `verify_tree` (the target's logits for every node), `walk` (the accepted path and the bonus token),
then `commit_path` (both caches keep that path only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radar.decoding.drafters import Drafter
from radar.decoding.model import KVCache, LayerCapture, Transformer
from radar.decoding.tree import DraftTree


@dataclass(frozen=True)
class Sampling:
    """How the target picks tokens: temperature (0 = greedy) and top-p nucleus."""

    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True at temperature 0: every pick is the argmax."""
        return self.temperature == 0


def target_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution the target samples from: softmax(logits / T), restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p
        drop[..., 0] = False  # a top_p that float32 rounds to 0 (1e-300) still keeps the likeliest token
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Pick one token from a (V,) row of logits: argmax when greedy, else a draw from `target_probs`."""
    if sampling.greedy:
        return int(logits.argmax())
    return draw(target_probs(logits, sampling), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index from a (V,) distribution by inverting its cumulative sum with a single uniform draw."""
    # torch.multinomial draws one sample from a 49k vocabulary many times slower on a CPU than this does; float64
    # keeps the cumulative sum's rounding far below any probability a float32 softmax can express.
    cdf = probs.double().cumsum(0)
    if not 0 < float(cdf[-1]) < float("inf"):  # NaN or inf logits upstream: say so rather than pick a token
        raise ValueError(f"cannot sample from a distribution summing to {float(cdf[-1])}")
    u = torch.rand(1, dtype=torch.float64, device=probs.device, generator=generator) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True))  # right=True never lands on a zero-probability token
    if index == cdf.numel():  # u * total rounded up to the total itself
        index = int(probs.nonzero()[-1])
    return index


def verify_tree(
    target: Transformer, cache: KVCache, pending: torch.Tensor, tree: DraftTree, root_pos: int,
    capture: LayerCapture | None = None,
) -> tuple[torch.Tensor, int]:
    """One verification forward: the target's pending tokens (causal, root last) then the tree's nodes (each sees
    its ancestors). Returns (logits (1 + N, V): row 0 after the root, row 1 + i after node i; the cache slot of
    node 0). `capture` receives the hidden states of the pending tokens then the nodes."""
    device = pending.device
    n_pend, n_tree = pending.numel(), len(tree)
    if n_tree == 0 and n_pend == 1:  # the root alone (an undrafted cycle): an AR step, on the AR step's code path
        logits = target(pending[None], torch.tensor([[root_pos]], device=device), cache, capture=capture)
        return logits[0], cache.length
    mask = torch.ones(n_pend + n_tree, n_pend + n_tree, dtype=torch.bool, device=device).tril()
    mask[n_pend:, n_pend:] = tree.ancestors
    positions = torch.cat((torch.arange(root_pos - n_pend + 1, root_pos + 1, device=device), root_pos + tree.depths))
    base = cache.length + n_pend  # slot of the first tree node
    logits = target(torch.cat((pending, tree.tokens))[None], positions[None], cache, mask, capture=capture)
    return logits[0, n_pend - 1 :], base


def prefill(
    target: Transformer, cache: KVCache, prompt: torch.Tensor, capture: LayerCapture | None = None
) -> torch.Tensor:
    """Prefill every prompt token but the newest and return what the target has still to see (the newest).

    AR and speculative decoding both start here, so the prompt's keys and values come from the same matmul shapes
    in both: on a CPU a bf16 matmul's rows depend on how many rows it is given (beyond 32), and a prompt prefilled
    whole in one decoder and minus its last token in the other would drift apart. `capture` receives the features of
    the prefilled tokens (a drafter that reads them gets each token's with its predecessor's)."""
    if prompt.numel() > 1:
        target(prompt[None, :-1], cache=cache, last_only=True, capture=capture)
    elif capture is not None:
        capture.hidden = None
    return prompt[-1:]


def committed_features(capture: LayerCapture, n_pending: int, path: list[int]) -> torch.Tensor:
    """The captured features of what a verification committed: the pending tokens, then the accepted nodes."""
    if not path:
        return capture.hidden[0, :n_pending]
    rows = torch.cat((torch.arange(n_pending), n_pending + torch.tensor(path, dtype=torch.long)))
    return capture.hidden[0, rows.to(capture.hidden.device)]


def walk(
    tree: DraftTree, logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """Accept a path of the tree: returns (accepted node indices root-down, bonus token).

    `logits` (1 + N, V): row 0 is the target's prediction after the root, row 1 + i after node i.
    """
    children = tree.children()
    path, node = [], -1
    while True:
        y = next_token(logits[node + 1], sampling, generator)
        child = children[node].get(y)
        if child is None:
            return path, y
        path.append(child)
        node = child


def commit_path(cache: KVCache, drafter: Drafter, tree: DraftTree, path: list[int], base: int) -> int:
    """Both caches keep only the accepted path (tree node indices, root-down); returns how many of those nodes the
    drafter had been fed (the rest of the committed tokens stay pending for it)."""
    cache.keep(base, [base + i for i in path])
    fed = [tree.draft_slots[i] for i in path if tree.draft_slots[i] >= 0]
    drafter.keep(tree.draft_base, fed)
    return len(fed)


def acceptance_distribution(tree: DraftTree, probs: torch.Tensor) -> torch.Tensor:
    """Exact law of the number of accepted draft tokens (bonus excluded): a (max depth + 1,) vector summing to 1.

    `probs` (1 + N, V) are the target's distributions (one-hot rows give the greedy case). A node is reached
    with P_reach(parent) * p_parent(token), and the walk stops at v with P_reach(v) * (1 - sum of its children's p).
    """
    n = len(tree)
    parent_rows = tree.parents + 1  # row of each node's parent in `probs`
    p_token = probs[parent_rows, tree.tokens].double()
    reach = torch.ones(n + 1, dtype=torch.float64, device=probs.device)  # index 0 is the root
    for i in range(n):  # parents come before children, so one pass suffices
        reach[i + 1] = reach[parent_rows[i]] * p_token[i]
    child_mass = torch.zeros(n + 1, dtype=torch.float64, device=probs.device).index_add_(0, parent_rows, p_token)
    stop = reach * (1 - child_mass)
    depth = torch.cat((torch.zeros(1, dtype=torch.long, device=probs.device), tree.depths))
    dist = torch.zeros(int(depth.max()) + 1, dtype=torch.float64, device=probs.device).index_add_(0, depth, stop)
    return dist.clamp_min(0).float()
