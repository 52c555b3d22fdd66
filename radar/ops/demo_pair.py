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

Why the defaults look the way they do (measured on a shared 2-core CPU, see `DemoConfig`):
- One intra-op thread. With two, OpenMP waits on a second core that other work keeps taking: in a 90 s probe a
  2-thread matmul ran at 15-20 GFLOPS (against 80 single-threaded) about 40% of the time, so two threads made
  the build slower on average and its length unpredictable.
- A narrow target (hidden 128, 8 layers, 2.6M parameters). Training is what the ~10-minute budget limits (about
  1.7 s per 4096-token step), while a decode step costs mostly a fixed amount per layer, not per parameter:
  hidden 128 costs 5.5 ms per token against ~9-16 ms for hidden 256 at about half the training cost per token.
- A sharpened target (`logit_scale`) so that temperature-1 decoding is not word salad and speculation has
  something to accept at temperature 1 as well as at temperature 0.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sysconfig
import tempfile
import textwrap
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from radar.decoding.model import ModelConfig, Transformer
from radar.decoding.chat import PLAIN_TEMPLATE

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
    # model at temperature 1 / logit_scale. A model this small is far less sure of itself than a chat LLM (about
    # 4.8 nats per token on its own temperature-1 answers; about 0.9 at scale 3): unscaled, its temperature-1
    # text is word salad, and the verifier, which accepts a drafted token with the target's probability of it,
    # accepts almost nothing (tau 1.2 at depth 4). Greedy decoding is unaffected.
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


def _stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted, without tests, third-party packages or generated tables."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "dist-packages", "idle_test", "__pycache__", "encodings", "pydoc_data"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("test"))
        out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _summary(doc: str) -> str:
    """The first paragraph of a docstring on one line, without its closing period."""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    return first.rstrip(".:")


_SIGNATURE = re.compile(r"[\w.]+\(")  # a summary that is a call signature, as C-style docstrings start


def _qa(cfg: DemoConfig, question: str, answer: str) -> str:
    return cfg.prompt_template.format(question=question) + " " + answer


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return options[rng.randrange(len(options))]


_CODE_QUESTIONS = (
    "Write a Python function to {s}.",
    "Write a function `{name}` that does the following: {s}.",
    "How would you {s} in Python?",
    "Can you write the Python function `{name}`? It should {s}.",
)
_CLASS_QUESTIONS = (
    "Write a Python class for the following: {s}.",
    "Write a class `{name}`: {s}.",
)
_CODE_LEADS = (
    "Sure, here is one way to do it.",
    "Here is a Python implementation:",
    "The following function does this.",
    "Here is the code.",
)
_EXPLAIN_QUESTIONS = (
    "What does `{qual}` in the `{mod}` module do?",
    "Explain the `{name}` {kind} from Python's `{mod}` module.",
    "What is `{qual}` used for?",
    "Describe what `{qual}` does.",
    "Write a short explanation of the `{name}` {kind} in `{mod}`.",
)


