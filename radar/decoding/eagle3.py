"""EAGLE-3 draft heads: one decoder layer that reads the target's hidden states, in the layout SGLang and vLLM load.

The head (`Eagle3Head`, a plain module that training can unroll) projects the concatenated outputs of a low, a
middle and a high target layer with `fc`, runs one decoder layer whose attention input is [RMSNorm(token
embedding), RMSNorm(hidden)], and scores a reduced draft vocabulary (`d2t[i]`: offset from draft id i to its
target id; `t2d`: which target ids the draft vocabulary holds).

Alignment: the head's input at position t is the target's features at t with the embedding of token t+1, and it
predicts token t+2. So the drafter's slot for a committed token x_s carries the target's features of x_{s-1}; a
sequence's first token follows nothing and is never fed. Inside a draft tree a node's input is its parent's output
hidden state instead (the target has not seen the parent yet). Accepted nodes were drafted from those stand-ins,
so `Eagle3Drafter.keep` drops them and the next forward feeds them again with the target's features.

Layer ids follow `eagle_aux_hidden_state_layer_ids` as SpecForge writes and SGLang reads them: the output of layer
i (0-based). Without them: EAGLE-3's defaults, the outputs of layers 1, N/2 - 1 and N - 4 (the inputs of layers 2,
N/2 and N - 3). vLLM reads the same key as the input of layer i: a checkpoint written for vLLM names ids one higher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from radar.decoding.drafters import Drafter
from radar.decoding.gguf_quant import Int4Linear
from radar.decoding.model import (
    MLP,
    Attention,
    KVCache,
    ModelConfig,
    ModelLoadError,
    RMSNorm,
    Transformer,
    attention_mask,
    load_hf_config,
    rope_angles,
    rope_inv_freq,
)

ARCHITECTURE = "LlamaForCausalLMEagle3"


def default_layer_ids(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high layers of an N-layer target (clamped into range for tiny targets)."""
    return tuple(min(max(i, 0), num_layers - 1) for i in (1, num_layers // 2 - 1, num_layers - 4))


def draft_vocab_maps(target_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t, t2d) for a draft vocabulary of the given target token ids (draft ids follow ascending target ids)."""
    ids = torch.unique(target_ids.long())  # sorted
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(ids.numel()), t2d


@dataclass
class Eagle3Config:
    layer: ModelConfig  # the decoder layer (sizes, heads, norm, rope); its vocab_size is the target's
    draft_vocab_size: int
    target_hidden_size: int
    layer_ids: tuple[int, ...] | None = None  # None: `default_layer_ids` of the target it is bound to
    norm_before_residual: bool = False  # some heads add the normed hidden state, not the raw one, to the residual

    @property
    def n_features(self) -> int:
        """How many target layers `fc` reads."""
        return len(self.layer_ids) if self.layer_ids is not None else 3

    @classmethod
    def for_target(
        cls,
        target: ModelConfig,
        draft_vocab_size: int,
        layer_ids: tuple[int, ...] | None = None,
        intermediate_size: int | None = None,
    ) -> Eagle3Config:
        """A head shaped like the target's layers (as published heads are), reading `layer_ids`."""
        layer = replace(
            target, num_hidden_layers=1, intermediate_size=intermediate_size or target.intermediate_size,
            tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False, model_type="llama",
        )
        ids = tuple(layer_ids) if layer_ids is not None else None
        return cls(layer, draft_vocab_size, target.hidden_size, ids)

    @classmethod
    def from_dir(cls, path: Path) -> Eagle3Config:
        """Read an EAGLE-3 checkpoint's config.json (transformers parses the Llama part)."""
        raw = json.loads((path / "config.json").read_text())
        layer = ModelConfig.from_hf(load_hf_config(path))
        ids = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        ids = ids or raw.get("eagle_aux_hidden_state_layer_ids")
        return cls(
            layer=layer,
            draft_vocab_size=int(raw.get("draft_vocab_size") or layer.vocab_size),
            target_hidden_size=int(raw.get("target_hidden_size") or layer.hidden_size),
            layer_ids=tuple(int(i) for i in ids) if ids else None,
            norm_before_residual=bool(raw.get("norm_before_residual", False)),
        )

    def to_json(self) -> dict:
        """config.json in the layout SGLang and vLLM read."""
        c = self.layer
        out = dict(
            architectures=[ARCHITECTURE], model_type="llama", hidden_act="silu", num_hidden_layers=1,
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
            rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, max_position_embeddings=c.max_position_embeddings,
            vocab_size=c.vocab_size, draft_vocab_size=self.draft_vocab_size, target_hidden_size=self.target_hidden_size,
            tie_word_embeddings=False, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id or None,
            norm_before_residual=self.norm_before_residual,
        )
        if self.layer_ids is not None:
            out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.layer_ids)}
        return out


