"""One request's decoding state, shared by the autoregressive loop, the speculative loop and record collection.

A `DecodeSession` owns what every loop needs besides the models: the token budget (the request, cut to the
model's context), the committed tokens, the end-of-sequence check, the streaming `on_commit` callback, the
statistics and the wall time. A loop forwards the models, hands each step's tokens to `commit`, and stops when it
returns False. A `Speculation` owns the models' side of a speculative decode: both caches and the tokens each
model has still to see.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from radar.decoding.drafters import Drafter
from radar.decoding.model import LayerCapture, Transformer
from radar.decoding.tree import DraftTree
from radar.decoding.verify import commit_path, committed_features, prefill, verify_tree

# Called with the tokens each step commits, as soon as they are committed (streaming); returning False stops
# generation after them with finish_reason "stop" (a client went away, a stop string appeared).
OnCommit = Callable[[list[int]], "bool | None"]


@dataclass
class GenerationStats:
    """Counters of one generation: calls, accepted lengths per cycle, wall time, why it ended."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_calls: int = 0  # target forwards after the prompt's prefill: one per AR token, one per speculative cycle
    draft_calls: int = 0
    accept_lengths: list[int] = field(default_factory=list)  # tau per cycle: accepted drafts + bonus
    draft_calls_per_cycle: list[int] = field(default_factory=list)
    tree_tokens_per_cycle: list[int] = field(default_factory=list)  # tree nodes verified per cycle (root excluded)
    cycle_s: list[float] = field(default_factory=list)  # seconds per cycle, drafting to commit: what costs model
    wall_s: float = 0.0
    prefill_s: float = 0.0  # of wall_s, the prompt's prefill (all but the prompt's last token)
    finish_reason: str = "length"  # "length", "eos", "context", or "stop" (the on_commit callback asked to stop)

    def count_cycle(self, committed: int, draft_calls: int, tree_tokens: int = 0, seconds: float = 0.0) -> None:
        """Account for one speculative cycle: one target call, its draft calls, `committed` = accepted + bonus, the
        tree tokens it verified and its wall time."""
        self.target_calls += 1
        self.draft_calls += draft_calls
        self.accept_lengths.append(committed)
        self.draft_calls_per_cycle.append(draft_calls)
        self.tree_tokens_per_cycle.append(tree_tokens)
        self.cycle_s.append(seconds)

    @property
    def tau(self) -> float:
        """Mean tokens committed per target call (1.0 for autoregressive decoding)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 1.0

    @property
    def mean_draft_calls(self) -> float:
        """Mean draft calls per cycle (0.0 for autoregressive decoding)."""
        return sum(self.draft_calls_per_cycle) / max(len(self.draft_calls_per_cycle), 1)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of wall time."""
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict:
        """Flat statistics for JSON output."""
        out = asdict(self)
        out.update(tau=self.tau, mean_draft_calls=self.mean_draft_calls, tokens_per_s=self.tokens_per_s)
        return out


@dataclass
class GenerationResult:
    """The new tokens of one generation and its statistics."""

    token_ids: list[int]  # new tokens only
    stats: GenerationStats
    # Asked for (`logprobs=n`): per new token, its log-prob under the target's distribution (temperature 1) and the
    # n likeliest tokens with theirs. The target computes these logits anyway, so they cost a log-softmax.
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