def _file_documents(source: str, module: str, cfg: DemoConfig, rng: random.Random) -> tuple[list[str], list[str]]:
    """Question/answer pairs drawn from one module: (code answers from docstrings, English explanations)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return [], []
    code_qa, english = [], []
    mod_doc = ast.get_docstring(tree)
    if mod_doc and 80 <= len(mod_doc) <= cfg.max_answer_chars:
        english.append(_qa(cfg, f"What is the Python `{module}` module for?", inspect.cleandoc(mod_doc)))
    lines = source.splitlines()
    queue = deque((node, "") for node in tree.body)
    while queue:
        node, prefix = queue.popleft()
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        qual = prefix + node.name
        if isinstance(node, ast.ClassDef):
            queue.extend((child, qual + ".") for child in node.body)
        doc = ast.get_docstring(node)
        if node.name.startswith("_") or not doc:
            continue
        kind = "class" if isinstance(node, ast.ClassDef) else "method" if prefix else "function"
        summary = _summary(doc)
        if 12 <= len(summary) <= 200 and not _SIGNATURE.match(summary):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            code = textwrap.dedent("\n".join(lines[start : node.end_lineno]))  # methods lose their class indent
            if len(code) <= cfg.max_answer_chars:
                questions = _CLASS_QUESTIONS if kind == "class" else _CODE_QUESTIONS
                question = _pick(rng, questions).format(s=_lower_first(summary), name=node.name)
                code_qa.append(_qa(cfg, question, f"{_pick(rng, _CODE_LEADS)}\n\n```python\n{code}\n```"))
        text = inspect.cleandoc(doc)
        if 60 <= len(text) <= cfg.max_answer_chars:
            question = _pick(rng, _EXPLAIN_QUESTIONS).format(qual=qual, name=node.name, kind=kind, mod=module)
            english.append(_qa(cfg, question, f"`{qual}` is a {kind} in `{module}`. {text}"))
    return code_qa, english


def _topic_documents(cfg: DemoConfig, rng: random.Random) -> list[str]:
    """pydoc's help topics (the language reference, in English), as question/answer pairs of a few paragraphs."""
    from pydoc_data.topics import topics

    questions = (
        "Explain {t} in Python.",
        "What should I know about {t} in Python?",
        "Tell me about {t}.",
        "Write a short explanation of {t} in Python.",
        "Describe {t}.",
    )
    docs = []
    for key in sorted(topics):
        chunks: list[str] = [""]
        for para in topics[key].strip("\n").split("\n\n"):
            para = para.strip("\n")[: cfg.max_answer_chars]
            if len(chunks[-1]) + len(para) + 2 > cfg.max_answer_chars:
                chunks.append("")
            chunks[-1] = f"{chunks[-1]}\n\n{para}" if chunks[-1] else para
        for chunk in chunks:
            if len(chunk) >= 200:
                docs.append(_qa(cfg, _pick(rng, questions).format(t=key.replace("-", " ")), chunk))
    return docs


_NAMES = ("Tom", "Sara", "Ali", "Maria", "John", "Lena", "Ken", "Priya", "David", "Emma", "Omar", "Julia")
_ITEMS = ("apples", "books", "pencils", "cookies", "marbles", "stickers", "cards", "eggs", "shirts", "stamps")


def _math_documents(cfg: DemoConfig, rng: random.Random) -> list[str]:
    """Templated arithmetic word problems with worked answers (GSM8K-like in form, nothing like it in difficulty)."""
    docs = []
    for _ in range(cfg.math_problems):
        name, item = _pick(rng, _NAMES), _pick(rng, _ITEMS)
        a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 12)
        kind = rng.randrange(4)
        if kind == 0:
            g = rng.randint(1, a + b - 1)
            q = (f"{name} has {a} {item}. {name} buys {b} more and then gives {g} to a friend. "
                 f"How many {item} does {name} have now?")
            ans = (f"{name} starts with {a} {item}. After buying {b} more, {name} has {a} + {b} = {a + b} {item}. "
                   f"After giving away {g}, {name} has {a + b} - {g} = {a + b - g} {item}. The answer is {a + b - g}.")
        elif kind == 1:
            q = f"Each box holds {c} {item}. {name} has {b} boxes. How many {item} are there in total?"
            ans = (f"There are {b} boxes with {c} {item} each, so there are {b} * {c} = {b * c} {item}. "
                   f"The answer is {b * c}.")
        elif kind == 2:
            q = f"{name} shares {b * c} {item} equally among {c} friends. How many {item} does each friend get?"
            ans = (f"{name} has {b * c} {item} for {c} friends, so each friend gets {b * c} / {c} = {b} {item}. "
                   f"The answer is {b}.")
        else:
            q = (f"A ticket costs ${c}. {name} buys {b} tickets and pays with ${b * c + a}. "
                 f"How much change does {name} get?")
            ans = (f"{b} tickets cost {b} * {c} = ${b * c}. {name} pays ${b * c + a}, so the change is "
                   f"{b * c + a} - {b * c} = ${a}. The answer is {a}.")
        docs.append(_qa(cfg, q, ans))
    return docs


