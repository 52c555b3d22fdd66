"""Training the demo target, distilling its draft, and measuring how well the draft agrees with it."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from radar.decoding.model import Transformer
from radar.ops.demo_pair.config import PROBE_PROMPTS, DemoConfig


def init_weights(model: Transformer) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled down by depth, norms at one."""
    std = 0.02
    resid = std / math.sqrt(2 * model.config.num_hidden_layers)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=resid if name.endswith(("o_proj.weight", "down_proj.weight")) else std)


def _batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


def _optimizer(model: Transformer, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _fit(model: Transformer, loss_of_step: Callable[[], torch.Tensor], steps: int, lr: float, weight_decay: float,
         cfg: DemoConfig, desc: str, progress: bool) -> float:
    """AdamW with warm-up and a cosine schedule over `steps` batches; the mean loss of the last 10% of steps."""
    opt = _optimizer(model, lr, weight_decay)
    losses = []
    model.train()
    with _progress(steps, desc, progress) as bar:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, cfg.warmup_steps)
            loss = loss_of_step()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def train_target(
    model: Transformer, stream: torch.Tensor, cfg: DemoConfig, gen: torch.Generator, progress: bool
) -> float:
    """Next-token cross-entropy with AdamW and a cosine schedule; returns the mean loss of the last 10% of steps."""

    def loss() -> torch.Tensor:
        x = _batch(stream, cfg.batch_size, cfg.seq_len, gen)
        logits = model(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))

    return _fit(model, loss, cfg.target_steps, cfg.target_lr, cfg.weight_decay, cfg, "target", progress)


def init_draft(target: Transformer, cfg: DemoConfig, bos: int, eos: int) -> Transformer:
    """A `draft_layers`-layer model; when asked, a copy of the target's embeddings, first layers, norm and head."""
    draft = Transformer(cfg.model_config(cfg.draft_layers, bos, eos))
    init_weights(draft)
    if cfg.draft_init_from_target:
        own = draft.state_dict()
        src = target.state_dict()
        draft.load_state_dict({k: src[k].clone() for k in own})
    return draft


