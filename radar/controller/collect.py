"""Collect the controller's dataset (paper Sec. 2.3): one record {S, D} per decoding cycle of a real generation.

Per cycle, with the committed prefix x:

  1. The drafter makes the full t_max-call pool once (`draft_pool` with `FixedDepth(t_max)`, branching k). The pool
     is built call by call and nodes are appended in depth order, so the nodes of depth <= i are exactly the pool
     that i calls would have made; the tree the engine verifies with i calls, T_i, is `select_tree` of that prefix.
  2. The target verifies the union of T_1..T_tmax in ONE forward (each node sees its ancestors only, so its logits
     are the ones it gets in its own tree's verification), and `acceptance_distribution` gives every d_i exactly
     from `target_probs` at the collection temperature (one-hot argmax rows at temperature 0), zero-padded to
     t_max + 1 lengths.
     The union's nodes (parent, depth, score, the target's probability of the node's token) are kept too, so any
     tree of up to `total_tokens` nodes after any number of calls can be priced later (`radar.controller.budgets`).
  3. S: row i - 1 is the frontier after call i (the top-k pool nodes of depth i by cumulative log-prob), through
     `frontier_state`, the controller's own input builder.
  4. The cycle is committed like the engine at depth t_max: `walk` over T_tmax (lossless: greedy, or a draw from the
     target), both caches keep the accepted path (`commit_path`). The prefixes therefore follow the target's own
     distribution, the same text `generate_speculative` (and plain decoding) produces.

Metadata: `position` is the index of the cycle's root, the prefix's last committed token (prompt included), so the
prefix is (prompt ids + generated ids)[: position + 1]; the first record of a prompt has position len(prompt) - 1.

Records are reproducible: each prompt's sampling generator is seeded from (seed, prompt id), so a prompt gives the
same records whatever shard or order it is collected in. With that seed, `pair.generate(ids, "tree:<t_max>",
seed=prompt_seed(seed, prompt.id))` samples the very same text (tested).

Cost: per cycle t_max draft calls (as at depth t_max) and one target forward over the union, which is larger than
one tree (up to t_max * total_tokens nodes), plus t_max small CPU passes for the d_i.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from radar.controller.dataset import SCHEMA_VERSION, Record
from radar.controller.state import frontier_state
from radar.common.prompts import Prompt
from radar.decoding.pair import ModelPair
from radar.decoding.session import DecodeSession, Speculation
from radar.decoding.stop import FixedDepth
from radar.decoding.tree import DraftPool, DraftTree, TreeConfig, draft_pool, induced_tree, select_tree
from radar.decoding.verify import (Sampling, acceptance_distribution, target_probs, walk)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The sampling seed of one prompt: stable across processes, shards and prompt order."""
    return zlib.crc32(f"{seed}:{prompt_id}".encode()) & 0x7FFFFFFF


def model_names(pair: ModelPair, target: str | None = None, draft: str | None = None) -> tuple[str, str]:
    """Names stored in the records' metadata: the given ones, else the tokenizer's source (the target's directory,
    where `ModelPair.load` reads it) and "draft" (a loaded pair does not keep its draft's path)."""
    target = target or getattr(pair.tokenizer, "name_or_path", None) or "target"
    return str(target), str(draft or "draft")


def pool_prefix(pool: DraftPool, calls: int) -> DraftPool:
    """The pool `calls` draft calls would have made: the nodes of depth <= calls (nodes are stored depth by depth)."""
    n = int((pool.depths <= calls).sum())
    return replace(
        pool,
        tokens=pool.tokens[:n],
        parents=pool.parents[:n],
        depths=pool.depths[:n],
        scores=pool.scores[:n],
        ancestors=pool.ancestors[:n, :n],
        draft_slots=pool.draft_slots[:n],
        frontier_scores=pool.frontier_scores[: calls - 1],
        draft_calls=min(calls, pool.draft_calls),
    )


