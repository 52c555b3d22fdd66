"""A loaded target + draft + tokenizer, and one entry point to decode a prompt with any method."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from radar.decoding.arms import RequestGate
from radar.decoding.chat import Message, render_chat
from radar.decoding.drafters import Drafter, SmallLMDrafter
from radar.decoding.eagle3 import Eagle3Drafter, Eagle3Head, is_eagle3_dir
from radar.decoding.generate import generate_ar, generate_speculative
from radar.decoding.gguf_quant import GGUF_FILE, load_gguf_model, quantize_linears
from radar.decoding.methods import Method
from radar.decoding.model import ModelLoadError, Transformer
from radar.decoding.session import GenerationResult, OnCommit
from radar.decoding.stop import FixedDepth, StopPolicy, ThresholdPolicy
from radar.decoding.tree import TreeConfig
from radar.decoding.verify import Sampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = ("auto", "gguf", *DTYPES)  # gguf: the target's own GGUF blocks on the int4 kernel (gguf_quant.py)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible on this machine (use --device cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device {name!r}: use auto, cpu or cuda[:N]")
    return torch.device(name)


@functools.cache  # the CPU does not change under a running process; every model load asks
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX, Arm's BF16 extension)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no cheap way to tell, so the safe float32
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


def resolve_precision(name: str, device: torch.device, model: str | Path | None = None) -> str:
    """The target's precision: gguf, float32, bfloat16 or float16. `auto` is gguf on a CPU with native bf16 when
    the checkpoint keeps its source GGUF (the int4 kernel decodes about twice as fast as float32 there:
    benchmarks/README.md), else bfloat16 on a GPU and on a CPU with native bf16, else float32, where bf16 is
    emulated and slow."""
    if name == "auto":
        if device.type == "cpu" and native_bf16() and model is not None and (Path(model) / GGUF_FILE).is_file():
            return "gguf"
        return "bfloat16" if device.type == "cuda" or native_bf16() else "float32"
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r}: use {', '.join(PRECISIONS)}")
    return name


def precision_of(model: Transformer) -> str:
    """The precision a loaded target computes in."""
    return "gguf" if model.quantized else str(model.dtype).removeprefix("torch.")


def default_tree(device: torch.device, precision: str = "float32") -> TreeConfig:
    """The paper's tree (k=10, 60 verified nodes) on a GPU. On a CPU every extra token in a forward costs time,
    so a narrow tree: k=2 with 12 verified nodes, and 3 under gguf, whose int4 kernel costs about 18% more per
    verified token and jumps at 5 (benchmarks/README.md); 3 calls at most, since a 4th call's nodes could not fit."""
    if device.type == "cuda":
        return TreeConfig(branching=10, max_calls=8, total_tokens=60)
    if precision == "gguf":
        return TreeConfig(branching=2, max_calls=3, total_tokens=3)
    return TreeConfig(branching=2, max_calls=8, total_tokens=12)


