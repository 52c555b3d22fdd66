"""Hugging Face `transformers` generation on the same checkpoints: the baselines `hf`, `hf-assisted` (the draft as
assistant model) and `hf-pld` (prompt-lookup decoding: candidates copied from n-grams of the context, no draft)."""

from __future__ import annotations

import torch

from radar.decoding.verify import Sampling

HF_METHODS = ("hf", "hf-assisted", "hf-pld")
PLD_TOKENS = 10  # candidates per lookup, the value transformers' docs and the method's authors use


class HFRunner:
    """transformers' own generate, plain, assisted or by prompt lookup, on the same checkpoints."""

    def __init__(self, model: str, draft: str | None, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.device = device
        self.target = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
        self.draft = AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).to(device).eval() if draft else None
        eos = self.target.generation_config.eos_token_id
        self.pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)

    @torch.inference_mode()
    def __call__(self, method: str, ids: list[int], sampling: Sampling, max_new_tokens: int, seed: int) -> list[int]:
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad, do_sample=not sampling.greedy)
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if method == "hf-assisted":
            if self.draft is None:
                raise ValueError("method hf-assisted needs a draft model")
            kwargs["assistant_model"] = self.draft
        elif method == "hf-pld":
            kwargs["prompt_lookup_num_tokens"] = PLD_TOKENS
        torch.manual_seed(seed)
        x = torch.tensor([ids], device=self.device)
        out = self.target.generate(x, attention_mask=torch.ones_like(x), **kwargs)
        return out[0, len(ids) :].tolist()
