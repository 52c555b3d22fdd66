"""The `radar train-draft` operation: an EAGLE-3 head trained for a target on the target's own answers.

Phases, each resumable in the work directory (a rerun skips what is done):
1. prompts: the given sets plus generated ones, and questions the target writes itself about topics;
2. answers: the target answers them with its chat template, on Ray actors, in shards (radar.cluster.answers);
   a few prompts from the end of the held-out sets are answered too, for the per-epoch acceptance curve;
3. draft vocabulary: the most frequent target tokens of the training prompts and answers;
4. features: one teacher-forced target pass per sequence (radar.cluster.draft_data);
5. training on Ray Train with training-time test (radar.cluster.train_draft), a checkpoint per epoch;
6. the head written to --out atomically in the published EAGLE-3 layout, logged and registered in MLflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from radar.common.files import new_dir, write_atomic
from radar.common.prompts import Prompt, load_prompts

REGISTERED_HEAD = "radar-eagle3-head"
HEAD_FILES = ("config.json", "model.safetensors")


@dataclass
class TrainDraftConfig:
    """Everything `train_draft` does; saved beside the head (train_draft.json) and logged to MLflow."""

    model: str
    out: str
    prompts: tuple[str, ...] = ("mt_bench",)  # bundled set names or jsonl files, used as given
    generated: int = 1000  # template prompts (arithmetic, coding, instructions, pydoc topics)
    topic_questions: int = 200  # questions the target writes about topics (before answering them)
    eval_prompts: tuple[str, ...] = ("gsm8k", "mbpp", "alpaca")  # held-out sets: the last eval_limit of each
    eval_limit: int = 8
    max_new_tokens: int = 192
    temperature: float = 0.0  # of the target's answers (0: greedy)
    answer_batch: int = 48
    answer_workers: int = 2
    draft_vocab: int = 8192  # capped to the target's vocabulary
    layer_ids: tuple[int, ...] | None = None  # None: EAGLE-3's low, middle and high layers
    unroll: int = 4  # training-time test steps
    epochs: int = 4
    batch_size: int = 16  # sequences per optimizer step, over all workers
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_len: int = 768  # tokens per training sequence (longer ones are cut)
    bf16: bool = True  # autocast on CPU workers and the feature pass in bfloat16
    train_workers: int = 1
    use_gpu: bool = False
    threads: int = 1  # torch threads per process
    seed: int = 0
    init: str | None = None  # an existing head to continue from (its draft vocabulary is kept)
    work: str | None = None  # default: OUT-work beside --out
    track: bool = True
    register: bool = True
    progress: bool = True

    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(f"{str(self.out).rstrip('/')}-work")

    def check(self) -> None:
        """ValueError for settings no run can use."""
        for name in ("generated", "topic_questions", "eval_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("max_new_tokens", "answer_batch", "answer_workers", "draft_vocab", "unroll", "epochs",
                     "batch_size", "max_len", "train_workers", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.batch_size % self.train_workers:
            raise ValueError(f"--batch-size {self.batch_size} must split evenly over {self.train_workers} workers")


@dataclass
class TrainDraftResult:
    out: Path
    data: dict  # prompts, sequences, tokens
    seconds: dict  # per phase
    curve: list[dict]  # per epoch: loss, held-out acceptance per unroll step, training seconds
    run_id: str | None = None
    version: int | None = None
    config: dict = field(default_factory=dict)


def check_target(model: str, draft_vocab: int, layer_ids: tuple[int, ...] | None, init: str | None = None):
    """The target's config and the head config for it; ValueError when the target lacks the layers it needs or
    the head to continue from is for another vocabulary."""
    from radar.decoding.eagle3 import Eagle3Config, default_layer_ids, is_eagle3_dir
    from radar.decoding.model import ModelConfig, load_hf_config

    target = ModelConfig.from_hf(load_hf_config(Path(model)))
    n = target.num_hidden_layers
    if init is not None:
        if not is_eagle3_dir(init):
            raise ValueError(f"--init {init}: not an EAGLE-3 head directory (config.json architectures)")
        head = Eagle3Config.from_dir(Path(init))
        if head.layer.vocab_size != target.vocab_size or head.target_hidden_size != target.hidden_size:
            raise ValueError(f"--init {init}: the head is for a {head.layer.vocab_size}-token vocabulary and hidden "
                             f"size {head.target_hidden_size}, the target has {target.vocab_size} and {target.hidden_size}")
        draft_vocab, layer_ids = head.draft_vocab_size, head.layer_ids or layer_ids
    ids = tuple(layer_ids) if layer_ids is not None else default_layer_ids(n)
    if any(not 0 <= i < n for i in ids):
        raise ValueError(f"{model}: the target has {n} layers; the head reads layers {list(ids)} (choose ids in 0..{n - 1})")
    return target, Eagle3Config.for_target(target, min(draft_vocab, target.vocab_size), ids)


def held_out_tail(specs: tuple[str, ...], limit: int) -> list[Prompt]:
    """The last `limit` prompts of each held-out set (benchmarks take the first ones, so they stay unseen)."""
    out = []
    for spec in specs:
        prompts = load_prompts(spec)
        out.extend(prompts[-limit:] if limit else [])
    return out


def gather_prompts(cfg: TrainDraftConfig, work: Path, ray_kwargs: dict, log) -> list[Prompt]:
    """Phase 1: the training prompts, with the questions the target wrote about topics."""
    from radar.cluster.answers import AnswerConfig, answer_prompts, read_answers
    from radar.ops.draft_prompts import (
        build_prompts,
        drop_held_out,
        questions_from_replies,
        topic_requests,
    )

    prompts = build_prompts(cfg.prompts, cfg.generated, cfg.seed)
    if cfg.topic_questions:
        from transformers import AutoTokenizer

        requests = topic_requests(cfg.topic_questions, cfg.seed)
        answer_prompts(requests, work / "topic-replies", AnswerConfig(
            model=cfg.model, max_new_tokens=48, temperature=1.0, batch_size=cfg.answer_batch, seed=cfg.seed,
            dtype="bfloat16" if cfg.bf16 else "float32"), desc="topic questions", progress=cfg.progress, **ray_kwargs)
        tok = AutoTokenizer.from_pretrained(cfg.model)
        replies = [(r["id"], tok.decode(r["answer_ids"], skip_special_tokens=True)) for r in read_answers(work / "topic-replies")]
        questions = drop_held_out(questions_from_replies(replies))
        log(f"the target wrote {len(questions)} usable questions from {len(requests)} topic requests")
        prompts += questions
    if not prompts:
        raise ValueError("the prompt set is empty (held-out GSM8K/MBPP/Alpaca prompts are never trained on): "
                         "give --prompts with other sets or --generated N")
    return prompts


def answer_all(cfg: TrainDraftConfig, work: Path, prompts: list[Prompt], ray_kwargs: dict) -> tuple[list, list]:
    """Phase 2: (training rows, held-out rows) of the target's own answers."""
    from radar.cluster.answers import AnswerConfig, answer_prompts, read_answers

    acfg = AnswerConfig(model=cfg.model, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        batch_size=cfg.answer_batch, seed=cfg.seed, dtype="bfloat16" if cfg.bf16 else "float32")
    answer_prompts(prompts, work / "answers", acfg, desc="answers", progress=cfg.progress, **ray_kwargs)
    held = held_out_tail(cfg.eval_prompts, cfg.eval_limit)
    if held:
        answer_prompts(held, work / "eval-answers", acfg, desc="held-out answers", progress=cfg.progress, **ray_kwargs)
    return read_answers(work / "answers"), read_answers(work / "eval-answers") if held else []


