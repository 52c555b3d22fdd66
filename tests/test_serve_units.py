"""The Serve app's parts that need no server: detokenizing, the speculation grammar, the wire format, the config
file and the `radar serve` command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from radar.decoding.methods import Method
from radar.serve.config import config_fields_from_file
from radar.serve.protocol import (
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    parse_speculation,
    speculation_name,
)
from radar.serve.streaming import Detokenizer

SERVE_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"


def _llama_style_tokenizer():
    """A SentencePiece-like BPE (metaspace, byte fallback, a Strip decoder), the other common tokenizer family."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    tok.train_from_iterator(["héllo wörld, ça va? 日本語のテキスト 😀", "The quick brown fox jumps over the dog."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("family", ["byte-level", "metaspace"])
def test_detokenizer_pieces_add_up_to_the_decoded_text(tiny_pair, family):
    from radar.decoding.pair import load_tokenizer

    tok = load_tokenizer(tiny_pair[0]) if family == "byte-level" else _llama_style_tokenizer()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, len(tok), (40,), generator=gen).tolist()
        detok = Detokenizer(tok, [])
        pieces = [detok.push([t]) for t in ids] + [detok.finish()]
        assert "".join(pieces) == decode(ids)
    text = decode(ids)
    stop = text[10:13]
    detok = Detokenizer(tok, [stop])
    pieces = [detok.push([t]) for t in ids] + [detok.finish()]
    assert "".join(pieces) == text[: text.find(stop)] and detok.stopped


def test_speculation_names_radar_off_and_tree_up_to_16():
    assert parse_speculation("radar") == Method("radar")
    assert parse_speculation("off") == Method("ar")
    assert parse_speculation("tree:16") == Method("tree", 16)
    assert speculation_name(parse_speculation("off")) == "off"


@pytest.mark.parametrize("value", ["ar", "chain:2", "threshold:0.5", " radar", "tree:04", "tree:0", "tree:2@4", "eagle", ""])
def test_speculation_refuses_engine_only_and_non_canonical_spellings(value):
    with pytest.raises(ValueError, match="speculation must be 'radar', 'off' or 'tree:D'"):
        parse_speculation(value)


def test_speculation_refuses_trees_deeper_than_16():
    with pytest.raises(ValueError, match="D up to 16"):
        parse_speculation("tree:17")


def test_request_speculation_is_checked_by_the_same_grammar():
    assert CompletionRequest(prompt="x", speculation="tree:3").speculation == "tree:3"
    with pytest.raises(ValueError, match="speculation must be"):
        CompletionRequest(prompt="x", speculation="chain:3")


def test_stream_chunks_leave_out_fields_they_do_not_carry():
    chunk = CompletionChunk(id="c", created=0, model="m", choices=[CompletionChoice(text="hi")]).model_dump()
    assert "usage" not in chunk and "speculation" not in chunk
    assert chunk["choices"] == [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}]
    assert ChatDelta(content="hi").model_dump() == {"content": "hi"} and ChatDelta().model_dump() == {}


def test_config_file_may_be_plain_fields(tmp_path):
    (tmp_path / "c.yaml").write_text("port: 9000\nspeculation: tree:2\n")
    assert config_fields_from_file(tmp_path / "c.yaml") == {"port": 9000, "speculation": "tree:2"}


def test_config_file_may_be_a_serve_deploy_file():
    fields = config_fields_from_file(SERVE_CONFIG)
    assert (fields["app_name"], fields["route_prefix"], fields["host"], fields["port"]) == ("radar", "/",
                                                                                         "127.0.0.1", 8000)
    assert fields["model_name"] == "radar-smollm2" and fields["speculation"] == "radar"


@pytest.mark.parametrize("text,message", [("- a\n- b\n", "expected a YAML mapping"),
                                          ("applications: []\n", "no applications")])
def test_config_file_mistakes_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        config_fields_from_file(tmp_path / "c.yaml")


