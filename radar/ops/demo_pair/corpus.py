"""The demo corpus (standard-library sources, docstrings, pydoc topics, arithmetic word problems) and its
byte-level BPE tokenizer."""

from __future__ import annotations

import ast
import inspect
import json
import os
import random
import re
import sysconfig
import textwrap
from collections import deque
from pathlib import Path

import torch

from radar.ops.demo_pair.config import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, DemoConfig


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
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

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