def selected_nodes(pool: DraftPool, total_tokens: int) -> torch.Tensor:
    """The pool indices `select_tree(pool, total_tokens)` keeps, in pool order (select_tree run on the pool with
    every token replaced by its own index, so the rerank is literally the engine's)."""
    index_pool = replace(pool, tokens=torch.arange(pool.tokens.numel(), device=pool.tokens.device))
    return select_tree(index_pool, total_tokens).tokens


def checked_induced_tree(pool: DraftPool, keep: torch.Tensor) -> DraftTree:
    """`induced_tree`, after checking that `keep` (e.g. a union of several trees) is closed under ancestors."""
    kept = torch.zeros(pool.tokens.numel(), dtype=torch.bool, device=keep.device)
    kept[keep] = True
    parents = pool.parents[keep]
    if not kept[parents[parents >= 0]].all():
        raise ValueError("the node set is not closed under ancestors")
    return induced_tree(pool, keep)


def cycle_trees(
    pool: DraftPool, t_max: int, total_tokens: int
) -> tuple[list[DraftTree], DraftTree, list[torch.Tensor]]:
    """The trees T_1..T_tmax the engine would verify after 1..t_max calls of `pool`, their union as one tree (to
    verify in one forward), and each T_i's nodes as union indices."""
    prefixes = [pool_prefix(pool, i) for i in range(1, t_max + 1)]
    trees = [select_tree(prefix, total_tokens) for prefix in prefixes]  # exactly the engine's trees
    keeps = [selected_nodes(prefix, total_tokens) for prefix in prefixes]
    union = torch.unique(torch.cat(keeps))  # sorted: pool order, parents before children
    where = torch.full((len(pool.tokens),), -1, dtype=torch.long, device=union.device)
    where[union] = torch.arange(union.numel(), device=union.device)
    return trees, checked_induced_tree(pool, union), [where[keep] for keep in keeps]


def cycle_distributions(
    union: DraftTree, trees: list[DraftTree], nodes: list[torch.Tensor], logits: torch.Tensor, sampling: Sampling,
    t_max: int,
) -> tuple[np.ndarray, np.ndarray]:
    """D (t_max, t_max + 1): d_i of every tree from the union's verification logits (1 + len(union), V);
    `nodes[i]` are tree i's nodes as union indices. Also the union's node table (len(union), 4): parent, depth,
    score and the target's probability of each node's token (the record's `nodes`).

    `acceptance_distribution` only reads the target's probability of each drafted token, so it runs on the CPU on
    the columns of the tokens the union drafted (tree tokens renumbered to those columns): exact, and it moves
    (1 + len(union)) x (distinct tokens) numbers off the device instead of a vocabulary-wide row per node."""
    if sampling.greedy:
        probs = torch.zeros_like(logits, dtype=torch.float32)
        probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    else:
        probs = target_probs(logits, sampling)
    columns, local = torch.unique(union.tokens, return_inverse=True)
    small, local = probs[:, columns].cpu(), local.cpu()
    dists = np.zeros((len(trees), t_max + 1), dtype=np.float32)
    for i, (tree, idx) in enumerate(zip(trees, nodes)):
        idx = idx.cpu()
        compact = replace(tree, tokens=local[idx], parents=tree.parents.cpu(), depths=tree.depths.cpu(),
                          ancestors=tree.ancestors.cpu())
        d = acceptance_distribution(compact, small[torch.cat((torch.zeros(1, dtype=torch.long), 1 + idx))]).numpy()
        dists[i, : d.shape[0]] = d
    parents = union.parents.cpu()
    p_accept = small[parents + 1, local]
    table = torch.stack((parents.float(), union.depths.cpu().float(), union.scores.cpu().float(), p_accept.float()), 1)
    return dists, table.numpy()


