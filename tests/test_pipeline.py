"""`radar demo` as the whole pipeline (radar.demo.pipeline) on the tiny pair: a failed stage keeps the earlier
ones and a rerun resumes from it, the finished run benchmarks radar with the registered champion, a rerun skips
every stage, and the command prints the tables. The tests share one work directory and run in file order, each
starting from the state the previous one left."""

from __future__ import annotations

import json
import time

import pytest
import ray
from typer.testing import CliRunner

from radar.cli.app import app
from radar.demo.config import DemoRunConfig
from radar.demo.pipeline import run_demo
from radar.demo.stages import STAGES, StageError

# Every knob here is also a `radar demo` option, so the command can be run on the same directory. 5 prompts per set
# make 2 shards of 8, one per collection actor.
KNOBS = dict(limit_per_set=5, workers=2, epochs=2, trials=2, tune_epochs=2, bench_limit=2, max_new_tokens=16,
             repeats=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_pair, ray_session):
    """The run's config; controllers downloaded from the registry go to a temporary RADAR_HOME."""
    root = tmp_path_factory.mktemp("demo")
    target, draft = tiny_pair
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADAR_HOME", str(root / "home"))
        yield DemoRunConfig.from_options(work_dir=str(root / "work"), model=str(target), draft=str(draft), **KNOBS)


def statuses(cfg: DemoRunConfig) -> dict[str, str]:
    manifest = json.loads((cfg.work / "stages.json").read_text())
    return {name: entry["status"] for name, entry in manifest["stages"].items()}


def demo_args(cfg: DemoRunConfig) -> list[str]:
    args = ["demo", "--work-dir", cfg.work_dir, "--model", cfg.model, "--draft", cfg.draft]
    for key, value in KNOBS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_a_failed_stage_names_itself_and_keeps_the_stages_before_it(work, monkeypatch):
    def broken_sweep(cfg):
        raise RuntimeError("injected failure")

    monkeypatch.setattr("radar.ops.sweep.run_sweep", broken_sweep)
    lines: list[str] = []
    with pytest.raises(StageError) as info:
        run_demo(work, log=lines.append, report=False)
    assert info.value.stage == "tune" and "injected failure" in str(info.value)
    assert any(line.startswith("[5/7] tune: FAILED") for line in lines)
    assert statuses(work) == {"pair": "done", "costs": "done", "collect": "done", "train": "done", "tune": "failed"}
    out = work.work
    assert (out / "costs.json").is_file() and (out / "records" / "manifest.json").is_file()
    assert (out / "controller" / "controller.json").is_file() and not (out / "bench.json").exists()
    assert ray.is_initialized()  # the session's Ray was reused, and left running


def test_the_rerun_resumes_at_the_failed_stage_and_benchmarks_radar_with_the_champion(work):
    lines: list[str] = []
    result = run_demo(work, log=lines.append, report=False)
    assert [s.status for s in result.stages] == ["skipped"] * 4 + ["done"] * 3
    assert [line for line in lines if "skipped (done)" in line] == [
        f"[{i}/7] {name}: skipped (done)" for i, name in enumerate(STAGES[:4], 1)]
    assert set(statuses(work).values()) == {"done"}

    # ar, the HF baselines, the simulator's best fixed depth and (depth, budget) pair, its tuned threshold rule alone
    # and with its tuned budget, and radar, on the same prompts; greedy radar and the rules are ar.
    bench = json.loads((work.work / "bench.json").read_text())
    champion = result.champion
    threshold, (p, b) = champion["tuned_threshold"], champion["tuned_threshold_budget"]
    rules = list(dict.fromkeys([f"tree:{champion['best_fixed_depth']}", champion["best_fixed_pair"],
                                f"threshold:{threshold:.3g}", f"threshold:{p:.3g}@{b}"]))
    assert "@" in champion["best_fixed_pair"]  # the trained controller has a budget head: pairs were priced
    assert list(bench["methods"]) == ["ar", "hf", "hf-pld", "hf-assisted", *rules, "radar"]
    assert bench["methods"]["radar"]["outputs"] == bench["methods"]["ar"]["outputs"]
    assert all(bench["greedy_outputs_match_ar"].values())
    assert bench["config"]["controller"] == "models:/radar-controller@champion"

    # The champion is the better of the two candidates, and the registry's @champion is the version registered here.
    import mlflow

    from radar.common.tracking import tracking_uri

    # The champion is the better candidate, or the best rule when both lose to it.
    speedups, rules = result.simulation["controller_speedups"], result.simulation["rule_speedups"]
    assert set(speedups) == {"trained", "tuned"}
    best = max({**speedups, **rules}.items(), key=lambda kv: kv[1])
    assert result.simulation["champion"] in (best[0], champion["choice"]) and champion["champion_speedup"] == max(
        max(speedups.values()), max(rules.values()))
    version = mlflow.MlflowClient(tracking_uri()).get_model_version_by_alias("radar-controller", "champion")
    assert int(version.version) == result.champion["version"]


def test_a_second_rerun_skips_every_stage_quickly_and_changes_nothing(work):
    before = {f: (work.work / f).read_bytes() for f in ("bench.json", "simulate.json", "costs.json")}
    t0 = time.perf_counter()
    result = run_demo(work, log=lambda line: None, report=False)
    assert time.perf_counter() - t0 < 15
    assert result.skipped == list(STAGES)
    assert {f: (work.work / f).read_bytes() for f in before} == before


def test_the_demo_command_prints_the_tables_and_where_to_look_in_mlflow(work):
    result = CliRunner().invoke(app, demo_args(work))
    assert result.exit_code == 0, result.output
    assert result.stderr.count("skipped (done)") == len(STAGES)
    assert "greedy outputs identical to ar: all methods" in result.stdout
    assert "fixed-1" in result.stdout and "threshold" in result.stdout and "oracle" in result.stdout
    assert "mlflow ui --backend-store-uri" in result.stdout and "radar-controller" in result.stdout


def test_the_command_reports_a_failed_stage_in_one_line_and_the_same_command_resumes(work, monkeypatch):
    def broken_bench(*args, **kwargs):
        raise ValueError("injected bench failure")

    args = demo_args(work)
    args[args.index("--repeats") + 1] = "2"  # new bench settings: only the bench runs again
    with monkeypatch.context() as mp:
        mp.setattr("radar.ops.bench.run_bench", broken_bench)
        failed = CliRunner().invoke(app, args)
    assert failed.exit_code == 1
    assert "stage 'bench' failed: injected bench failure" in failed.stderr and "Traceback" not in failed.stderr
    assert statuses(work)["bench"] == "failed" and statuses(work)["register"] == "done"

    resumed = CliRunner().invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stderr.count("skipped (done)") == len(STAGES) - 1 and "[7/7] bench: done" in resumed.stderr
    assert json.loads((work.work / "bench.json").read_text())["config"]["repeats"] == 2


def test_bad_settings_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--work-dir", str(tmp_path), "--draft", str(tmp_path)])
    assert result.exit_code == 2 and "--draft given without --model" in result.stderr
    result = CliRunner().invoke(app, ["demo", "--work-dir", str(tmp_path), "--trials", "0"])
    assert result.exit_code == 2 and "trials must be >= 1" in result.stderr
