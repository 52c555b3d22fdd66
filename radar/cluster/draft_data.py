"""A draft head's training data: the draft vocabulary, and the target's features from one teacher-forced pass.

For each sequence (chat-rendered prompt + the target's answer) the file keeps, per token position j:
`ids` x_j, `features` the outputs of the head's low/middle/high target layers at j, `final` the target's normed
last hidden state at j (its distribution over the draft vocabulary is `final @ lm_head[draft ids].T`, computed at
train time, which stores 576 numbers a token instead of 8192), and `top1` the target's greedy next token after j
over its full vocabulary (what acceptance is measured against). Sequences lie end to end; `offsets` delimit them
and `prompt_lens` say where each answer starts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from radar.common.files import write_atomic_with


def draft_vocabulary(rows: Sequence[dict], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent target token ids of the prompts and answers (ties by id), sorted; topped up with
    the lowest unused ids when the data has fewer distinct tokens."""
    counts = Counter()
    for row in rows:
        counts.update(row["prompt_ids"])
        counts.update(row["answer_ids"])
    size = min(size, vocab_size)
    ids = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]
    if len(ids) < size:
        have = set(ids)
        ids += [t for t in range(vocab_size) if t not in have][: size - len(ids)]
    return torch.tensor(sorted(ids), dtype=torch.long)


def vocabulary_coverage(rows: Sequence[dict], vocab: torch.Tensor) -> float:
    """Share of answer tokens that lie in the draft vocabulary."""
    inside = set(vocab.tolist())
    tokens = [t for row in rows for t in row["answer_ids"]]
    return sum(t in inside for t in tokens) / max(1, len(tokens))


@torch.inference_mode()
def extract_features(
    model: str | Path,
    rows: Sequence[dict],
    layer_ids: tuple[int, ...],
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_len: int = 768,
    token_budget: int = 2048,
    progress: bool = True,
) -> Path:
    """Run the target once over every row (teacher forcing) and write the features file atomically."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from radar.decoding.model import LayerCapture, Transformer

    target = Transformer.from_pretrained(model, dtype=dtype).eval()
    last = target.config.num_hidden_layers - 1
    capture = LayerCapture(tuple(layer_ids) + (last,))
    seqs = [(row["prompt_ids"] + row["answer_ids"])[:max_len] for row in rows]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    parts: dict[int, tuple] = {}
    bar = tqdm(total=sum(map(len, seqs)), unit="tok", desc="features", disable=not progress)
    lo = 0
    while lo < len(order):
        hi = lo + 1  # as many similar-length sequences as fit the token budget
        while hi < len(order) and (hi - lo + 1) * len(seqs[order[hi]]) <= token_budget:
            hi += 1
        batch = order[lo:hi]
        width = len(seqs[batch[-1]])
        ids = torch.tensor([seqs[i] + [0] * (width - len(seqs[i])) for i in batch])  # right padding: causal
        logits = target(ids, capture=capture)
        hidden = capture.hidden
        n_feat = len(layer_ids) * target.config.hidden_size
        final = target.model.norm(hidden[..., n_feat:])
        for b, i in enumerate(batch):
            n = len(seqs[i])
            parts[i] = (hidden[b, :n, :n_feat].clone(), final[b, :n].clone(), logits[b, :n].argmax(-1).int())
        bar.update(sum(len(seqs[i]) for i in batch))
        lo = hi
    bar.close()
    lens = [len(s) for s in seqs]
    tensors = {
        "ids": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
        "features": torch.cat([parts[i][0] for i in range(len(seqs))]).to(torch.bfloat16),
        "final": torch.cat([parts[i][1] for i in range(len(seqs))]).to(torch.bfloat16),
        "top1": torch.cat([parts[i][2] for i in range(len(seqs))]),
        "offsets": torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.long),
        "prompt_lens": torch.tensor([min(len(r["prompt_ids"]), max_len) for r in rows], dtype=torch.long),
    }
    meta = {"layer_ids": ",".join(map(str, layer_ids)), "rows": str(len(rows)), "max_len": str(max_len)}
    return write_atomic_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def features_match(path: Path, layer_ids: tuple[int, ...], n_rows: int, max_len: int) -> bool:
    """Whether a features file was made for these rows and layers (so a rerun can skip the target pass)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return meta == {"layer_ids": ",".join(map(str, layer_ids)), "rows": str(n_rows), "max_len": str(max_len)}


@dataclass
class Batch:
    """Padded tensors of some sequences for an unroll of `steps`; position j of a sequence is column j.

    features (B, L, F): the target's features at t = 0..L-1 (L = longest length - 1);
    ids, final, top1 (B, L + steps): token, normed final hidden, target's greedy next token at position j;
    mask (B, L + steps): position j's prediction (of token j + 1) is trained and scored: j + 1 is an answer token.
    """

    features: torch.Tensor
    ids: torch.Tensor
    final: torch.Tensor
    top1: torch.Tensor
    mask: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(getattr(self, f).to(device) for f in ("features", "ids", "final", "top1", "mask")))

    def counts(self, steps: int) -> torch.Tensor:
        """Scored positions per unroll step k = 1..steps (step k at t predicts token t + k + 1)."""
        length = self.features.shape[1]
        return torch.stack([self.mask[:, k : k + length].sum() for k in range(1, steps + 1)])


class FeatureSet:
    """A features file, read once (memory-mapped), cut into per-sequence batches."""

    def __init__(self, path: str | Path):
        from safetensors.torch import load_file

        self.t = load_file(str(path))
        self.offsets = self.t["offsets"].tolist()
        self.prompt_lens = self.t["prompt_lens"].tolist()

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def length(self, i: int) -> int:
        return self.offsets[i + 1] - self.offsets[i]

    def batch(self, index: Sequence[int], steps: int) -> Batch:
        """The padded batch of sequences `index` (sequences shorter than 2 tokens contribute nothing)."""
        width = max(max(self.length(i) for i in index) - 1, 1)
        cols = width + steps
        t = self.t
        feats = torch.zeros(len(index), width, t["features"].shape[1], dtype=t["features"].dtype)
        ids = torch.zeros(len(index), cols, dtype=torch.long)
        final = torch.zeros(len(index), cols, t["final"].shape[1], dtype=t["final"].dtype)
        top1 = torch.zeros(len(index), cols, dtype=torch.long)
        mask = torch.zeros(len(index), cols, dtype=torch.bool)
        for b, i in enumerate(index):
            lo, n = self.offsets[i], self.length(i)
            feats[b, : n - 1] = t["features"][lo : lo + n - 1]
            ids[b, :n] = t["ids"][lo : lo + n]
            final[b, :n] = t["final"][lo : lo + n]
            top1[b, :n] = t["top1"][lo : lo + n]
            mask[b, max(self.prompt_lens[i] - 1, 0) : n - 1] = True
        return Batch(feats, ids, final, top1, mask)
