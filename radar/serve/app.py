"""Building and running the Serve application (`serve_config.yaml` names `radar.serve.app:app_builder`)."""

from __future__ import annotations

import os

from ray import serve
from ray.serve import Application

from radar.serve.config import ServeConfig
from radar.serve.replica import RadarServer

# The class stays importable under its own name, so Ray pickles it by reference and replicas run its module's
# code with its real globals (a class decorated in place is shipped by value, with a partial copy of them).
# `serve.ingress()` without an app: each replica builds its own with `RadarServer.__serve_build_asgi_app__`.
RadarDeployment = serve.deployment(name="RadarServer")(serve.ingress()(RadarServer))


def build_app(config: ServeConfig | dict | None = None) -> Application:
    """The Serve application for `config`: `serve.run(build_app(cfg), route_prefix=cfg.route_prefix)`."""
    cfg = config if isinstance(config, ServeConfig) else ServeConfig.model_validate(config or {})
    # Resolved here (the driver, or Serve's controller for `serve deploy`), so replicas need no environment.
    # api_key None means "from $RADAR_API_KEY"; an empty string means "no key" even when the variable is set.
    key = cfg.api_key if cfg.api_key is not None else os.environ.get("RADAR_API_KEY")
    cfg = cfg.model_copy(update={"api_key": key or ""})
    return RadarDeployment.options(
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        max_constructor_retry_count=cfg.max_constructor_retry_count,
        health_check_period_s=10.0,
        # Shutdown drains: Serve stops routing to the replica and waits for the requests in flight, each of which
        # ends within timeout_s.
        graceful_shutdown_timeout_s=cfg.timeout_s + 5.0,
        graceful_shutdown_wait_loop_s=1.0,
    ).bind(cfg)


def app_builder(args: dict) -> Application:
    """Builder for a Serve config file: `import_path: radar.serve.app:app_builder`, `args:` = ServeConfig fields."""
    return build_app(ServeConfig.model_validate(args or {}))


def run(cfg: ServeConfig) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port and deploy the app; returns its base URL."""
    # The proxy's own deadline, a little past the replica's (which answers 504 in OpenAI's shape first).
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.timeout_s + 5.0})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def startup_error(app_name: str) -> str | None:
    """The last line of a failed deployment's message (its exception), after serve.run raised; None if unknown."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - only a nicer message is at stake
        return None
    for d in (app.deployments.values() if app else []):
        lines = [line.strip() for line in (d.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return None
