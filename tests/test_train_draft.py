"""radar train-draft: training prompts, the training-time-test unroll, the recipe end to end on a tiny target, and
its Ray Train path (1 and 2 workers alike, resume from a checkpoint), with its one-line errors."""

from __future__ import annotations

from pathlib import Path

import json
from dataclasses import replace

import pytest
import torch
from tiny_models import make_tiny_eagle3, make_tiny_llama

from radar.cluster.draft_data import Batch, draft_vocabulary
from radar.cluster.draft_unroll import Unroll
from radar.cluster.train_draft import LoopConfig, fit_head
from radar.decoding.model import LayerCapture, Transformer
from radar.decoding.pair import ModelPair
from radar.ops.draft_prompts import (
    build_prompts,
    held_out_texts,
    normalise,
    questions_from_replies,
)
from radar.ops.train_draft import (
    TrainDraftConfig,
    check_target,
    download_head,
    train_draft,
)

# ---- prompts and vocabulary -------------------------------------------------------------------------------


def test_training_prompts_are_deterministic_from_the_seed():
    assert build_prompts(["mt_bench"], 200, seed=3) == build_prompts(["mt_bench"], 200, seed=3)
    assert build_prompts([], 50, seed=3) != build_prompts([], 50, seed=4)


def test_training_prompts_never_include_a_held_out_prompt():
    banned = held_out_texts()
    prompts = build_prompts(["mt_bench", "gsm8k", "mbpp", "alpaca"], 400, seed=0)
    assert prompts and not [p for p in prompts if normalise(p.text) in banned]
    assert {p.source for p in prompts} >= {"mt_bench", "generated:arithmetic", "generated:coding", "generated:pydoc"}


def test_only_replies_that_read_as_questions_become_prompts():
    replies = [("topic-request-0", "What makes honey last so long?\nIt is..."), ("topic-request-1", "Sure! Here is one"),
               ("topic-request-2", '"Why do bees dance?"'), ("topic-request-3", "")]
    assert [p.text for p in questions_from_replies(replies)] == ["What makes honey last so long?", "Why do bees dance?"]


def test_draft_vocabulary_takes_the_most_frequent_tokens_of_prompts_and_answers():
    rows = [{"prompt_ids": [7, 7, 7, 9], "answer_ids": [3, 3, 5]}, {"prompt_ids": [9], "answer_ids": [3]}]
    assert draft_vocabulary(rows, 3, 16).tolist() == [3, 7, 9]  # 7 and 9 appear only in prompts
    assert draft_vocabulary(rows, 6, 16).tolist() == [0, 1, 3, 5, 7, 9]  # topped up with the lowest unused ids
    assert draft_vocabulary(rows, 100, 16).numel() == 16  # capped to the target's vocabulary


# ---- the unroll is what the drafter does -------------------------------------------------------------------


def test_unroll_step_k_equals_the_head_drafting_k_deep(tmp_path):
    """Step k of training-time test at index t gives the hidden state the drafter computes for the node k - 1 deep
    below the root x_{t+1}, each fed its parent's output, with the prefix in the head's cache."""
    target = Transformer.from_pretrained(make_tiny_llama(tmp_path, vocab=128, layers=4, heads=4, kv_heads=2, seed=0))
    head = make_tiny_eagle3(target, draft_vocab=48, layer_ids=(0, 1, 2)).bind(target)
    n, steps, t = 12, 3, 5
    x = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0))
    capture = LayerCapture((0, 1, 2))
    target(x, capture=capture)
    width = n - 1 + steps
    pad = lambda v: torch.nn.functional.pad(v, (0, width - n))
    batch = Batch(capture.hidden[:, : n - 1], pad(x), torch.zeros(1, width, 64), pad(x), pad(torch.ones(1, n, dtype=torch.bool)))
    unroll = Unroll(head, torch.zeros(48, 64), steps)
    outs = []
    layer = unroll.layer
    unroll.layer = lambda *a: outs.append(layer(*a)) or outs[-1]
    with torch.no_grad():
        unroll(batch, batch.counts(steps))
        cache = head.new_cache(32)
        _, h = head(x[:, 1 : t + 2], head.project(capture.hidden[:, : t + 1]), torch.arange(1, t + 2)[None], cache)
        drafted = [h[0, -1]]
        h = h[:, -1:]
        for k in range(2, steps + 1):
            _, h = head(x[:, t + k : t + k + 1], h, torch.tensor([[t + k]]), cache, torch.ones(1, k - 1, dtype=torch.bool))
            drafted.append(h[0, -1])
    for k in range(steps):
        torch.testing.assert_close(outs[k][0, t], drafted[k], atol=1e-5, rtol=1e-5)


# ---- the recipe on a tiny target ---------------------------------------------------------------------------