@dataclass
class ModelPair:
    """A target, its optional draft, the tokenizer they share and the default draft tree."""

    target: Transformer
    draft: Transformer | Eagle3Head | None  # a small LM sharing the tokenizer, or an EAGLE-3 head bound to target
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    tree: TreeConfig
    # Builds a fresh stop policy for method `radar` from a request's seed and sampling settings (a new one per
    # request, so no LSTM or random state is shared between requests; the sampling settings let a loader pick a
    # controller trained for greedy or for sampled decoding). Set by whoever loads a controller.
    stop_policy: Callable[[int, Sampling], StopPolicy] | None = None
    # Measures whether `radar` requests should draft at all, where the controller's margin is too small to trust
    # (radar.decoding.arms). Set by whoever loads a controller.
    gate: RequestGate | None = None

    @classmethod
    def load(
        cls,
        model: str | Path,
        draft: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        tree: TreeConfig | None = None,
    ) -> "ModelPair":
        """Load a target (and optional draft: a small LM or an EAGLE-3 head, told apart by its config.json)
        checkpoint directory and the target's tokenizer; `dtype` is the target's precision (PRECISIONS); the draft
        computes in the target's dtype; beside a gguf target an EAGLE-3 head runs on the same int4 kernel (its
        linears quantized on load) and a small LM in float32."""
        dev = resolve_device(device)
        precision = resolve_precision(dtype, dev, model)
        if precision == "gguf":
            target = load_gguf_model(model, dev)
        else:
            target = Transformer.from_pretrained(model, device=dev, dtype=DTYPES[precision])
        # A draft reads one or two tokens a call, where a CPU's dense float32 beats bf16; a gguf target's bf16
        # activations are cast on the way in (benchmarks/README.md).
        dt = torch.float32 if precision == "gguf" else target.dtype
        tree = tree or default_tree(dev, precision)
        if draft and is_eagle3_dir(draft):
            head = Eagle3Head.from_pretrained(draft, device=dev, dtype=dt)
            if precision == "gguf":  # a head's call reads its whole 20-40 MB of float weights for a row or two
                head = quantize_linears(head)  # before `bind`, which may share the target's embedding
            return cls(target, head.bind(target), load_tokenizer(model), tree)
        draft_model = Transformer.from_pretrained(draft, device=dev, dtype=dt) if draft else None
        if draft_model is not None and draft_model.config.vocab_size != target.config.vocab_size:
            raise ModelLoadError(
                f"draft vocabulary ({draft_model.config.vocab_size} tokens, {draft}) does not match the target's "
                f"({target.config.vocab_size} tokens, {model}): the draft must share the target's tokenizer"
            )
        return cls(target, draft_model, load_tokenizer(model), tree)

    def drafter(self) -> Drafter:
        """A fresh drafter over the loaded draft (one per request: it holds that sequence's state)."""
        if self.draft is None:
            raise ValueError("no draft model loaded (--draft PATH)")
        head = isinstance(getattr(self.draft, "wrapped", self.draft), Eagle3Head)  # a BatchedModel wraps one
        return Eagle3Drafter(self.draft) if head else SmallLMDrafter(self.draft)

    def stop_rule(self, method: Method, sampling: Sampling, seed: int) -> StopPolicy:
        """A fresh stop policy for a speculative `method` (it holds one request's state)."""
        if self.draft is None:
            raise ValueError(f"method {method} needs a draft model (--draft PATH)")
        if method.kind == "radar":
            if self.stop_policy is None:
                raise ValueError("method radar needs a controller (--controller PATH)")
            return self.stop_policy(seed, sampling)
        return ThresholdPolicy(method.threshold) if method.kind == "threshold" else FixedDepth(method.depth)

    def batched(self, rendezvous, guard: Callable[[], None] | None = None) -> "ModelPair":
        """This pair with its models' calls batched through `rendezvous` (radar.decoding.batching); its gate
        decides only for requests that start alone (`AloneGate`)."""
        from radar.decoding.batching import AloneGate, BatchedModel

        draft = BatchedModel(self.draft, rendezvous, guard) if self.draft is not None else None
        gate = AloneGate(self.gate, rendezvous) if self.gate is not None else None
        return replace(self, target=BatchedModel(self.target, rendezvous, guard), draft=draft, gate=gate)

    def encode(self, prompt: str, special_tokens: bool = True) -> list[int]:
        """Token ids of raw text, with the tokenizer's special tokens (BOS) where it adds them."""
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty")
        return self.tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"]

    def chat_ids(self, messages: str | Sequence[Message]) -> list[int]:
        """Token ids of a chat prompt: one user question, or a conversation of role/content messages."""
        text, special = render_chat(self.tokenizer, messages)
        return self.encode(text, special_tokens=special)

    def decode(self, token_ids: list[int]) -> str:
        """Text of token ids, special tokens left out. Exactly the tokenizer's own decoding, without transformers'
        optional space clean-up, so streamed text (decoded incrementally by the tokenizer) is the same text."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def generate(
        self,
        prompt_ids: list[int],
        method: Method | str = "ar",
        sampling: Sampling = Sampling(),
        max_new_tokens: int = 128,
        seed: int = 0,
        policy: StopPolicy | None = None,
        on_commit: OnCommit | None = None,
        logprobs: int | None = None,
    ) -> GenerationResult:
        """Decode with `ar`, `chain:D`, `tree:D`, `threshold:P` or `radar`; `policy` overrides the method's stop rule;
        `on_commit(tokens)` sees every step's committed tokens as they come (return False to stop); `logprobs=n`
        reports each token's log-prob and the n likeliest alternatives (`GenerationResult.logprobs`)."""
        method = Method.parse(method) if isinstance(method, str) else method
        generator = torch.Generator(self.target.device).manual_seed(seed)
        if method.speculative:
            policy = policy or self.stop_rule(method, sampling, seed)
        # A controller whose training found drafting slower than the target alone, here, runs the target alone;
        # one whose margin was too small to trust drafts or not as the gate has measured.
        drafts = method.speculative and getattr(policy, "drafts", True)
        gate = self.gate if drafts and method.kind == "radar" else None
        greedy = sampling.temperature == 0
        if gate is not None:
            drafts = gate.drafts(greedy)
        if not drafts:
            result = generate_ar(self.target, prompt_ids, sampling, max_new_tokens, generator, on_commit, logprobs)
        else:
            result = self._speculate(prompt_ids, method, policy, sampling, max_new_tokens, generator, on_commit,
                                     logprobs)
        if gate is not None:
            gate.observe(greedy, drafts, result.stats)
        return result

    def _speculate(self, prompt_ids: list[int], method: Method, policy: StopPolicy, sampling: Sampling,
                   max_new_tokens: int, generator: torch.Generator, on_commit: OnCommit | None,
                   logprobs: int | None) -> GenerationResult:
        if method.kind in ("radar", "threshold"):
            cfg = replace(self.tree, total_tokens=method.budget or self.tree.total_tokens)
        elif method.kind == "chain":
            cfg = TreeConfig(branching=1, max_calls=method.depth, total_tokens=method.depth)
        else:
            cfg = replace(self.tree, max_calls=method.depth, total_tokens=method.budget or self.tree.total_tokens)
        return generate_speculative(
            self.target, self.drafter(), prompt_ids, cfg, policy, sampling, max_new_tokens, generator,
            on_commit, logprobs,
        )


def load_tokenizer(path: str | Path):
    """The checkpoint's Hugging Face tokenizer (tokenizer.json and its config)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types; the user needs one line
        raise ModelLoadError(f"{path}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