def build_corpus(cfg: DemoConfig) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) documents: raw stdlib sources and question/answer pairs, capped in size."""
    rng = random.Random(cfg.seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files()
    rng.shuffle(files)  # a seeded order, so a small cap still samples the whole library
    caps = [int(cfg.max_corpus_chars * f) for f in (cfg.raw_code_fraction, cfg.code_qa_fraction)]
    caps.append(cfg.max_corpus_chars - sum(caps))
    pools: list[list[str]] = [[], [], _topic_documents(cfg, rng) + _math_documents(cfg, rng)]
    sizes = [0, 0, sum(map(len, pools[2]))]
    for path in files:
        if all(size >= cap for size, cap in zip(sizes, caps)):
            break
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        raw = source[: cfg.max_file_chars].rsplit("\n", 1)[0] if len(source) > cfg.max_file_chars else source
        module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        for i, new in enumerate(([raw], *_file_documents(source, module, cfg, rng))):
            if sizes[i] < caps[i]:
                pools[i] += new
                sizes[i] += sum(map(len, new))
    docs = []
    for pool, cap in zip(pools, caps):
        rng.shuffle(pool)
        docs += _take(pool, cap)
    rng.shuffle(docs)
    n_held = max(1, int(len(docs) * cfg.holdout_fraction))
    return docs[n_held:], docs[:n_held]


def _take(docs: list[str], cap: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if total >= cap:
            break
        out.append(d)
        total += len(d)
    return out


# --------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], cfg: DemoConfig):
    """A byte-level BPE (`tokenizers.Tokenizer`) that adds <s> in front of every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return tok


