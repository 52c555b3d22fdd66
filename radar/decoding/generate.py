"""The generate loops: plain autoregressive decoding (the baseline) and speculative decoding with a draft tree.

Both run on the same model code, so the baseline is fair. Speculative cycle: the drafter builds a tree from the
tokens it has not seen yet; the target verifies root + tree in one forward; the accepted path plus one bonus token
is committed; both KV caches keep only that path. The target always holds every committed token but the newest
(the next root), whose logits come with the next verification.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from radar.decoding.drafters import Drafter
from radar.decoding.model import KVCache, LayerCapture, Transformer
from radar.decoding.tree import DraftTree, StopPolicy, TreeConfig, build_tree
from radar.decoding.verify import Sampling, next_token, walk


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    accept_lengths: list[int] = field(default_factory=list)  # tau per cycle: accepted drafts + bonus
    draft_calls_per_cycle: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    finish_reason: str = "length"  # "length", "eos", "context", or "stop" (the on_commit callback asked to stop)

    @property
    def tau(self) -> float:
        """Mean tokens committed per target call (1.0 for autoregressive decoding)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 1.0

    @property
    def mean_draft_calls(self) -> float:
        return sum(self.draft_calls_per_cycle) / max(len(self.draft_calls_per_cycle), 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict:
        """Flat statistics for JSON output."""
        out = asdict(self)
        out.update(tau=self.tau, mean_draft_calls=self.mean_draft_calls, tokens_per_s=self.tokens_per_s)
        return out


@dataclass
class GenerationResult:
    token_ids: list[int]  # new tokens only
    stats: GenerationStats


def _finish(tokens: list[int], new: list[int], eos: set[int], budget: int) -> str | None:
    """Append `new` to `tokens` up to the first EOS or the budget; return why generation ends, if it does."""
    for t in new:
        if len(tokens) == budget:
            return "length"
        tokens.append(t)
        if t in eos:
            return "eos"
    return "length" if len(tokens) == budget else None


# Called with the tokens each step commits, as soon as they are committed (streaming); returning False stops
# generation after them with finish_reason "stop" (a client went away, a stop string appeared).
OnCommit = Callable[[list[int]], "bool | None"]


def _notify(on_commit: OnCommit | None, out: list[int], n_new: int, reason: str | None) -> str | None:
    """Hand the newest `n_new` tokens to `on_commit`; the finish reason, "stop" if the callback asked for it."""
    if on_commit is None or n_new == 0:
        return reason
    keep_going = on_commit(out[len(out) - n_new :])
    return reason or (None if keep_going is not False else "stop")


def _budget(target: Transformer, prompt_len: int, max_new_tokens: int) -> tuple[int, str]:
    """New tokens allowed: the request, cut to what fits in the model's context."""
    room = target.config.max_position_embeddings - prompt_len
    if prompt_len < 1:
        raise ValueError("the prompt is empty")
    if room < 1:
        raise ValueError(
            f"prompt of {prompt_len} tokens does not fit the model's context of {target.config.max_position_embeddings}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return (max_new_tokens, "length") if max_new_tokens <= room else (room, "context")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_ar(
    target: Transformer,
    prompt_ids: list[int],
    sampling: Sampling = Sampling(),
    max_new_tokens: int = 128,
    generator: torch.Generator | None = None,
    on_commit: OnCommit | None = None,
) -> GenerationResult:
    """Plain autoregressive decoding: one target call per token."""
    budget, budget_reason = _budget(target, len(prompt_ids), max_new_tokens)
    eos = set(target.config.eos_token_id)
    stats, device = GenerationStats(prompt_tokens=len(prompt_ids)), target.device
    t0 = time.perf_counter()
    cache = target.new_cache(len(prompt_ids) + budget)
    logits = target(torch.tensor([prompt_ids], device=device), cache=cache, last_only=True)[0, -1]
    out: list[int] = []
    while True:
        stats.target_calls += 1
        reason = _finish(out, [next_token(logits, sampling, generator)], eos, budget)
        reason = _notify(on_commit, out, 1, reason)
        if reason:
            break
        logits = target(torch.tensor([[out[-1]]], device=device), cache=cache)[0, -1]
    _sync(device)
    stats.wall_s = time.perf_counter() - t0
    stats.new_tokens, stats.finish_reason = len(out), budget_reason if reason == "length" else reason
    return GenerationResult(out, stats)


def verify_tree(
    target: Transformer, cache: KVCache, pending: torch.Tensor, tree: DraftTree, root_pos: int,
    capture: LayerCapture | None = None,
) -> tuple[torch.Tensor, int]:
    """One verification forward: the target's pending tokens (causal, root last) then the tree's nodes (each sees
    its ancestors). Returns (logits (1 + N, V): row 0 after the root, row 1 + i after node i; the cache slot of
    node 0). `capture` receives the hidden states of the pending tokens then the nodes."""
    device = pending.device
    n_pend, n_tree = pending.numel(), len(tree)
    mask = torch.ones(n_pend + n_tree, n_pend + n_tree, dtype=torch.bool, device=device).tril()
    mask[n_pend:, n_pend:] = tree.ancestors
    positions = torch.cat((torch.arange(root_pos - n_pend + 1, root_pos + 1, device=device), root_pos + tree.depths))
    base = cache.length + n_pend  # slot of the first tree node
    logits = target(torch.cat((pending, tree.tokens))[None], positions[None], cache, mask, capture=capture)
    return logits[0, n_pend - 1 :], base


def commit_path(cache: KVCache, drafter: Drafter, tree: DraftTree, path: list[int], base: int) -> int:
    """Both caches keep only the accepted path (tree node indices, root-down); returns how many of those nodes the
    drafter had been fed (the rest of the committed tokens stay pending for it)."""
    cache.keep(base, [base + i for i in path])
    fed = [tree.draft_slots[i] for i in path if tree.draft_slots[i] >= 0]
    drafter.keep(tree.draft_base, fed)
    return len(fed)


def prefill_features(
    target: Transformer, cache: KVCache, drafter: Drafter, capture: LayerCapture, prompt: torch.Tensor
) -> torch.Tensor:
    """For a drafter that reads the target's features: prefill all prompt tokens but the newest and hand the drafter
    their features (it feeds each token with its predecessor's). Returns what the target has still to see."""
    if prompt.numel() == 1:
        return prompt
    target(prompt[None, :-1], cache=cache, last_only=True, capture=capture)
    drafter.observe_target(capture.hidden[0])
    return prompt[-1:]


def committed_features(capture: LayerCapture, n_pending: int, path: list[int]) -> torch.Tensor:
    """The captured features of what a verification committed: the pending tokens, then the accepted nodes."""
    rows = torch.cat((torch.arange(n_pending), n_pending + torch.tensor(path, dtype=torch.long)))
    return capture.hidden[0, rows.to(capture.hidden.device)]


@torch.inference_mode()
def generate_speculative(
    target: Transformer,
    drafter: Drafter,
    prompt_ids: list[int],
    tree_cfg: TreeConfig,
    policy: StopPolicy,
    sampling: Sampling = Sampling(),
    max_new_tokens: int = 128,
    generator: torch.Generator | None = None,
    on_commit: OnCommit | None = None,
) -> GenerationResult:
    """Speculative decoding with a dynamic draft tree; `policy` decides how many draft calls each cycle makes."""
    budget, budget_reason = _budget(target, len(prompt_ids), max_new_tokens)
    eos = set(target.config.eos_token_id)
    stats, device = GenerationStats(prompt_tokens=len(prompt_ids)), target.device
    t0 = time.perf_counter()
    max_len = len(prompt_ids) + budget + tree_cfg.max_nodes + 1
    cache = target.new_cache(max_len)
    drafter.begin(max_len)
    target_pending = torch.tensor(prompt_ids, device=device)
    draft_pending = target_pending
    capture = LayerCapture(drafter.capture) if drafter.capture else None
    if capture is not None:
        target_pending = prefill_features(target, cache, drafter, capture, target_pending)
    out: list[int] = []
    while True:
        root_pos = len(prompt_ids) + len(out) - 1
        policy.reset()
        tree = build_tree(drafter, draft_pending, root_pos, tree_cfg, policy)

        logits, base = verify_tree(target, cache, target_pending, tree, root_pos, capture)
        path, bonus = walk(tree, logits, sampling, generator)
        n_fed = commit_path(cache, drafter, tree, path, base)
        if capture is not None:
            drafter.observe_target(committed_features(capture, target_pending.numel(), path))
        new = tree.tokens[path].tolist() + [bonus]
        stats.target_calls += 1
        stats.draft_calls += tree.draft_calls
        stats.accept_lengths.append(len(new))
        stats.draft_calls_per_cycle.append(tree.draft_calls)
        n_before = len(out)
        reason = _finish(out, new, eos, budget)
        reason = _notify(on_commit, out, len(out) - n_before, reason)
        if reason:
            break
        target_pending = torch.tensor([bonus], device=device)
        draft_pending = torch.tensor(new[n_fed:], device=device)
    _sync(device)
    stats.wall_s = time.perf_counter() - t0
    stats.new_tokens, stats.finish_reason = len(out), budget_reason if reason == "length" else reason
    return GenerationResult(out, stats)
