"""Distributed collection (radar.cluster.collect) on the session's local Ray: sharded records equal the single-process
ones, killed workers lose and duplicate nothing, reruns resume, and user mistakes are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
from typer.testing import CliRunner

from radar.cluster.collect import collect_dataset
from radar.cluster.shards import MANIFEST, CollectConfig, CollectError, read_manifest
from radar.controller.collect import collect_records
from radar.controller.dataset import RecordSet, read_records
from radar.decoding.pair import ModelPair
from radar.cli.app import app
from radar.common.prompts import load_prompts

runner = CliRunner()
N_PROMPTS, T_MAX, K, N_NEW = 6, 4, 4, 12


def config(tiny_pair, **kw) -> CollectConfig:
    target, draft = tiny_pair
    settings = dict(prompts="mt_bench", t_max=T_MAX, k=K, max_new_tokens=N_NEW, device="cpu", shard_size=1)
    return CollectConfig(model=str(target), draft=str(draft), **{**settings, **kw})


def ordered(records: RecordSet) -> RecordSet:
    """Records sorted by (prompt id, position): the order-free form to compare runs by."""
    order = np.array(records.meta.sort_values(["prompt_id", "position"], kind="stable").index)
    return records[order]


def assert_same_records(got: RecordSet, want: RecordSet) -> None:
    got, want = ordered(got), ordered(want)
    assert len(got) == len(want)
    assert not got.meta.duplicated(["prompt_id", "position"]).any()
    assert got.meta.equals(want.meta)
    assert np.array_equal(got.states.numpy(), want.states.numpy())
    assert np.array_equal(got.dists.numpy(), want.dists.numpy())


def snapshot(out) -> dict:
    """Every file's bytes in a directory (to prove a run left it untouched)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("mt_bench", N_PROMPTS)


@pytest.fixture(scope="module")
def reference(tiny_pair, prompts) -> RecordSet:
    """What single-process `collect_records` gives for the same prompts and settings."""
    target, draft = tiny_pair
    pair = ModelPair.load(target, draft, device="cpu")
    records = collect_records(pair, prompts, t_max=T_MAX, k=K, max_new_tokens=N_NEW, progress=False,
                              target_name=str(target), draft_name=str(draft))
    return RecordSet.from_records(records)


@pytest.fixture(scope="module")
def collected(ray_session, tiny_pair, tmp_path_factory):
    """A directory collected by `radar collect --workers 2` (3 shards of 2 prompts), and the CLI's output."""
    target, draft = tiny_pair
    out = tmp_path_factory.mktemp("collected") / "records"
    result = runner.invoke(app, ["collect", "--prompts", "mt_bench", "--limit", str(N_PROMPTS), "--out", str(out),
                                 "--model", str(target), "--draft", str(draft), "--t-max", str(T_MAX), "--k", str(K),
                                 "--max-new-tokens", str(N_NEW), "--device", "cpu", "--workers", "2",
                                 "--shard-size", "2"])
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_two_workers_give_exactly_the_single_process_records(collected, reference):
    out, stdout = collected
    assert f"{len(reference)} records from {N_PROMPTS} prompts (3 shard(s) collected)" in stdout
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-00000.parquet", "shard-00001.parquet",
                                                     "shard-00002.parquet"]  # no temp files left
    manifest = read_manifest(out)
    assert manifest["config"]["t_max"] == T_MAX and manifest["config"]["total_tokens"] == 12  # resolved for CPU
    assert {i: [pid for pid, _ in e["prompts"]] for i, e in manifest["shards"].items()} == {
        "0": ["81", "82"], "1": ["83", "84"], "2": ["85", "86"]}
    assert sum(e["records"] for e in manifest["shards"].values()) == len(reference)
    assert_same_records(read_records(out), reference)


def test_rerun_of_a_finished_directory_does_no_work(collected, tiny_pair, prompts):
    out, _ = collected
    before = snapshot(out)
    summary = collect_dataset(prompts, out, config(tiny_pair, shard_size=2), workers=2, progress=False)
    assert (summary.shards_run, summary.shards_skipped, summary.workers, summary.records_run) == (0, 3, 0, 0)
    assert snapshot(out) == before


def test_a_rerun_with_other_settings_is_refused(collected, tiny_pair, prompts):
    out, _ = collected
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"other settings \(t_max: 4 there, 3 now\)"):
        collect_dataset(prompts, out, config(tiny_pair, shard_size=2, t_max=3), workers=2, progress=False)
    with pytest.raises(ValueError, match="seed: 0 there, 1 now; shard_size: 2 there, 1 now"):
        collect_dataset(prompts, out, config(tiny_pair, seed=1), workers=2, progress=False)
    assert snapshot(out) == before