def save_tokenizer(tok, path: Path, cfg: DemoConfig) -> None:
    """tokenizer.json plus the two small files that make AutoTokenizer build a PreTrainedTokenizerFast."""
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def encode_documents(tok, docs: list[str]) -> torch.Tensor:
    """One token stream: <s> doc </s> <s> doc </s> ... (int64)."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# -------------------------------------------------------------------------------------------------- training


def _init_weights(model: Transformer) -> None:
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


def train_target(
    model: Transformer, stream: torch.Tensor, cfg: DemoConfig, gen: torch.Generator, progress: bool
) -> float:
    """Next-token cross-entropy with AdamW and a cosine schedule; returns the mean loss of the last 10% of steps."""
    opt = _optimizer(model, cfg.target_lr, cfg.weight_decay)
    losses = []
    model.train()
    with _progress(cfg.target_steps, "target", progress) as bar:
        for step in range(cfg.target_steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg.target_steps, cfg.target_lr, cfg.warmup_steps)
            x = _batch(stream, cfg.batch_size, cfg.seq_len, gen)
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
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


def init_draft(target: Transformer, cfg: DemoConfig, bos: int, eos: int) -> Transformer:
    """A `draft_layers`-layer model; when asked, a copy of the target's embeddings, first layers, norm and head."""
    draft = Transformer(cfg.model_config(cfg.draft_layers, bos, eos))
    _init_weights(draft)
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
    opt = _optimizer(draft, cfg.draft_lr, 0.0)
    n_policy = round(cfg.batch_size * cfg.onpolicy_fraction) if len(pool) else 0
    losses = []
    draft.train()
    with _progress(cfg.draft_steps, "draft", progress) as bar:
        for step in range(cfg.draft_steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg.draft_steps, cfg.draft_lr, cfg.warmup_steps)
            x = _batch(stream, cfg.batch_size - n_policy, cfg.seq_len, gen)[:, :-1]
            if n_policy:
                x = torch.cat([x, pool[torch.randint(0, len(pool), (n_policy,), generator=gen)]])
            with torch.no_grad():
                t_logits = target(x)
            loss = _kl(t_logits, draft(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(kl=f"{loss.item():.3f}")
    draft.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


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


def _n_params(model: Transformer) -> int:
    return sum(p.numel() for p in model.parameters())


def build_demo_pair(out_dir: str | Path, cfg: DemoConfig | None = None, progress: bool = True) -> tuple[Path, Path]:
    """Build the pair into `out_dir`/target and `out_dir`/draft (Hugging Face format, tokenizer in both),
    with `out_dir`/demo.json describing the build. Returns (target_dir, draft_dir)."""
    cfg = cfg or DemoConfig()
    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _build(out_dir, cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path, cfg: DemoConfig, progress: bool) -> tuple[Path, Path]:
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    train_docs, held_docs = build_corpus(cfg)
    times["corpus_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    tok = train_tokenizer(train_docs, cfg)
    train_ids, held_ids = encode_documents(tok, train_docs), encode_documents(tok, held_docs)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    times["tokenizer_s"] = time.perf_counter() - t
    if len(train_ids) <= cfg.seq_len + 1 or len(held_ids) < 16:
        raise ValueError(
            f"corpus too small ({len(train_ids)} training tokens) for seq_len {cfg.seq_len}: raise max_corpus_chars"
        )

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t = time.perf_counter()
    target = Transformer(cfg.model_config(cfg.target_layers, bos, eos))
    _init_weights(target)
    target_loss = train_target(target, train_ids, cfg, gen, progress)
    losses = {"target_train_ce": target_loss, "target_heldout_ce": heldout_loss(target, held_ids, cfg)}
    with torch.no_grad():
        target.lm_head.weight.mul_(cfg.logit_scale)
    losses["target_heldout_ce_saved"] = heldout_loss(target, held_ids, cfg)
    times["target_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    draft = init_draft(target, cfg, bos, eos)
    pool = onpolicy_pool(target, train_ids, tok, cfg, gen, progress)
    times["draft_data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    losses["draft_train_kl"] = distill_draft(draft, target, train_ids, pool, cfg, gen, progress)
    times["draft_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = evaluate_pair(target, draft, held_ids, tok, cfg)
    times["eval_s"] = time.perf_counter() - t

    target_dir, draft_dir = out_dir / "target", out_dir / "draft"
    for model, path in ((target, target_dir), (draft, draft_dir)):
        model.save_pretrained(path)
        save_tokenizer(tok, path, cfg)
    times["total_s"] = time.perf_counter() - t0
    manifest = {
        "config": asdict(cfg),
        "seed": cfg.seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "corpus": {
            "train_documents": len(train_docs),
            "heldout_documents": len(held_docs),
            "train_chars": sum(map(len, train_docs)),
            "train_tokens": len(train_ids),
            "heldout_tokens": len(held_ids),
            "sha256": hashlib.sha256("\x00".join(train_docs).encode()).hexdigest(),
        },
        "params": {"target": _n_params(target), "draft": _n_params(draft)},
        "tokens_seen": {
            "target": cfg.target_steps * cfg.batch_size * cfg.seq_len,
            "draft": cfg.draft_steps * cfg.batch_size * cfg.seq_len,
        },
        "final_losses": losses,
        "metrics": metrics,
        "times": times,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return target_dir, draft_dir


# ---------------------------------------------------------------------------------------------- the cached pair


def default_demo_dir() -> Path:
    """$RADAR_HOME/demo, else $XDG_CACHE_HOME/radar/demo, else ~/.cache/radar/demo."""
    if os.environ.get("RADAR_HOME"):
        return Path(os.environ["RADAR_HOME"]).expanduser() / "demo"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "radar" / "demo"


def _is_complete(path: Path, cfg: DemoConfig) -> bool:
    """Both model directories are whole and demo.json says they were built with `cfg`."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("config") != json.loads(json.dumps(asdict(cfg))):
        return False
    return all((path / sub / f).is_file() for sub in ("target", "draft") for f in MODEL_FILES)


def ensure_demo_pair(
    cfg: DemoConfig | None = None, out_dir: str | Path | None = None, progress: bool = True
) -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the demo pair in `out_dir` (default: `default_demo_dir()`), built first when it
    is missing, incomplete or was built with another config. The build goes to a temporary sibling directory that
    is renamed into place only when complete."""
    cfg = cfg or DemoConfig()
    out_dir = Path(out_dir) if out_dir is not None else default_demo_dir()
    if _is_complete(out_dir, cfg):
        return out_dir / "target", out_dir / "draft"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-build-", dir=out_dir.parent))
    try:
        build_demo_pair(tmp, cfg, progress=progress)
        if out_dir.exists():  # stale or broken: move aside first, so the rename below is atomic
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
            os.replace(out_dir, old / "pair")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not _is_complete(out_dir, cfg):  # anything but another process having finished the same build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "target", out_dir / "draft"


def load_manifest(out_dir: str | Path | None = None) -> dict:
    """The demo.json of a built pair."""
    return json.loads((Path(out_dir) if out_dir is not None else default_demo_dir()).joinpath(MANIFEST).read_text())


__all__ = [
    "DemoConfig",
    "build_corpus",
    "build_demo_pair",
    "default_demo_dir",
    "ensure_demo_pair",
    "load_manifest",
    "train_tokenizer",
]