class Eagle3Layer(nn.Module):
    """The head's decoder layer: attention over [normed embedding, normed hidden] (2H wide), then the MLP."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        c = cfg.layer
        self.norm_before_residual = cfg.norm_before_residual
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, in_features=2 * c.hidden_size)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, embeds, hidden, cos, sin, mask, layer_cache, start):
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat((self.input_layernorm(embeds), normed), dim=-1)
        x = residual + self.self_attn(x, cos, sin, mask, layer_cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Head(nn.Module):
    """An EAGLE-3 head. For training: `logits, h = head(ids, head.project(features), positions)` over a sequence,
    ids[t] being the token after the one features[t] belong to, labels the target's distribution one token later;
    a training-time-test unroll feeds `h` back as the next step's hidden input (with a `tree_mask` for its
    attention pattern)."""

    def __init__(self, cfg: Eagle3Config, embedding: bool = True):
        super().__init__()
        c = cfg.layer
        self.config = cfg
        self.fc = nn.Linear(cfg.n_features * cfg.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, cfg.draft_vocab_size, bias=False)
        # Most published heads ship no embedding and use the target's (`bind`); that one is never saved with the head.
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size) if embedding else None
        self.shared_embedding = False
        # Until set (`draft_vocab_maps`), the draft vocabulary is the first draft_vocab_size target ids.
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(c.vocab_size) < cfg.draft_vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(c), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the head computes in (bf16 once its linears are on the int4 kernel)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the head's weights live."""
        return self.norm.weight.device

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The hidden input (..., H) for target features (..., n_features * target hidden size)."""
        return self.fc(features.to(self.dtype))  # a gguf target hands over bf16 features

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target token ids of draft vocabulary ids."""
        return draft_ids + self.d2t[draft_ids]

    def new_cache(self, max_len: int) -> KVCache:
        """An empty one-layer KV cache for `max_len` slots."""
        return KVCache(self.config.layer, max_len, device=self.device, dtype=self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        tree_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft-vocabulary logits (B, Q, V_draft), output hidden states (B, Q, H)) for tokens (B, Q) with their
        hidden inputs (B, Q, H); `cache` and `tree_mask` as in `Transformer.forward` (`last_only`: logits of the
        last token alone, (B, 1, V_draft))."""
        q = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if cache is not None and start + q > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {q} tokens > {cache.max_len} slots")
        mask = attention_mask(q, start, tree_mask, input_ids.device)
        cos, sin = rope_angles(position_ids, self.inv_freq, self.dtype)
        layer_cache = cache.layer(0) if cache is not None else None
        x = self.midlayer(self.embed_tokens(input_ids).to(self.dtype), hidden, cos, sin, mask, layer_cache, start)
        if cache is not None:
            cache.length = start + q
        return self.lm_head(self.norm(x[:, -1:] if last_only else x)), x

    def bind(self, target: Transformer) -> Eagle3Head:
        """Check the head against its target, resolve default layer ids, and take the target's embedding if the
        head has none (frozen: EAGLE-3 trains heads with it fixed)."""
        cfg, t = self.config, target.config
        if cfg.layer.vocab_size != t.vocab_size:
            raise ModelLoadError(
                f"EAGLE-3 head is for a {cfg.layer.vocab_size}-token vocabulary, the target has {t.vocab_size}"
            )
        if cfg.target_hidden_size != t.hidden_size:
            raise ModelLoadError(
                f"EAGLE-3 head reads hidden states of size {cfg.target_hidden_size}, the target's are {t.hidden_size}"
            )
        ids = cfg.layer_ids if cfg.layer_ids is not None else default_layer_ids(t.num_hidden_layers)
        if any(not 0 <= i < t.num_hidden_layers for i in ids):
            raise ModelLoadError(
                f"EAGLE-3 layer ids {list(ids)} are out of range for a target of {t.num_hidden_layers} layers"
            )
        self.config = replace(cfg, layer_ids=tuple(ids))
        if self.embed_tokens is None:
            if cfg.layer.hidden_size != t.hidden_size:
                raise ModelLoadError(
                    f"EAGLE-3 head has no embed_tokens and its hidden size {cfg.layer.hidden_size} differs from the "
                    f"target's {t.hidden_size}, so it cannot use the target's embedding"
                )
            self.embed_tokens, self.shared_embedding = target.model.embed_tokens, True
            self.embed_tokens.requires_grad_(False)
        return self

    # ---------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Eagle3Head:
        """Load a head directory (config.json with architectures LlamaForCausalLMEagle3, model.safetensors)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not is_eagle3_dir(path):
            raise ModelLoadError(f"{path}: not an EAGLE-3 head (config.json architectures must be [{ARCHITECTURE!r}])")
        cfg = Eagle3Config.from_dir(path)
        if not (path / "model.safetensors").exists():
            raise ModelLoadError(f"{path}: no model.safetensors (EAGLE-3 heads load from safetensors only)")
        state = load_file(str(path / "model.safetensors"), device=str(device))
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        with torch.device("meta"):
            head = cls(cfg, embedding="embed_tokens.weight" in state)
        check_tensors(path, cfg, state, {k: v.shape for k, v in head.state_dict().items()})
        state = {k: v if k in ("d2t", "t2d") else v.to(dtype) for k, v in state.items()}
        head.load_state_dict(state, strict=True, assign=True)
        head.inv_freq = rope_inv_freq(cfg.layer).to(device)
        return head.eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json and model.safetensors in the layout SGLang and vLLM load."""
        from safetensors.torch import save_file

        if any(isinstance(m, Int4Linear) for m in self.modules()):
            raise ValueError("this EAGLE-3 head runs on the int4 kernel (quantized on load); save the float head")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.shared_embedding:  # the target's, whatever its form (a gguf target's holds blocks)
            state = {k: v for k, v in state.items() if not k.startswith("embed_tokens.")}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def is_eagle3_dir(path: str | Path) -> bool:
    """Whether a directory's config.json names the EAGLE-3 head architecture."""
    file = Path(path) / "config.json"
    try:
        return ARCHITECTURE in (json.loads(file.read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return False


def check_tensors(path: Path, cfg: Eagle3Config, state: dict, shapes: dict) -> None:
    """One-line errors for a head whose tensors do not match its config."""
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ModelLoadError(f"{path}: EAGLE-3 head is missing tensor(s) {', '.join(missing[:4])}")
    unexpected = sorted(set(state) - set(shapes))
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected tensor(s) {', '.join(unexpected[:4])} in an EAGLE-3 head")
    for name in ("lm_head.weight", "d2t"):
        if state[name].shape[0] != cfg.draft_vocab_size:
            rows = state[name].shape[0]
            raise ModelLoadError(f"{path}: draft_vocab_size is {cfg.draft_vocab_size} in config.json but {name} has {rows} rows")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(shapes[k])}" for k in sorted(shapes) if state[k].shape != shapes[k]]
    if wrong:
        raise ModelLoadError(f"{path}: EAGLE-3 tensors do not match config.json ({'; '.join(wrong[:3])})")
    targets = torch.arange(cfg.draft_vocab_size) + state["d2t"].cpu()
    if targets.min() < 0 or targets.max() >= cfg.layer.vocab_size:
        raise ModelLoadError(f"{path}: d2t maps draft ids outside the {cfg.layer.vocab_size}-token target vocabulary")


class Eagle3Drafter(Drafter):
    """An EAGLE-3 head behind the drafter interface: its own one-layer KV cache, the head's output hidden state
    per slot (a tree node's children read it), and the target's features waiting for the tokens they precede."""

    def __init__(self, head: Eagle3Head):
        if head.embed_tokens is None or head.config.layer_ids is None:
            raise ValueError("bind the EAGLE-3 head to its target first (Eagle3Head.bind)")
        self.head = head
        self.vocab_size = head.config.draft_vocab_size
        self.capture = head.config.layer_ids
        self.cache = None

    def begin(self, max_len: int) -> None:
        device, width = self.head.device, self.head.config.layer.hidden_size
        self.cache = self.head.new_cache(max_len)
        self.hidden_out = torch.zeros(max_len, width, device=device, dtype=self.head.dtype)
        self.slot_tokens = torch.zeros(max_len, dtype=torch.long, device=device)
        self.slot_positions = torch.zeros(max_len, dtype=torch.long, device=device)
        self.features: list[torch.Tensor] = []  # the target's features of committed tokens not yet used, in order
        self.refeed = (self.slot_tokens[:0], self.slot_positions[:0])  # accepted nodes to feed again
        self.started = False

    @property
    def length(self) -> int:
        return self.cache.length

    def target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.target_ids(ids)

    def observe_target(self, hidden: torch.Tensor) -> None:
        self.features.append(hidden)  # joined when next fed: a drafter sitting out would otherwise copy O(n^2)

    def forward(self, tokens, positions, tree_mask):
        if tree_mask is None:
            tokens, positions, hidden = self._committed(tokens, positions)
        else:
            hidden = self.hidden_out[self._parent_slots(tree_mask, tokens.numel())]
        start, n = self.cache.length, tokens.numel()
        # Committed tokens only seed the tree from the last one: the LM head over the others would be thrown away.
        logits, out = self.head(tokens[None], hidden[None], positions[None], self.cache, tree_mask,
                                last_only=tree_mask is None)
        self.hidden_out[start : start + n] = out[0]
        self.slot_tokens[start : start + n], self.slot_positions[start : start + n] = tokens, positions
        return torch.log_softmax(logits[0].float(), dim=-1)

    def keep(self, start, slots):
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.slot_tokens.device)
        self.refeed = (self.slot_tokens[slots], self.slot_positions[slots])
        self.cache.keep(start, [])

    def _committed(self, tokens, positions):
        """Committed tokens to feed (accepted nodes again, then `tokens`) with their hidden inputs."""
        tokens, positions = torch.cat((self.refeed[0], tokens)), torch.cat((self.refeed[1], positions))
        self.refeed = (tokens[:0], positions[:0])
        features = torch.cat(self.features) if self.features else None
        self.features = []
        n = 0 if features is None else features.shape[0]
        if not self.started and n == tokens.numel() - 1:
            self.started = True
            if n:  # the sequence's first token follows no features: EAGLE-3 never feeds it
                return tokens[1:], positions[1:], self.head.project(features)
            # A one-token prompt: the head must still draft after it, so it reads zero features.
            zeros = torch.zeros(1, self.head.fc.in_features, device=tokens.device, dtype=self.head.dtype)
            return tokens, positions, self.head.project(zeros)
        if n != tokens.numel():
            raise RuntimeError(f"EAGLE-3 drafter: {tokens.numel()} committed tokens to feed, target features for {n}")
        self.started = True
        return tokens, positions, self.head.project(features)

    def _parent_slots(self, tree_mask: torch.Tensor, q: int) -> torch.Tensor:
        """Each new node's parent slot: the latest earlier tree slot it sees, else the root (the slot before them)."""
        earlier = tree_mask[:, : tree_mask.shape[1] - q]
        cols = torch.arange(earlier.shape[1], device=earlier.device)
        latest = torch.where(earlier, cols, -1).amax(dim=1) if earlier.shape[1] else cols.new_full((q,), -1)
        return self.cache.length - earlier.shape[1] + latest
