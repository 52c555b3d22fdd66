"""The generate loops: plain autoregressive decoding (the baseline) and speculative decoding with a draft tree.

Both run on the same model code, so the baseline is fair. Speculative cycle: the drafter builds a tree from the
tokens it has not seen yet; the target verifies root + tree in one forward; the accepted path plus one bonus token
is committed; both KV caches keep only that path. The target always holds every committed token but the newest
(the next root), whose logits come with the next verification.
"""

from __future__ import annotations

import time

import torch

from radar.decoding.drafters import Drafter
from radar.decoding.model import Transformer
from radar.decoding.session import DecodeSession, GenerationResult, OnCommit, Speculation
from radar.decoding.stop import StopPolicy
from radar.decoding.tree import TreeConfig, build_tree, empty_tree
from radar.decoding.verify import Sampling, next_token, prefill, walk


@torch.inference_mode()
def generate_ar(
    target: Transformer,
    prompt_ids: list[int],
    sampling: Sampling = Sampling(),
    max_new_tokens: int = 128,
    generator: torch.Generator | None = None,
    on_commit: OnCommit | None = None,
    logprobs: int | None = None,
) -> GenerationResult:
    """Plain autoregressive decoding: one target call per token."""
    session = DecodeSession(target, prompt_ids, max_new_tokens, on_commit, logprobs)
    cache = target.new_cache(session.max_len)
    pending = prefill(target, cache, torch.tensor(prompt_ids, device=target.device))
    session.prefilled()
    logits = target(pending[None], cache=cache)[0, -1]
    while True:
        session.stats.target_calls += 1
        token = next_token(logits, sampling, generator)
        if not session.commit([token], logits[None]):
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
    logprobs: int | None = None,
) -> GenerationResult:
    """Speculative decoding with a dynamic draft tree; `policy` decides how many draft calls each cycle makes;
    `logprobs` as in `GenerationResult`."""
    if tree_cfg.branching > drafter.vocab_size:
        raise ValueError(f"tree branching {tree_cfg.branching} exceeds the draft vocabulary ({drafter.vocab_size} tokens)")
    session = DecodeSession(target, prompt_ids, max_new_tokens, on_commit, logprobs)
    spec = Speculation(target, drafter, prompt_ids, session.max_len + tree_cfg.max_nodes + 1)
    session.prefilled()
    while True:
        start = time.perf_counter()
        root_pos = session.root_position
        policy.reset()
        # A load-aware policy may skip drafting for a cycle (a busy batch): then the root alone is verified.
        drafting = not getattr(policy, "skip_draft", bool)()
        tree = build_tree(drafter, spec.draft_pending, root_pos, tree_cfg, policy) if drafting else empty_tree(
            drafter.length, spec.target_pending.device)

        logits, base = spec.verify(tree, root_pos)
        path, bonus = walk(tree, logits, sampling, generator)  # reads the logits back: the device is done here
        new = spec.commit(tree, path, base, bonus) if drafting else spec.commit_undrafted(base, bonus)
        session.stats.count_cycle(len(new), tree.draft_calls, len(tree), time.perf_counter() - start)
        rows = logits[[0] + [1 + i for i in path]] if logprobs is not None else None  # what predicted each
        if not session.commit(new, rows):
            return session.result()
