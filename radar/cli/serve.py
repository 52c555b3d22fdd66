"""`radar serve`: the decoder behind an OpenAI-compatible HTTP API on Ray Serve, in the foreground."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from radar.cli import options as opt
from radar.cli.errors import UserError, err, say, user_errors


def wait_for_interrupt() -> None:
    """Block the foreground until Ctrl-C (a function of its own so tests can skip the wait)."""
    import time

    while True:
        time.sleep(3600)


def serve_config(fields: dict):
    """The validated ServeConfig for these fields, with the default pair and bundled controller filled in."""
    from pydantic import ValidationError

    from radar.ops.models import controller_path, model_paths
    from radar.serve.config import ServeConfig

    if fields.get("model") is None:
        say("No --model given: serving SmolLM2-135M-Instruct with its bundled EAGLE-3 head.")
        target, draft_dir = model_paths(None, fields.get("draft"))
        fields.update(model=str(target), draft=str(draft_dir), model_name=fields.get("model_name") or "radar-smollm2")
    for key in ("model", "draft"):
        if fields.get(key) and not Path(fields[key]).is_dir():
            raise UserError(f"--{key} {fields[key]}: no such checkpoint directory")
    if fields.get("controller") and not fields.get("draft"):
        raise UserError("--controller needs a draft model to drive: pass --draft too")
    if fields.get("draft"):
        # Resolved here: a typo or a broken install fails now with one line, and a models:/ URI is downloaded once,
        # not per replica. The bundled controllers stay None: each replica finds them in its own installation.
        path = controller_path(fields.get("controller"))
        if fields.get("controller"):
            fields["controller"] = str(path)
    try:
        return ServeConfig.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"serve config: {problems}") from None


def serve(
    port: Optional[int] = typer.Option(None, help="HTTP port. Default: 8000 (or the config file's)."),
    host: Optional[str] = typer.Option(None, help="Address to listen on. Default: 127.0.0.1 (0.0.0.0 exposes it)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with ServeConfig fields, or a Serve config "
                                          "file such as serve_config.yaml (its first application's args)."),
    model: opt.Model = None,
    draft: opt.Draft = None,
    controller: opt.Controller = None,
    speculation: Optional[str] = typer.Option(None, help="Default per request: radar, tree:D or off."),
    api_key: Optional[str] = typer.Option(None, envvar="RADAR_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on every route but /health."),
    replicas: Optional[int] = typer.Option(None, help="Replicas, one model each. Default: 1."),
    device: Optional[str] = typer.Option(None, help="auto (CUDA if present, else CPU), cpu or cuda[:N]"),
    dtype: Optional[str] = typer.Option(None, "--precision", "--dtype", help="The target's precision: auto, gguf, "
                                        "float32, bfloat16 or float16 (see radar generate --help). Default: auto."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to deploy on (e.g. ray://head:10001 or auto); "
                                          "on exit only this app is deleted from it. Default: a Ray instance of "
                                          "its own, whatever RAY_ADDRESS says."),
) -> None:
    """Serve the decoder behind an OpenAI-compatible HTTP API (Ray Serve), in the foreground; Ctrl-C stops it."""
    from radar.serve.config import config_fields_from_file

    with user_errors():
        fields = config_fields_from_file(config) if config else {}
        flags = {"port": port, "host": host, "model": model, "draft": draft, "controller": controller,
                 "speculation": speculation, "api_key": api_key, "replicas": replicas, "device": device,
                 "dtype": dtype}
        fields.update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None})
        cfg = serve_config(fields)
    run_in_foreground(cfg, address)


def run_in_foreground(cfg, address: str | None = None) -> None:
    """Start Ray (its own instance, unless given a cluster's `address`) and the app, print how to call it, and keep
    serving until Ctrl-C or SIGTERM; on the way out remove what it started and nothing else."""
    import ray
    from ray import serve as ray_serve

    from radar.serve import app as serve_app

    def stop(signum, frame):  # `kill` or a process manager stops it as cleanly as Ctrl-C
        raise KeyboardInterrupt

    owned = not ray.is_initialized() and address is None  # a Ray instance nobody else uses: ours to stop
    if not ray.is_initialized():
        # "local" starts a fresh instance even where RAY_ADDRESS names a cluster: never join one unasked.
        ray.init(address=address or "local", runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own (logging) SIGTERM handler
    try:
        try:
            url = serve_app.run(cfg)
        except RuntimeError as exc:  # a replica failed to start: say why in one line, the log has the rest
            reason = serve_app.startup_error(cfg.app_name) or str(exc).strip().splitlines()[-1]
            err.print(f"[bold red]error:[/] the server failed to start: {reason} (full traceback in the Serve "
                      "replica log under /tmp/ray/session_latest/logs/serve/)", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        key_header = " -H 'Authorization: Bearer KEY'" if cfg.api_key else ""
        Console().print(
            f"RADAR serving [bold]{cfg.served_model_name}[/] at {url} (Ctrl-C stops it)\n"
            f"  curl {url}/v1/completions{key_header} -H 'Content-Type: application/json' "
            f"-d '{{\"prompt\": \"Question: What is 2+2?\\nAnswer:\", \"max_tokens\": 32, \"temperature\": 0}}'",
            highlight=False, soft_wrap=True,
        )
        sys.stdout.flush()
        wait_for_interrupt()
    except KeyboardInterrupt:
        say("stopping")
    finally:
        if owned:
            ray_serve.shutdown()
        else:  # a cluster shared with others: delete our app only, leave Serve and every other app running
            ray_serve.delete(cfg.app_name)
        ray.shutdown()  # disconnects from a cluster; stops only an instance this process started
