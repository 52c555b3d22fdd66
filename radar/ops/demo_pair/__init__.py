"""The demo model pair: a small Llama target and a 1-layer draft, trained from scratch on this machine.

Nothing is downloaded. The corpus is text every Python installation carries: the standard library's sources, the
English docstrings in them and `pydoc_data`'s help topics, partly rewritten into question/answer pairs in the
plain prompt template (`Question: ...\nAnswer:`, what `ModelPair.chat_ids` sends), plus templated arithmetic
word problems, so that the target answers benchmark-style questions with something English-ish. Steps:

  corpus -> byte-level BPE tokenizer -> target (next-token cross-entropy, AdamW, cosine schedule)
  -> draft (copy of the target's embeddings, first layer and head, distilled with KL(target || draft) on corpus
  windows and on the target's own greedy and sampled continuations of prompts) -> both in Hugging Face format.

Everything is seeded, so a build is reproducible on one machine (same torch version and thread count).
`ensure_demo_pair()` builds into a temporary directory and renames it into place, so an interrupted build never
leaves half a pair behind.

Why the defaults look the way they do (the measurements are in benchmarks/README.md, "The demo pair"): one
intra-op thread, because on a shared 2-core CPU a second spinning thread made the build slower on average and its
length unpredictable; a narrow target (hidden 128, 8 layers), because training time is what the budget limits while
a decode step costs mostly a fixed amount per layer; and a sharpened target (`logit_scale`), so that temperature-1
decoding is not word salad and speculation has something to accept at temperature 1 too.
"""

from radar.ops.demo_pair.build import build_demo_pair, default_demo_dir, ensure_demo_pair, load_manifest
from radar.ops.demo_pair.config import MODEL_FILES, DemoConfig

__all__ = ["DemoConfig", "MODEL_FILES", "build_demo_pair", "default_demo_dir", "ensure_demo_pair", "load_manifest"]