def test_killed_workers_are_restarted_or_replaced_and_a_rerun_after_all_die_loses_nothing(
    ray_session, tiny_pair, prompts, reference, tmp_path
):
    kills = []

    def kill(index, busy, idle):
        # 1st: a crash Ray restarts (the shard the worker holds is retried); 2nd: a final one (its shard goes back
        # to the queue); 3rd: every worker left, for good. A worker in the middle of a shard when there is one,
        # else the one that just finished (and is about to get the next shard).
        if len(kills) == 0:
            ray.kill((busy or idle)[0], no_restart=False)
        elif len(kills) == 1:
            ray.kill((busy or idle)[0])
        elif len(kills) == 2:
            for actor in busy + idle:
                ray.kill(actor)
        else:
            return
        kills.append(index)

    with pytest.raises(CollectError, match="all 2 collection workers died .* rerun the same command to resume"):
        collect_dataset(prompts, tmp_path, config(tiny_pair), workers=2, progress=False, on_shard=kill)
    assert len(kills) == 3
    done = read_manifest(tmp_path)["shards"]
    assert 3 <= len(done) < N_PROMPTS
    kept = read_records(tmp_path)  # the finished shards are intact and hold exactly their prompts' records
    assert_same_records(kept, reference[reference.meta["prompt_id"].isin(set(kept.meta["prompt_id"])).to_numpy()])

    # The same shards and manifest whoever runs them: resume in this process (no second actor start-up).
    summary = collect_dataset(prompts, tmp_path, config(tiny_pair), local=True, progress=False)
    assert (summary.shards_skipped, summary.shards_run) == (len(done), N_PROMPTS - len(done))
    assert_same_records(read_records(tmp_path), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST, *(f"shard-{i:05d}.parquet"
                                                                             for i in range(N_PROMPTS))])


def test_in_process_collection_makes_the_same_shards_and_resumes(tiny_pair, prompts, reference, tmp_path):
    first = collect_dataset(prompts[:4], tmp_path, config(tiny_pair, shard_size=3), local=True, progress=False)
    assert (first.shards_run, first.workers) == (2, 1)
    summary = collect_dataset(prompts, tmp_path, config(tiny_pair, shard_size=3), local=True, progress=False)
    assert (summary.shards_skipped, summary.shards_run) == (1, 1)  # a larger --limit redoes only the grown shard
    assert_same_records(read_records(tmp_path), reference)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in result.output, message
    for fragment in fragments:
        assert fragment in message, message


def test_an_unreachable_ray_address_is_a_one_line_error(tiny_pair, tmp_path):
    target, draft = tiny_pair
    result = runner.invoke(app, ["collect", "--prompts", "mt_bench", "--limit", "2", "--out", str(tmp_path / "out"),
                                 "--model", str(target), "--draft", str(draft), "--workers", "2",
                                 "--address", "127.0.0.1:1"])
    assert_one_line_error(result, "cannot reach the Ray cluster at 127.0.0.1:1")
    assert not (tmp_path / "out").exists()


def test_a_model_a_worker_cannot_load_is_a_one_line_error(ray_session, tiny_pair, tmp_path):
    _, draft = tiny_pair
    result = runner.invoke(app, ["collect", "--prompts", "mt_bench", "--limit", "2", "--out", str(tmp_path / "out"),
                                 "--model", str(tmp_path / "missing"), "--draft", str(draft), "--workers", "1"])
    assert_one_line_error(result, "model directory not found", "missing")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, fragment", [("", "no prompts in the file"),
                                               ('{"prompt": "ok"}\n{"prompt": \n', "bad.jsonl:2: not valid JSON")])
def test_an_empty_or_malformed_prompt_file_is_a_one_line_error_and_finished_shards_stay(
    collected, tiny_pair, reference, tmp_path, content, fragment
):
    out, _ = collected
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    target, draft = tiny_pair
    result = runner.invoke(app, ["collect", "--prompts", str(bad), "--out", str(out), "--model", str(target),
                                 "--draft", str(draft), "--workers", "2"])
    assert_one_line_error(result, fragment)
    assert snapshot(out) == before
    assert_same_records(read_records(out), reference)
    assert json.loads((out / MANIFEST).read_text())["shards"]
