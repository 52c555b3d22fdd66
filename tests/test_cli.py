"""`radar generate`: JSON output, and a one-line error (exit code 2) for every input mistake it can catch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from radar.cli.app import app
from tiny_models import make_tiny_llama
from tiny_tokenizer import add_tokenizer

runner = CliRunner()


def generate(*args: str):
    return runner.invoke(app, ["generate", *args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error:"), message
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message, message


def test_generate_json_has_text_token_ids_and_statistics(tiny_pair):
    target, draft = tiny_pair
    result = generate("--model", str(target), "--draft", str(draft), "--prompt", "def add(a, b):",
                      "--method", "tree:3", "--max-new-tokens", "12", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 12
    assert isinstance(out["text"], str)
    for key in ("tau", "accept_lengths", "draft_calls_per_cycle", "target_calls", "wall_s", "tokens_per_s"):
        assert key in out


def test_generate_tree_and_ar_give_the_same_greedy_tokens(tiny_pair):
    target, draft = tiny_pair
    common = ["--model", str(target), "--draft", str(draft), "--prompt", "for i in range", "--max-new-tokens", "20", "--json"]
    ar = json.loads(generate(*common, "--method", "ar").stdout)
    tree = json.loads(generate(*common, "--method", "tree:4").stdout)
    chain = json.loads(generate(*common, "--method", "chain:3").stdout)
    assert tree["token_ids"] == ar["token_ids"] == chain["token_ids"]


def test_generate_defaults_to_the_fastest_method_for_the_precision(tiny_pair):
    target, draft = tiny_pair
    common = ["--model", str(target), "--prompt", "hi", "--max-new-tokens", "2", "--json"]
    method = lambda *extra: json.loads(generate(*common, *extra).stdout)["method"]  # noqa: E731
    assert method("--draft", str(draft), "--precision", "bfloat16") == "tree:3"
    assert method("--draft", str(draft), "--precision", "float32") == "ar"
    assert method("--precision", "bfloat16") == "ar"  # no draft


def test_the_console_script_runs_in_a_fresh_process(tiny_pair):
    target, _ = tiny_pair
    proc = subprocess.run(
        [sys.executable, "-m", "radar", "generate", "--model", str(target), "--prompt", "hello", "--method", "ar",
         "--max-new-tokens", "4", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) == 4


def test_missing_model_directory_is_a_one_line_error(tmp_path):
    assert_one_line_error(generate("--model", str(tmp_path / "nope"), "--prompt", "hi", "--method", "ar"), "not found")


def test_non_llama_model_directory_is_a_one_line_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert_one_line_error(generate("--model", str(tmp_path / "gpt2"), "--prompt", "hi", "--method", "ar"), "gpt2", "Llama")


def test_draft_with_another_vocabulary_is_a_one_line_error(tiny_pair, tmp_path):
    target, _ = tiny_pair
    other = add_tokenizer(make_tiny_llama(tmp_path, vocab=400, name="other"))
    assert_one_line_error(generate("--model", str(target), "--draft", str(other), "--prompt", "hi"), "vocabulary")


def test_empty_prompt_is_a_one_line_error(tiny_pair):
    target, draft = tiny_pair
    assert_one_line_error(generate("--model", str(target), "--draft", str(draft), "--prompt", "  "), "empty")


def test_prompt_longer_than_the_context_is_a_one_line_error(tiny_pair):
    target, draft = tiny_pair  # max_position_embeddings = 1024
    assert_one_line_error(generate("--model", str(target), "--draft", str(draft), "--prompt", "xz~" * 500), "context")


def test_max_new_tokens_below_one_is_a_one_line_error(tiny_pair):
    target, draft = tiny_pair
    assert_one_line_error(generate("--model", str(target), "--draft", str(draft), "--prompt", "hi", "--max-new-tokens", "0"), "max-new-tokens")


def test_unknown_method_is_a_one_line_error(tiny_pair):
    target, draft = tiny_pair
    assert_one_line_error(generate("--model", str(target), "--draft", str(draft), "--prompt", "hi", "--method", "tree"), "unknown method")


def test_speculative_method_without_draft_is_a_one_line_error(tiny_pair):
    target, _ = tiny_pair
    assert_one_line_error(generate("--model", str(target), "--prompt", "hi", "--method", "tree:2"), "--draft")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_a_one_line_error(tiny_pair):
    target, _ = tiny_pair
    assert_one_line_error(generate("--model", str(target), "--prompt", "hi", "--method", "ar", "--device", "cuda"), "no CUDA GPU")


def test_unknown_precision_is_a_one_line_error(tiny_pair):
    target, _ = tiny_pair
    assert_one_line_error(generate("--model", str(target), "--prompt", "hi", "--method", "ar", "--precision", "fp8"),
                          "--precision 'fp8'", "gguf")


def test_generate_sends_a_chat_turn_unless_raw(tiny_pair):
    target, _ = tiny_pair
    common = ["--model", str(target), "--prompt", "hello", "--method", "ar", "--max-new-tokens", "2", "--json"]
    chat = json.loads(generate(*common).stdout)
    raw = json.loads(generate(*common, "--raw").stdout)
    # The tiny tokenizer has no chat template: the turn is the plain "Question: ...\nAnswer:" layout, longer than
    # the raw text.
    assert chat["prompt_tokens"] > raw["prompt_tokens"] >= 1


def test_generate_defaults_to_radar_only_in_gguf_on_the_default_pair():
    from radar.cli.decode import default_method

    assert default_method("gguf", has_draft=True, default_pair=True) == "radar"
    assert default_method("gguf", has_draft=True, default_pair=False) == "chain:1"  # the bundled controllers are not its
    assert default_method("bfloat16", has_draft=True, default_pair=False) == "tree:3"
    assert default_method("float32", has_draft=True, default_pair=True) == "ar"
    assert default_method("gguf", has_draft=False, default_pair=False) == "ar"