def _kl(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(target || draft), in nats."""
    t = F.log_softmax(target_logits.reshape(-1, target_logits.size(-1)).float(), dim=-1)
    d = F.log_softmax(draft_logits.reshape(-1, draft_logits.size(-1)).float(), dim=-1)
    return F.kl_div(d, t, log_target=True, reduction="batchmean")


@torch.inference_mode()
def sample_continuations(
    model: Transformer, prompts: torch.Tensor, new_tokens: int, greedy_rows: int, gen: torch.Generator
) -> torch.Tensor:
    """Continue each row of `prompts` (B, P) by `new_tokens` tokens with a KV cache: the first `greedy_rows`
    rows greedily, the rest by sampling at temperature 1. Returns (B, P + new_tokens)."""
    b = prompts.size(0)
    cache = model.new_cache(prompts.size(1) + new_tokens, batch=b)
    logits = model(prompts, cache=cache, last_only=True)[:, -1]
    out = [prompts]
    for i in range(new_tokens):
        probs = torch.softmax(logits.float(), dim=-1)
        sampled = torch.multinomial(probs, 1, generator=gen)[:, 0]
        nxt = torch.where(torch.arange(b) < greedy_rows, probs.argmax(-1), sampled)
        out.append(nxt[:, None])
        if i + 1 < new_tokens:
            logits = model(nxt[:, None], cache=cache)[:, -1]
    return torch.cat(out, dim=1)


def _chat_prompt_ends(stream: torch.Tensor, tok, cfg: DemoConfig, min_start: int) -> torch.Tensor:
    """Stream offsets just after each prompt template's tail (`\nAnswer:`): the points where an answer begins."""
    marker = tok.encode(cfg.prompt_template.split("{question}")[1], add_special_tokens=False).ids
    n = len(marker)
    windows = stream.unfold(0, n, 1)
    hits = (windows == torch.tensor(marker)).all(dim=1).nonzero()[:, 0] + n
    return hits[hits >= min_start]


def onpolicy_pool(
    target: Transformer, stream: torch.Tensor, tok, cfg: DemoConfig, gen: torch.Generator, progress: bool
) -> torch.Tensor:
    """The target's own continuations of chat prompts, (rows, seq_len): prompts are the `onpolicy_prompt_tokens`
    corpus tokens ending at a template's `Answer:`; a share of rows is continued greedily, the rest sampled at
    temperature 1. Generated in large batches up front, where a KV-cached step costs little more than at batch 1."""
    n_rows = math.ceil(cfg.draft_steps * round(cfg.batch_size * cfg.onpolicy_fraction) / cfg.onpolicy_reuse)
    prompt_len = cfg.onpolicy_prompt_tokens
    ends = _chat_prompt_ends(stream, tok, cfg, prompt_len)
    if not n_rows or not len(ends):
        return torch.empty(0, cfg.seq_len, dtype=torch.long)
    pick = ends[torch.randint(0, len(ends), (n_rows,), generator=gen)].tolist()
    prompts = torch.stack([stream[e - prompt_len : e] for e in pick])
    chunks = []
    with _progress(n_rows, "draft data", progress) as bar:
        for lo in range(0, n_rows, cfg.onpolicy_gen_batch):
            batch = prompts[lo : lo + cfg.onpolicy_gen_batch]
            greedy = round(len(batch) * cfg.onpolicy_greedy_fraction)
            chunks.append(sample_continuations(target, batch, cfg.seq_len - prompt_len, greedy, gen))
            bar.update(len(batch))
    return torch.cat(chunks).clone()  # a normal tensor, out of inference mode


def distill_draft(
    draft: Transformer,
    target: Transformer,
    stream: torch.Tensor,
    pool: torch.Tensor,
    cfg: DemoConfig,
    gen: torch.Generator,
    progress: bool,
) -> float:
    """Minimise KL(target || draft) on batches of corpus windows plus rows of the target's own continuations
    (`pool`, see `onpolicy_pool`); returns the mean KL of the last 10% of steps."""
    n_policy = round(cfg.batch_size * cfg.onpolicy_fraction) if len(pool) else 0

    def loss() -> torch.Tensor:
        x = _batch(stream, cfg.batch_size - n_policy, cfg.seq_len, gen)[:, :-1]
        if n_policy:
            x = torch.cat([x, pool[torch.randint(0, len(pool), (n_policy,), generator=gen)]])
        with torch.no_grad():
            t_logits = target(x)
        return _kl(t_logits, draft(x))

    return _fit(draft, loss, cfg.draft_steps, cfg.draft_lr, 0.0, cfg, "draft", progress)


# ------------------------------------------------------------------------------------------------ evaluation


@torch.inference_mode()
def agreement(target: Transformer, draft: Transformer, x: torch.Tensor, start: int = 0, depth: int = 4) -> dict:
    """How well the draft predicts the target on token rows `x` (B, T), both teacher-forced on all of x and
    scored on the predictions made at positions >= `start`.

    top1: share of positions where both argmaxes agree. kl: mean KL(target || draft). p_top1, p_top10: mean
    target probability of the draft's top token, and of its top 10: the chance that the verifier (which treats
    drafted tokens as deterministic candidates) accepts a chain step, or one of 10 sibling candidates, when
    sampling at temperature 1. greedy_tau: mean tokens per cycle (accepted drafts + bonus) of greedy chain
    drafting of `depth` tokens, exact when x[:, start + 1:] is the target's own greedy continuation.
    """
    t_logits, d_logits = target(x)[:, start:].float(), draft(x)[:, start:].float()
    p = torch.softmax(t_logits, -1)
    d_top = d_logits.topk(min(10, d_logits.size(-1)), dim=-1).indices
    match = (t_logits.argmax(-1) == d_top[..., 0]).float()  # (B, T - start)
    n = match.size(1) - depth + 1  # cycles that can run a full `depth` drafts inside x
    alive, accepted = torch.ones_like(match[:, :n]), torch.zeros_like(match[:, :n])
    for k in range(depth):
        alive = alive * match[:, k : k + n]
        accepted += alive
    return {
        "top1": match.mean().item(),
        "kl": _kl(t_logits, d_logits).item(),
        "p_top1": p.gather(-1, d_top[..., :1]).mean().item(),
        "p_top10": p.gather(-1, d_top).sum(-1).mean().item(),
        "greedy_tau": (accepted + 1).mean().item(),
    }


@torch.inference_mode()
def heldout_loss(model: Transformer, held_out: torch.Tensor, cfg: DemoConfig) -> float:
    """Mean next-token cross-entropy on `eval_batches * 4` fixed held-out windows."""
    x = _eval_windows(held_out, cfg)
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).item()


def _eval_windows(held_out: torch.Tensor, cfg: DemoConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return _batch(held_out, cfg.eval_batches * 4, min(cfg.seq_len, len(held_out) - 2), gen)


@torch.inference_mode()
def evaluate_pair(target: Transformer, draft: Transformer, held_out: torch.Tensor, tok, cfg: DemoConfig) -> dict:
    """Draft agreement on held-out text and on the target's continuations (greedy, sampled) of probe prompts."""
    out = {"heldout": agreement(target, draft, _eval_windows(held_out, cfg)[:, :-1])}
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    for name, greedy in (("greedy_continuations", True), ("sampled_continuations", False)):
        scores = []
        for prompt in PROBE_PROMPTS:
            ids = torch.tensor([tok.encode(cfg.prompt_template.format(question=prompt)).ids])
            row = sample_continuations(target, ids, cfg.eval_new_tokens, int(greedy), gen)
            scores.append(agreement(target, draft, row, start=ids.size(1) - 1))
        out[name] = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
    return out


# ------------------------------------------------------------------------------------------------- the build


def n_params(model: Transformer) -> int:
    """Parameter count."""
    return sum(p.numel() for p in model.parameters())
