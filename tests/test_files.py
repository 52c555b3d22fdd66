"""All-or-nothing writes (radar.common.files)."""

from __future__ import annotations

import os

import pytest

from radar.common.files import new_dir, new_files_in, write_atomic


def test_a_new_directory_gets_the_usual_mode_not_mkdtemps_private_one(tmp_path):
    mask = os.umask(0o022)
    try:
        with new_dir(tmp_path / "out") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "out" / "f").read_text() == "x"
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_failed_block_leaves_the_old_directory_and_no_temporary_one(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("kept")
    with pytest.raises(RuntimeError):
        with new_dir(tmp_path / "out") as d:
            (d / "new").write_text("x")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old"]


def test_new_files_replace_only_their_names(tmp_path):
    write_atomic(tmp_path / "a", "old a")
    write_atomic(tmp_path / "b", "b")
    with new_files_in(tmp_path) as d:
        (d / "a").write_text("new a")
    assert (tmp_path / "a").read_text() == "new a" and (tmp_path / "b").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
