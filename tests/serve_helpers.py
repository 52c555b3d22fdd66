"""What the Serve test modules share: a free port, a tiny controller for the CPU tree (branching 2), and Serve
running two apps of the tiny pair."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_controller(path: Path) -> Path:
    """A small random LSTM controller saved at `path` (it reads the k=2 frontier of the CPU tree)."""
    from radar.controller.policy import ControllerConfig, LSTMController

    torch.manual_seed(0)
    LSTMController(ControllerConfig(input_size=2, hidden_size=16, mlp_hidden=16)).save(path)
    return path


@contextmanager
def two_apps(tiny_pair, tmp: Path, main: dict, side: dict, side_route: str) -> Iterator[tuple[str, int, Path]]:
    """Serve on a free port with the tiny pair as two apps: "main" at / and "side" at `side_route`, with their own
    ServeConfig fields; yields (base URL, port, controller dir) once both answer, and shuts Serve down after."""
    import httpx
    from ray import serve

    from radar.serve.app import build_app
    from radar.serve.config import ServeConfig

    target, draft = tiny_pair
    controller = tiny_controller(tmp / "controller")
    port = free_port()
    common = dict(model=str(target), draft=str(draft), controller=str(controller), model_name="tiny", num_cpus=0.5,
                  port=port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # The side app deploys in the background while the main one starts (two replica processes at once).
        serve._run(build_app(ServeConfig(**common, **side, route_prefix=side_route)), _blocking=False, name="side",
                   route_prefix=side_route)
        serve.run(build_app(ServeConfig(**common, **main)), name="main", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while httpx.get(url + side_route + "/health", timeout=10).status_code != 200:
            assert time.time() < deadline, f"the app at {side_route} did not come up"
            time.sleep(0.5)
        yield url, port, controller
    finally:
        serve.shutdown()  # Serve only: the Ray session stays up for other tests