@torch.inference_mode()
def collect_prompt(
    pair: ModelPair,
    prompt: Prompt,
    *,
    t_max: int = 8,
    k: int = 10,
    total_tokens: int | None = None,
    temperature: float = 0.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    names: tuple[str, str] | None = None,
    on_record: Callable[[Record], None] | None = None,
) -> tuple[list[Record], list[int]]:
    """Records of one prompt's generation, and the generated tokens (new ones only)."""
    if pair.draft is None:
        raise ValueError("collecting records needs a draft model (--draft PATH)")
    total_tokens = pair.tree.total_tokens if total_tokens is None else total_tokens
    cfg = TreeConfig(branching=k, max_calls=t_max, total_tokens=total_tokens)
    drafter = pair.drafter()
    if k > drafter.vocab_size:
        raise ValueError(f"branching k={k} exceeds the draft vocabulary ({drafter.vocab_size} tokens)")
    sampling = Sampling(temperature=temperature)
    target, device = pair.target, pair.target.device
    target_name, draft_name = names or model_names(pair)
    generator = torch.Generator(device).manual_seed(prompt_seed(seed, prompt.id))

    prompt_ids = pair.chat_ids(prompt.text)
    try:
        session = DecodeSession(target, prompt_ids, max_new_tokens)
    except ValueError as exc:
        raise ValueError(f"prompt {prompt.id!r}: {exc}") from None
    spec = Speculation(target, drafter, prompt_ids, session.max_len + cfg.max_nodes + 1)
    records: list[Record] = []
    while True:
        root_pos = session.root_position
        pool = draft_pool(drafter, spec.draft_pending, root_pos, cfg, FixedDepth(t_max))
        trees, union, nodes = cycle_trees(pool, t_max, total_tokens)
        logits, base = spec.verify(union, root_pos)
        states = torch.stack([frontier_state(pool.scores[pool.depths == i], k) for i in range(1, t_max + 1)])
        dists, table = cycle_distributions(union, trees, nodes, logits, sampling, t_max)
        record = Record(states.cpu().numpy(), dists, prompt_id=str(prompt.id), position=root_pos, target=target_name,
                        draft=draft_name, temperature=float(temperature), schema_version=SCHEMA_VERSION,
                        nodes=table, budget=total_tokens)
        records.append(record)
        if on_record is not None:
            on_record(record)

        # Commit like the engine at depth t_max: walk T_tmax, keep its accepted path (as union nodes) in both caches.
        deepest = nodes[-1]
        rows = torch.cat((torch.zeros(1, dtype=torch.long, device=deepest.device), 1 + deepest))
        path, bonus = walk(trees[-1], logits[rows], sampling, generator)
        if not session.commit(spec.commit(union, deepest[path].tolist(), base, bonus)):
            return records, session.tokens


def collect_records(
    pair: ModelPair,
    prompts: list[Prompt],
    *,
    t_max: int = 8,
    k: int = 10,
    total_tokens: int | None = None,
    temperature: float = 0.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    progress: bool = True,
    on_record: Callable[[Record], None] | None = None,
    target_name: str | None = None,
    draft_name: str | None = None,
) -> list[Record]:
    """One record per decoding cycle of every prompt's generation (see the module docstring).

    `total_tokens` defaults to the pair's tree budget (`pair.tree.total_tokens`); `on_record` is called with each
    record as soon as it exists (for streaming shards); `target_name`/`draft_name` go into the metadata (default:
    see `model_names`). Deterministic for a given seed: each prompt's sampling uses `prompt_seed(seed, prompt.id)`.
    """
    if t_max < 1 or k < 1:
        raise ValueError("t_max and k must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    names = model_names(pair, target_name, draft_name)
    from tqdm.auto import tqdm

    records: list[Record] = []
    with tqdm(total=len(prompts), desc="collect", unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        for prompt in prompts:
            recs, _ = collect_prompt(
                pair, prompt, t_max=t_max, k=k, total_tokens=total_tokens, temperature=temperature,
                max_new_tokens=max_new_tokens, seed=seed, names=names, on_record=on_record,
            )
            records.extend(recs)
            bar.update(1)
            bar.set_postfix(records=len(records))
    return records


__all__ = ["collect_records", "collect_prompt", "prompt_seed", "model_names", "pool_prefix", "selected_nodes",
           "checked_induced_tree", "cycle_trees", "cycle_distributions"]
