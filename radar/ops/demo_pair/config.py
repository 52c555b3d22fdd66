"""The demo pair's settings and file names."""

from __future__ import annotations

from dataclasses import dataclass

from radar.decoding.chat import PLAIN_TEMPLATE
from radar.decoding.model import ModelConfig

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3
UNK, BOS, EOS, PAD = SPECIAL_TOKENS
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_FILES = ("config.json", "model.safetensors") + TOKENIZER_FILES
MANIFEST = "demo.json"
# Held-in chat prompts whose target continuations the manifest's agreement figures are measured on.
PROBE_PROMPTS = (
    "Write a Python function to return the largest element of a list.",
    "Explain the difference between a list and a tuple in Python.",
    "What does the `os.path.join` function do?",
    "Describe a good way to read a text file line by line.",
    "Tom has 12 apples and buys 7 more. How many apples does he have now?",
    "Give three tips for writing clear documentation.",
)


@dataclass
class DemoConfig:
    """Everything that determines the demo pair; saved in demo.json and compared by `ensure_demo_pair`."""

    seed: int = 0
    prompt_template: str = PLAIN_TEMPLATE  # how chat-style documents are laid out (what `ModelPair.chat_ids` sends)
    threads: int = 1  # torch intra-op threads during the build (0: leave torch's setting); see the module doc
    # corpus
    max_corpus_chars: int = 5_000_000
    # Shares of the corpus: raw source files, "write code" question/answer pairs, and English-answer pairs
    # (docstring explanations, help topics, word problems) take the rest.
    raw_code_fraction: float = 0.3
    code_qa_fraction: float = 0.3
    max_file_chars: int = 40_000  # a raw source file longer than this is cut at a line boundary
    max_answer_chars: int = 2_500  # question/answer pairs with a longer answer are left out
    math_problems: int = 1500
    holdout_fraction: float = 0.02
    # tokenizer
    vocab_size: int = 4096
    # shapes
    hidden_size: int = 128
    intermediate_size: int = 344
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    target_layers: int = 8
    draft_layers: int = 1
    max_position_embeddings: int = 2048
    # target training
    seq_len: int = 256
    batch_size: int = 16
    target_steps: int = 200
    target_lr: float = 5e-3
    warmup_steps: int = 15
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # The saved target's lm_head is the trained one times this, so sampling it at temperature 1 samples the trained
    # model at temperature 1 / logit_scale. A model this small is far less sure of itself than a chat LLM: unscaled,
    # its temperature-1 text is word salad, and the verifier, which accepts a drafted token with the target's
    # probability of it, accepts almost nothing (benchmarks/README.md). Greedy decoding is unaffected.
    logit_scale: float = 3.0
    # draft distillation
    draft_steps: int = 100
    draft_lr: float = 2e-3
    draft_init_from_target: bool = True  # copy embeddings, first layers, final norm and lm_head from the target
    onpolicy_fraction: float = 0.5  # share of each distillation batch that is the target's own continuations
    onpolicy_greedy_fraction: float = 0.5  # of those, the share decoded greedily (the rest at temperature 1)
    onpolicy_prompt_tokens: int = 64
    onpolicy_reuse: int = 2  # each generated row is drawn about this many times
    onpolicy_gen_batch: int = 64
    # evaluation
    eval_batches: int = 4  # held-out windows of seq_len tokens, 4 per batch
    eval_new_tokens: int = 128  # tokens the target continues each probe prompt by

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if min(self.raw_code_fraction, self.code_qa_fraction) < 0 or self.raw_code_fraction + self.code_qa_fraction > 1:
            raise ValueError("raw_code_fraction and code_qa_fraction must be >= 0 and sum to at most 1")
        if not 0 <= self.onpolicy_fraction <= 1:
            raise ValueError("onpolicy_fraction must lie in [0, 1]")
        if self.draft_init_from_target and self.draft_layers > self.target_layers:
            raise ValueError("a draft initialised from the target cannot have more layers than it")
        if self.prompt_template.count("{question}") != 1:
            raise ValueError("prompt_template must contain {question} once")
        if self.logit_scale <= 0:
            raise ValueError("logit_scale must be > 0")
        if self.onpolicy_reuse < 1 or self.onpolicy_gen_batch < 1:
            raise ValueError("onpolicy_reuse and onpolicy_gen_batch must be >= 1")
        if self.onpolicy_fraction and self.onpolicy_prompt_tokens >= self.seq_len:
            raise ValueError("onpolicy_prompt_tokens must be shorter than seq_len")

    def model_config(self, layers: int, bos: int, eos: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=1e-5,
            bos_token_id=bos,
            eos_token_id=[eos],
        )


# ------------------------------------------------------------------------------------------------------ corpus