def token_budget(context: int, prompt_len: int, max_new_tokens: int) -> tuple[int, str]:
    """New tokens allowed and the finish reason when they run out: the request ("length"), or what is left of a
    `context`-token window after the prompt ("context") when that is less."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty")
    room = context - prompt_len
    if room < 1:
        raise ValueError(f"prompt of {prompt_len} tokens does not fit the model's context of {context}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return (max_new_tokens, "length") if max_new_tokens <= room else (room, "context")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DecodeSession:
    """The committed tokens of one request and when decoding ends; the wall clock starts when it is made."""

    def __init__(
        self, target: Transformer, prompt_ids: list[int], max_new_tokens: int, on_commit: OnCommit | None = None,
        logprobs: int | None = None,
    ):
        self.prompt_ids = prompt_ids
        self.budget, self.budget_reason = token_budget(
            target.config.max_position_embeddings, len(prompt_ids), max_new_tokens
        )
        self.eos = set(target.config.eos_token_id)
        self.device = target.device
        self.on_commit = on_commit
        self.tokens: list[int] = []  # new tokens only
        self.finish_reason: str | None = None
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.top_logprobs = logprobs
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] | None = [] if logprobs is not None else None
        self.start = time.perf_counter()

    def prefilled(self) -> None:
        """Mark the prompt's prefill done: the time so far is `stats.prefill_s`."""
        sync(self.device)
        self.stats.prefill_s = time.perf_counter() - self.start

    @property
    def max_len(self) -> int:
        """Positions the committed sequence can reach: prompt plus budget."""
        return len(self.prompt_ids) + self.budget

    @property
    def root_position(self) -> int:
        """Position of the newest committed token (the root of the next speculative cycle)."""
        return len(self.prompt_ids) + len(self.tokens) - 1

    def commit(self, new: list[int], logits: torch.Tensor | None = None) -> bool:
        """Append `new` up to the first EOS or the budget and hand what was kept to `on_commit`; False once
        decoding is over (`finish_reason` then says why). `logits` (len(new), V): the target's rows that
        predicted them, read when logprobs were asked for."""
        n_before, reason = len(self.tokens), None
        for t in new:
            if len(self.tokens) == self.budget:
                break
            self.tokens.append(t)
            if t in self.eos:
                reason = "eos"
                break
        if reason is None and len(self.tokens) == self.budget:
            reason = self.budget_reason
        kept = self.tokens[n_before:]
        if self.logprobs is not None and kept:
            self._record_logprobs(kept, logits[: len(kept)])
        if self.on_commit is not None and kept and self.on_commit(kept) is False:
            reason = reason or "stop"
        self.finish_reason = reason
        return reason is None

    def _record_logprobs(self, tokens: list[int], logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens, device=logp.device)].tolist()
        top = logp.topk(self.top_logprobs, dim=-1) if self.top_logprobs else None
        for i, lp in enumerate(chosen):
            alts = list(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else []
            self.logprobs.append((lp, alts))

    def result(self) -> GenerationResult:
        """The generation so far, with the wall time measured once the device is done."""
        sync(self.device)
        self.stats.wall_s = time.perf_counter() - self.start
        self.stats.new_tokens = len(self.tokens)
        self.stats.finish_reason = self.finish_reason or "length"
        return GenerationResult(self.tokens, self.stats, self.logprobs)


class Speculation:
    """The two caches of one speculative decode and what each model has still to see. The engine's loop and record
    collection both drive it: `verify` a tree, then `commit` the accepted path and bonus token. The target always
    holds every committed token but the newest (the next root), whose logits come with the next verification; a
    drafter that reads the target's hidden states gets them for every token it is yet to be fed."""

    def __init__(self, target: Transformer, drafter: Drafter, prompt_ids: list[int], max_len: int):
        self.target, self.drafter = target, drafter
        self.cache = target.new_cache(max_len)
        drafter.begin(max_len)
        self.target_pending = self.draft_pending = torch.tensor(prompt_ids, device=target.device)
        self.capture = LayerCapture(drafter.capture) if drafter.capture else None
        self.target_pending = prefill(target, self.cache, self.target_pending, self.capture)
        if self.capture is not None and self.capture.hidden is not None:
            drafter.observe_target(self.capture.hidden[0])

    def verify(self, tree: DraftTree, root_pos: int) -> tuple[torch.Tensor, int]:
        """The target's logits over the pending tokens and `tree` (see `verify_tree`), and the tree's first slot."""
        return verify_tree(self.target, self.cache, self.target_pending, tree, root_pos, self.capture)

    def commit_undrafted(self, base: int, bonus: int) -> list[int]:
        """Commit a cycle that verified the root alone (no draft calls): the drafter has seen none of it, so the
        bonus joins the tokens it is still to be fed."""
        self.cache.keep(base, [])
        if self.capture is not None:
            self.drafter.observe_target(committed_features(self.capture, self.target_pending.numel(), []))
        self.target_pending = torch.tensor([bonus], device=self.target_pending.device)
        self._undrafted.append(bonus)  # joined once drafting resumes: a drafter sitting out would copy O(n^2)
        return [bonus]

    @property
    def draft_pending(self) -> torch.Tensor:
        """The committed tokens the drafter has still to be fed."""
        if self._undrafted:
            joined = torch.tensor(self._undrafted, device=self._draft_pending.device)
            self._draft_pending, self._undrafted = torch.cat((self._draft_pending, joined)), []
        return self._draft_pending

    @draft_pending.setter
    def draft_pending(self, tokens: torch.Tensor) -> None:
        # _undrafted: bonus tokens of undrafted cycles since, joined to the tensor when it is next read
        self._draft_pending, self._undrafted = tokens, []

    def commit(self, tree: DraftTree, path: list[int], base: int, bonus: int) -> list[int]:
        """Keep the accepted `path` (tree node indices) in both caches; returns the committed tokens."""
        n_fed = commit_path(self.cache, self.drafter, tree, path, base)
        if self.capture is not None:
            self.drafter.observe_target(committed_features(self.capture, self.target_pending.numel(), path))
        new = tree.tokens[path].tolist() + [bonus]
        device = self.target_pending.device
        self.target_pending = torch.tensor([bonus], device=device)
        self.draft_pending = torch.tensor(new[n_fed:], device=device)
        return new
