"""A tiny byte-level BPE tokenizer for test checkpoints, trained on a fixed text so every run gets the same one.

`add_tokenizer(model_dir)` writes tokenizer.json and its config next to a tiny checkpoint so that
`transformers.AutoTokenizer` (and everything in radar that loads a pair) can use the directory end to end.
"""

from __future__ import annotations

from pathlib import Path

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "Question: What is the capital of France?\nAnswer: Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "for i in range(10):\n    print(i * i)\n",
]
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2


def add_tokenizer(model_dir: str | Path, vocab_size: int = 320) -> Path:
    """Train a byte-level BPE of `vocab_size` tokens (>= 259) and save it into `model_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(model_dir))
    return Path(model_dir)
