"""A built wheel (what a non-editable install gets) carries every bundled data file the package reads."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_carries_every_bundled_file(tmp_path):
    # Built from a clean copy: a build/ folder left in the checkout would hide a file the package data misses.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "runs", "*.db", "mlruns",
                                                             "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("radar_decoding-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = [p.relative_to(ROOT).as_posix() for p in (ROOT / "radar" / "data").rglob("*") if p.is_file()]
    assert bundled, "no bundled files found"
    missing = [p for p in bundled if p not in names]
    assert missing == []


def test_the_default_pair_and_controllers_are_part_of_what_the_wheel_checks():
    from radar.ops.models import BUNDLED_CONTROLLER, BUNDLED_HEAD

    data = ROOT / "radar" / "data"
    for needed in (BUNDLED_HEAD / "model.safetensors", BUNDLED_CONTROLLER / "greedy" / "controller.json",
                   BUNDLED_CONTROLLER / "sampled" / "model.safetensors",
                   BUNDLED_CONTROLLER / "gguf" / "greedy" / "controller.json",
                   BUNDLED_CONTROLLER / "gguf" / "sampled" / "model.safetensors"):
        assert needed.is_file() and needed.is_relative_to(data)


def test_a_gguf_target_gets_the_controllers_bundled_for_gguf():
    from radar.ops.models import BUNDLED_CONTROLLER, controller_path

    assert controller_path(None, "gguf") == BUNDLED_CONTROLLER / "gguf"
    assert controller_path(None, "bfloat16") == controller_path(None) == BUNDLED_CONTROLLER


def test_an_installation_missing_its_bundled_controller_says_so_instead_of_falling_back(monkeypatch, tmp_path):
    import radar.ops.models as models

    monkeypatch.setattr(models, "BUNDLED_CONTROLLER", tmp_path / "controller")
    with pytest.raises(FileNotFoundError, match="missing controller.json.*reinstall"):
        models.controller_path(None)


def test_an_installation_missing_its_bundled_head_says_so(monkeypatch, tmp_path):
    import radar.ops.models as models

    monkeypatch.setattr(models, "BUNDLED_HEAD", tmp_path / "smollm2-eagle3")
    with pytest.raises(FileNotFoundError, match="missing config.json, model.safetensors.*reinstall"):
        models.default_pair(progress=False)
