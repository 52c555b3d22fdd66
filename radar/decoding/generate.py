"""The generate loops: plain autoregressive decoding (the baseline) and speculative decoding with a draft tree.

Both run on the same model code, so the baseline is fair. Speculative cycle: the drafter builds a tree from the
tokens it has not seen yet; the target verifies root + tree in one forward; the accepted path plus one bonus token
is committed; both KV caches keep only that path. The target always holds every committed token but the newest
(the next root), whose logits come with the next verification.
"""

from __future__ import annotations

import torch

from radar.decoding.drafters import Drafter
from radar.decoding.model import LayerCapture, Transformer
from radar.decoding.session import DecodeSession, GenerationResult, OnCommit
from radar.decoding.stop import StopPolicy
from radar.decoding.tree import TreeConfig, build_tree
from radar.decoding.verify import (Sampling, commit_path, committed_features, next_token, prefill_features, verify_tree,
                                   walk)


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
    session = DecodeSession(target, prompt_ids, max_new_tokens, on_commit)
    cache = target.new_cache(session.max_len)
    logits = target(torch.tensor([prompt_ids], device=target.device), cache=cache, last_only=True)[0, -1]
    while True:
        session.stats.target_calls += 1
        token = next_token(logits, sampling, generator)
        if not session.commit([token]):
            return session.result()
        logits = target(torch.tensor([[token]], device=target.device), cache=cache)[0, -1]


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
    session = DecodeSession(target, prompt_ids, max_new_tokens, on_commit)
    device = target.device
    max_len = session.max_len + tree_cfg.max_nodes + 1
    cache = target.new_cache(max_len)
    drafter.begin(max_len)
    target_pending = draft_pending = torch.tensor(prompt_ids, device=device)
    capture = LayerCapture(drafter.capture) if drafter.capture else None  # a drafter reading the target's layers
    if capture is not None:
        target_pending = prefill_features(target, cache, drafter, capture, target_pending)
    while True:
        root_pos = session.root_position
        policy.reset()
        tree = build_tree(drafter, draft_pending, root_pos, tree_cfg, policy)

        logits, base = verify_tree(target, cache, target_pending, tree, root_pos, capture)
        path, bonus = walk(tree, logits, sampling, generator)
        n_fed = commit_path(cache, drafter, tree, path, base)
        if capture is not None:
            drafter.observe_target(committed_features(capture, target_pending.numel(), path))
        new = tree.tokens[path].tolist() + [bonus]
        session.stats.count_cycle(len(new), tree.draft_calls)
        if not session.commit(new):
            return session.result()
        target_pending = torch.tensor([bonus], device=device)
        draft_pending = torch.tensor(new[n_fed:], device=device)