def init_vocab(path: str):
    """The draft vocabulary (target ids) of an existing head."""
    import torch

    from radar.decoding.eagle3 import Eagle3Head

    head = Eagle3Head.from_pretrained(path)
    return head.target_ids(torch.arange(head.config.draft_vocab_size))


def write_head(state: dict, model: str, loop, out: Path, summary: dict) -> None:
    """The trained head in the published layout (bf16, without the target's embedding), written atomically."""
    import torch

    from radar.decoding.eagle3 import Eagle3Config, Eagle3Head
    from radar.decoding.model import ModelConfig, load_hf_config

    target = ModelConfig.from_hf(load_hf_config(Path(model)))
    head = Eagle3Head(Eagle3Config.for_target(target, len(loop.vocab), loop.layer_ids), embedding=False)
    head.load_state_dict(state["head"], strict=True)
    head = head.to(torch.bfloat16)
    head.d2t.copy_(state["head"]["d2t"])
    with new_dir(out) as tmp:
        head.save_pretrained(tmp)
        write_atomic(tmp / "train_draft.json", json.dumps(summary, indent=2) + "\n")


def train_draft(cfg: TrainDraftConfig, log=print) -> TrainDraftResult:
    """Build the data, train the head on Ray Train, write it to `cfg.out`, and log and register it in MLflow."""
    import torch

    from radar.cluster.draft_data import (
        draft_vocabulary,
        extract_features,
        features_match,
        vocabulary_coverage,
    )
    from radar.cluster.ray_session import cluster_gpus, ensure_ray
    from radar.cluster.train_draft import LoopConfig, fit_head

    cfg.check()
    target, head_cfg = check_target(cfg.model, cfg.draft_vocab, cfg.layer_ids, cfg.init)
    work, seconds = cfg.work_dir(), {}
    started_ray = ensure_ray(max(2, cfg.answer_workers, cfg.train_workers), log=log)
    try:
        use_gpu = cfg.use_gpu and cluster_gpus() > 0
        ray_kwargs = dict(workers=cfg.answer_workers, cpus_per_worker=1.0)
        t = time.perf_counter()
        prompts = gather_prompts(cfg, work, ray_kwargs, log)
        seconds["prompts"] = time.perf_counter() - t
        t = time.perf_counter()
        rows, held_rows = answer_all(cfg, work, prompts, ray_kwargs)
        if not held_rows:  # no held-out sets asked for: hold out a slice of the training prompts instead
            cut = max(1, len(rows) // 20)
            rows, held_rows = rows[cut:], rows[:cut]
        seconds["answers"] = time.perf_counter() - t
        vocab = init_vocab(cfg.init) if cfg.init else draft_vocabulary(rows, head_cfg.draft_vocab_size, target.vocab_size)
        t = time.perf_counter()
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        files = {}
        for name, part in (("train", rows), ("eval", held_rows)):
            files[name] = work / f"features-{name}.safetensors"
            if not features_match(files[name], head_cfg.layer_ids, len(part), cfg.max_len):
                extract_features(cfg.model, part, head_cfg.layer_ids, files[name], dtype=dtype, max_len=cfg.max_len,
                                 progress=cfg.progress)
        seconds["features"] = time.perf_counter() - t
        loop = LoopConfig(model=cfg.model, train_file=str(files["train"]), eval_file=str(files["eval"]),
                          vocab=tuple(vocab.tolist()), layer_ids=tuple(head_cfg.layer_ids), unroll=cfg.unroll,
                          epochs=cfg.epochs, batch_size=cfg.batch_size, micro_batch=min(4, cfg.batch_size // cfg.train_workers),
                          lr=cfg.lr, weight_decay=cfg.weight_decay, bf16=cfg.bf16, threads=cfg.threads, seed=cfg.seed,
                          init=cfg.init)
        t = time.perf_counter()
        state, curve = fit_head(loop, work / "ray", workers=cfg.train_workers, use_gpu=use_gpu, progress=cfg.progress)
        seconds["train"] = time.perf_counter() - t
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    data = {"prompts": len(prompts), "sequences": len(rows), "held_out_sequences": len(held_rows),
            "prompt_tokens": sum(len(r["prompt_ids"]) for r in rows), "answer_tokens": sum(len(r["answer_ids"]) for r in rows),
            "draft_vocab": len(vocab), "answer_coverage": vocabulary_coverage(rows, vocab),
            "held_out_coverage": vocabulary_coverage(held_rows, vocab)}
    summary = {"config": asdict(cfg), "data": data, "seconds": seconds, "curve": curve}
    write_head(state, cfg.model, loop, Path(cfg.out), summary)
    result = TrainDraftResult(out=Path(cfg.out), data=data, seconds=seconds, curve=curve, config=asdict(cfg))
    if cfg.track:
        track(cfg, result)
    return result


def track(cfg: TrainDraftConfig, result: TrainDraftResult) -> None:
    """Log the run (params, the curve per epoch, the head) and register the head as `radar-eagle3-head@champion`."""
    from radar.common import tracking

    with tracking.run(tracking.TRAIN_DRAFT_EXPERIMENT, params={k: v for k, v in asdict(cfg).items() if k not in ("progress", "track")}) as run:
        for point in result.curve:
            tracking.log_metrics({k: v for k, v in point.items() if k != "epoch"}, step=int(point["epoch"]))
        tracking.log_metrics({"data": result.data, "seconds": result.seconds})
        result.run_id = run.info.run_id
    if cfg.register:
        final = result.curve[-1] if result.curve else {}
        result.version = tracking.register_model_dir(
            result.out, result.run_id, REGISTERED_HEAD, tracking.CHAMPION, metrics={k: v for k, v in final.items()},
            artifact="eagle3-head", description="EAGLE-3 draft heads trained by radar train-draft")


def download_head(uri: str) -> Path:
    """A local directory for a registered head (models:/radar-eagle3-head@champion or /VERSION), cached."""
    from radar.common.tracking import download_model_dir

    return download_model_dir(uri, HEAD_FILES, "EAGLE-3 head")