def test_radar_serve_cli_builds_the_config_from_file_and_flags(monkeypatch, tmp_path, tiny_pair):
    import radar.cli.app as cli
    import radar.cli.serve as cli_serve
    import radar.serve.app as serve_app

    seen = {}
    monkeypatch.setattr(serve_app, "run", lambda cfg: seen.setdefault("cfg", cfg) and "http://127.0.0.1:9")
    monkeypatch.setattr(cli_serve, "wait_for_interrupt", lambda: None)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    monkeypatch.setattr("ray.shutdown", lambda: None)
    monkeypatch.setattr("ray.serve.shutdown", lambda: None)
    monkeypatch.setattr("ray.serve.delete", lambda name: None)
    (tmp_path / "serve.yaml").write_text(SERVE_CONFIG.read_text())
    target, draft = tiny_pair
    result = CliRunner().invoke(cli.app, ["serve", "--config", str(tmp_path / "serve.yaml"), "--model", str(target),
                                          "--draft", str(draft), "--port", "8123", "--speculation", "tree:3",
                                          "--api-key", "k"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.model, cfg.port, cfg.host, cfg.speculation, cfg.api_key) == (str(target), 8123, "127.0.0.1",
                                                                            "tree:3", "k")
    assert cfg.model_name == "radar-smollm2" and cfg.timeout_s == 120  # from the file
    result = CliRunner().invoke(cli.app, ["serve", "--model", str(target), "--speculation", "beam"])
    assert result.exit_code == 2 and "speculation" in result.stderr


def test_serve_config_yaml_is_a_valid_serve_deploy_config():
    import yaml
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from radar.serve.app import app_builder

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    app_cfg = schema.applications[0]
    assert app_cfg.import_path == "radar.serve.app:app_builder"
    # Serve's own builder call (what `serve deploy` does); building does not load the models.
    built = call_user_app_builder_with_args_if_necessary(app_builder, app_cfg.args)
    assert isinstance(built, Application)
    with pytest.raises(Exception, match="speculation"):
        app_builder({**app_cfg.args, "speculation": "beam"})


def test_radar_serve_refuses_a_controller_without_a_draft(tiny_pair, tmp_path):
    import radar.cli.app as cli

    target, _ = tiny_pair
    result = CliRunner().invoke(cli.app, ["serve", "--model", str(target), "--controller", str(tmp_path)])
    assert result.exit_code == 2 and "--controller needs a draft model" in result.stderr


@pytest.mark.parametrize("address", [None, "ray://head:10001"])
def test_radar_serve_starts_its_own_ray_unless_given_a_cluster_and_removes_only_its_app(monkeypatch, tiny_pair,
                                                                                       address):
    import radar.cli.app as cli
    import radar.cli.serve as cli_serve
    import radar.serve.app as serve_app

    calls = []  # Ray's lifecycle calls, recorded instead of made: this is about which ones, not Ray itself
    monkeypatch.setattr(serve_app, "run", lambda cfg: "http://127.0.0.1:9")
    monkeypatch.setattr(cli_serve, "wait_for_interrupt", lambda: None)
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    monkeypatch.setattr("ray.init", lambda **kw: calls.append(("init", kw["address"])))
    monkeypatch.setattr("ray.shutdown", lambda: calls.append(("ray.shutdown",)))
    monkeypatch.setattr("ray.serve.shutdown", lambda: calls.append(("serve.shutdown",)))
    monkeypatch.setattr("ray.serve.delete", lambda name: calls.append(("serve.delete", name)))
    target, draft = tiny_pair
    args = ["serve", "--model", str(target), "--draft", str(draft)] + (["--address", address] if address else [])
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    if address is None:
        assert calls == [("init", "local"), ("serve.shutdown",), ("ray.shutdown",)]
    else:
        assert calls == [("init", address), ("serve.delete", "radar"), ("ray.shutdown",)]