def tiny_config(target, out, **kw) -> TrainDraftConfig:
    base = dict(model=str(target), out=str(out), prompts=(), generated=12, topic_questions=2, eval_limit=1,
                max_new_tokens=12, answer_batch=8, answer_workers=2, draft_vocab=128, unroll=3, epochs=2, batch_size=4,
                bf16=False, progress=False)
    return TrainDraftConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def recipe(tiny_pair, ray_session, tmp_path_factory):
    """One run of the whole recipe on the tiny target (1 training worker)."""
    out = tmp_path_factory.mktemp("draft") / "head"
    result = train_draft(tiny_config(tiny_pair[0], out), log=lambda _: None)
    return tiny_pair[0], out, result


def test_the_recipe_writes_a_head_that_decodes_exactly_like_the_target(recipe):
    target, out, result = recipe
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert len(result.curve) == 2 and result.data["answer_tokens"] > 0
    pair = ModelPair.load(target, out)
    prompt = pair.chat_ids("Write a Python function that adds two numbers.")
    ar = pair.generate(prompt, "ar", max_new_tokens=24).token_ids
    for method in ("chain:3", "tree:3"):
        assert pair.generate(prompt, method, max_new_tokens=24).token_ids == ar


def test_the_recipe_registers_the_head_in_mlflow(recipe):
    _, out, result = recipe
    assert result.version is not None
    local = download_head("models:/radar-eagle3-head@champion")
    assert (local / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_a_registered_head_is_a_draft_by_its_uri(recipe):
    from radar.ops.models import model_paths

    target, _, _ = recipe
    assert model_paths(target, "models:/radar-eagle3-head@champion") == (
        Path(target), download_head("models:/radar-eagle3-head@champion"))


def loop_for(recipe, **kw) -> LoopConfig:
    """The training the recipe ran, as the Ray Train loop's config."""
    target, out, _ = recipe
    work = out.parent / "head-work"
    summary = json.loads((out / "train_draft.json").read_text())
    head = json.loads((out / "config.json").read_text())
    from safetensors.torch import load_file

    d2t = load_file(str(out / "model.safetensors"))["d2t"]
    vocab = (torch.arange(d2t.numel()) + d2t).tolist()
    cfg = summary["config"]
    base = LoopConfig(model=str(target), train_file=str(work / "features-train.safetensors"),
                      eval_file=str(work / "features-eval.safetensors"), vocab=tuple(vocab),
                      layer_ids=tuple(head["eagle_config"]["eagle_aux_hidden_state_layer_ids"]), unroll=cfg["unroll"],
                      epochs=cfg["epochs"], batch_size=cfg["batch_size"], micro_batch=4, bf16=False, seed=cfg["seed"])
    return replace(base, **kw)


def curves_close(a: list[dict], b: list[dict], tol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            if key.startswith(("train_ce", "eval_ce", "acc")):
                assert x[key] == pytest.approx(y[key], rel=tol, abs=tol), key


def test_two_workers_follow_the_loss_curve_of_one(recipe, tmp_path):
    """Same global batches, a loss normalised by the global batch: only float summation order differs (fp32)."""
    _, _, result = recipe
    _, curve = fit_head(loop_for(recipe, micro_batch=2), tmp_path / "ray", workers=2, progress=False)
    curves_close(curve, result.curve, 1e-4)


def test_a_rerun_resumes_from_the_checkpoint_instead_of_starting_over(recipe, tmp_path):
    _, _, result = recipe
    _, first = fit_head(loop_for(recipe, stop_after=1), tmp_path / "ray", progress=False)
    assert len(first) == 1
    _, resumed = fit_head(loop_for(recipe), tmp_path / "ray", progress=False)
    assert resumed[0] == first[0]  # epoch 1 comes from the checkpoint (its timing too), not trained again
    curves_close(resumed, result.curve, 1e-4)  # and epoch 2 continues exactly where it stopped


def test_a_checkpoint_of_other_settings_is_refused(recipe):
    _, out, _ = recipe
    with pytest.raises(ValueError, match="trained with other settings"):
        fit_head(loop_for(recipe, lr=5e-4), out.parent / "head-work" / "ray", progress=False)


# ---- one-line errors ---------------------------------------------------------------------------------------


def test_a_target_without_the_layers_the_head_reads_is_refused(tiny_pair):
    with pytest.raises(ValueError, match="has 2 layers; the head reads layers"):
        check_target(str(tiny_pair[0]), 64, (0, 1, 5))


def test_an_empty_prompt_set_is_refused(tiny_pair, tmp_path):
    cfg = tiny_config(tiny_pair[0], tmp_path / "head", prompts=("gsm8k",), generated=0, topic_questions=0)
    with pytest.raises(ValueError, match="prompt set is empty"):
        train_draft(cfg, log=lambda _: None)


def test_a_head_for_another_vocabulary_is_refused(tiny_pair, tmp_path):
    other = Transformer.from_pretrained(make_tiny_llama(tmp_path, vocab=128, layers=2, seed=3))
    make_tiny_eagle3(other, draft_vocab=48).bind(other).save_pretrained(tmp_path / "other-head")
    with pytest.raises(ValueError, match="128-token vocabulary.*the target has 320"):
        check_target(str(tiny_pair[0]), 64, None, init=str(tmp_path / "other-head"))
