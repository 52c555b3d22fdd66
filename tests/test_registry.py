"""The MLflow model registry: register a controller, resolve models:/ URIs back to a loadable directory, and the
MLflow logging of `radar train`."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from radar.controller.dataset import write_records
from radar.controller.synthetic import synthetic_records
from radar.controller.policy import ControllerConfig, LSTMController, load_controller
from radar.common import tracking
from radar.ops.models import download_controller
from radar.ops.register import register_controller


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite tracking store, artifact root and download cache in a temporary directory, for this module."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("RADAR_HOME", str(root / "home"))
        mp.chdir(root)  # MLflow puts the artifact root (./mlruns) in the working directory
        yield root


def _controller(root, name: str, seed: int) -> tuple[LSTMController, object]:
    torch.manual_seed(seed)
    model = LSTMController(ControllerConfig(input_size=4, hidden_size=8, mlp_hidden=8))
    return model, model.save(root / name, meta={"seed": seed})


def _same_weights(a: LSTMController, b: LSTMController) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_register_and_download_round_trip_by_alias_and_version(registry):
    first, first_dir = _controller(registry, "c1", seed=1)
    v1 = register_controller(first_dir, metrics={"eval_speedup": 1.5})
    path = download_controller("models:/radar-controller@champion")
    assert _same_weights(load_controller(path), first)
    assert LSTMController.read_meta(path) == {"seed": 1}

    second, second_dir = _controller(registry, "c2", seed=2)
    v2 = register_controller(second_dir)
    assert v2 == v1 + 1
    # The alias moved to the new version; the old version stays reachable by number.
    assert _same_weights(load_controller(download_controller("models:/radar-controller@champion")), second)
    assert _same_weights(load_controller(download_controller(f"models:/radar-controller/{v1}")), first)

    import mlflow

    version = mlflow.MlflowClient(tracking.tracking_uri()).get_model_version("radar-controller", str(v1))
    assert version.tags["eval_speedup"] == "1.5"


def test_controller_path_resolves_a_registry_uri_for_bench(registry):
    from radar.ops.models import controller_path

    _, d = _controller(registry, "c3", seed=3)
    register_controller(d)
    path = controller_path("models:/radar-controller@champion")
    assert path.is_dir() and load_controller(path).k == 4


def test_unknown_alias_model_version_or_uri_is_a_clear_one_line_error(registry):
    _, d = _controller(registry, "c4", seed=4)
    register_controller(d)
    with pytest.raises(ValueError, match="models:/radar-controller@nope: .*alias nope") as exc:
        download_controller("models:/radar-controller@nope")
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="no-such-model"):
        download_controller("models:/no-such-model@champion")
    with pytest.raises(ValueError, match="version=99"):
        download_controller("models:/radar-controller/99")
    with pytest.raises(ValueError, match="not a registry URI"):
        download_controller("models:/radar-controller")
    with pytest.raises(FileNotFoundError, match="not a saved controller"):
        register_controller(registry)


def test_an_unopenable_tracking_store_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/missing/dir/mlflow.db")
    with pytest.raises(ValueError) as exc:
        download_controller("models:/radar-controller@champion")
    assert str(tmp_path) in str(exc.value) and "\n" not in str(exc.value)


def test_an_unreachable_tracking_server_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(ValueError, match=r"cannot reach the MLflow tracking server at http://127.0.0.1:9") as exc:
        download_controller("models:/radar-controller@champion")
    assert "\n" not in str(exc.value)


def test_train_logs_params_metrics_and_the_controller_to_mlflow(registry):
    import mlflow

    from radar.cli.app import app

    write_records(synthetic_records(160, t_max=4, k=4, seed=0), registry / "records")
    (registry / "costs.json").write_text('{"T_0": 0.01, "T_f": 0.002, "T_eye": 0.0002, "t_max": 4}')
    result = CliRunner().invoke(app, ["train", "--data", str(registry / "records"), "--out", str(registry / "trained"),
                                      "--costs", str(registry / "costs.json"), "--epochs", "2", "--hidden-size", "8"])
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name("radar-train")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["train.alpha"] == "0.02" and run.data.params["controller.hidden_size"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_speedup")] == [1, 2]
    names = {f.path for f in client.list_artifacts(run.info.run_id, "controller")}
    assert names == {"controller/controller.json", "controller/model.safetensors"}
    # A trained run registers like any controller directory.
    version = register_controller(registry / "trained", run.info.run_id)
    assert load_controller(download_controller(f"models:/radar-controller/{version}")).k == 4
