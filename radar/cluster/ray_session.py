"""Connecting to Ray: the cluster the user named, the one `ray job submit` names in $RAY_ADDRESS, or a local
instance this process starts and shuts down. A cluster this process did not start is never shut down by it."""

from __future__ import annotations

import os
import socket


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Raise ValueError unless something listens at the address's host:port (ray.init would hang retrying)."""
    hp = _host_port(address)
    if hp is None:
        raise ValueError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://head:10001)")
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"cannot reach the Ray cluster at {address}: {reason}; is `ray start --head` running "
                         "there and the port open?") from None


def connect(address: str | None = None) -> bool:
    """Connect to Ray: `address`, else $RAY_ADDRESS (as under `ray job submit`), else a new local instance.
    Returns True when this call started the connection (the caller then shuts it down)."""
    import ray

    env = os.environ.get("RAY_ADDRESS")
    target = address or ("auto" if env else None)
    check = address if address not in (None, "auto", "local") else (env if target == "auto" and env else None)
    if check and check.startswith(("http://", "https://")):
        raise ValueError(f"{check} is a dashboard (job submission) address; ray.init needs the cluster's address "
                         "(host:6379, or ray://host:10001); use it with `ray job submit --address` instead")
    if check:
        check_reachable(check)
    if ray.is_initialized():
        return False
    try:
        ray.init(address=target, ignore_reinit_error=True)
    except ConnectionError as exc:
        hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            " (if the cluster uses token authentication, set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or "
            "~/.ray/auth_token)")
        raise ValueError(f"cannot connect to Ray at {target}: {str(exc).splitlines()[0]}{hint}") from None
    return True


def cluster_gpus() -> int:
    """GPUs the connected Ray cluster has now."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def ensure_ray(num_cpus: int, log=print) -> bool:
    """Reuse this process's Ray connection, join $RAY_ADDRESS, or start a local instance with `num_cpus` CPUs;
    True when this call connected (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        return connect(None)
    log(f"starting a local Ray instance with {num_cpus} CPUs (shut down at the end of the run)")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    return True
