"""Prompt sets: bundled benchmarks, plain jsonl, and a clear error for each malformed input."""

from __future__ import annotations

import pytest

from radar.common.prompts import BUNDLED, PromptFileError, load_prompts


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_sets_load_by_name(name):
    prompts = load_prompts(name)
    assert len(prompts) >= 80
    assert all(p.text.strip() for p in prompts)


def test_limit_keeps_the_first_prompts():
    assert [p.id for p in load_prompts("mt_bench", limit=3)] == [p.id for p in load_prompts("mt_bench")[:3]]


def test_fastchat_turns_use_the_first_turn():
    first = load_prompts("mt_bench", limit=1)[0]
    assert first.text.startswith("Compose an engaging travel blog post")


def test_plain_prompt_lines_load_and_blank_lines_are_skipped(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "one"}\n\n{"prompt": "two", "id": "b"}\n')
    prompts = load_prompts(f)
    assert [(p.id, p.text) for p in prompts] == [("0", "one"), ("b", "two")]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "absent.jsonl")


def test_malformed_json_names_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(PromptFileError, match=r"p.jsonl:2: not valid JSON"):
        load_prompts(f)


@pytest.mark.parametrize("line", ['{"text": "x"}', '{"turns": []}', '{"prompt": ""}', '{"prompt": 3}', '["x"]'])
def test_lines_without_a_usable_prompt_are_rejected(tmp_path, line):
    f = tmp_path / "p.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(PromptFileError, match="p.jsonl:1"):
        load_prompts(f)


def test_empty_file_is_rejected(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(f)


def test_sets_joined_with_plus_take_the_limit_from_each_and_prefix_ids():
    joined = load_prompts("mt_bench+gsm8k", limit=3)
    assert [p.id.split("/")[0] for p in joined] == ["mt_bench"] * 3 + ["gsm8k"] * 3
    assert [p.text for p in joined] == [p.text for p in load_prompts("mt_bench", 3) + load_prompts("gsm8k", 3)]
    assert len({p.id for p in joined}) == 6


def test_a_missing_set_in_a_join_is_named(tmp_path):
    with pytest.raises(PromptFileError, match="nope.jsonl"):
        load_prompts(f"mt_bench+{tmp_path / 'nope.jsonl'}")


def test_a_file_whose_name_has_a_plus_is_read_as_one_file(tmp_path):
    path = tmp_path / "a+b.jsonl"
    path.write_text('{"prompt": "hello"}\n')
    assert [p.text for p in load_prompts(str(path))] == ["hello"]
