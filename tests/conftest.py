"""Shared fixtures: tiny checkpoints with a tokenizer, built once per session."""

from __future__ import annotations

import pytest
import torch

# Test models are tiny: one intra-op thread is as fast, and two threads spin against each other (and against
# anything else on a 2-core machine), which slows single forwards down badly.
torch.set_num_threads(1)

from tiny_models import make_tiny_pair


@pytest.fixture(scope="session", autouse=True)
def mlflow_in_a_temp_dir(tmp_path_factory):
    """Commands log to MLflow by default; in tests that goes to a throwaway SQLite file, never ./mlflow.db."""
    import os

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(target_dir, draft_dir): tiny Llama checkpoints sharing a 320-token BPE tokenizer; the draft is a
    noisy copy of the target so drafts are often accepted."""
    return make_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2-core machines: 4 logical CPUs, fractional actors)."""
    import os

    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()
