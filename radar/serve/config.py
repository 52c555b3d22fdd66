"""The server's settings (`ServeConfig`) and reading them from a YAML file such as serve_config.yaml."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from radar.serve.protocol import SpeculationName


class ServeConfig(BaseModel):
    """Everything `build_app` needs; also the `args` of the Serve config YAML (`radar.serve.app:app_builder`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Target checkpoint directory; None = SmolLM2-135M-Instruct with its bundled EAGLE-3 head.")
    draft: str | None = Field(None, description="Draft checkpoint directory (None with model=None: the bundled EAGLE-3 head).")
    controller: str | None = Field(None, description="Controller dir, .pt or models:/ URI; None = bundled.")
    model_name: str | None = Field(None, description="Model id clients send; default: radar-smollm2 or the dir name.")
    device: str = "auto"
    dtype: str = "auto"
    tree_tokens: int | None = Field(None, ge=1, description="Tree nodes verified per cycle (default per device and precision).")
    speculation: SpeculationName = Field("radar", description="Default speculation: radar, tree:D or off.")
    # None: taken from $RADAR_API_KEY when the app is built; "": no key even when that variable is set.
    api_key: str | None = Field(None, description="Bearer key required on every route but /health.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request limit (queue wait + decode) -> 504.")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="Intra-op threads; default: the replica's CPUs.")
    max_batch_size: int = Field(16, ge=1, description="Requests decoding together in one replica (1: FIFO).")
    max_queue: int = Field(64, ge=0, description="Requests waiting for a batch seat; beyond, 429 at once.")
    load_aware: bool = Field(True, description="Shrink speculation trees as the batch grows (measured curve).")
    body_timeout_s: float = Field(10.0, gt=0, description="Deadline to upload a request body -> 408.")
    stuck_s: float = Field(60.0, gt=0, description="A batch without progress this long fails the health check.")
    # Above max_batch_size + max_queue, so the replica's own 429 answers overload, and /health still gets in.
    max_ongoing_requests: int = Field(100, ge=1, description="Requests Serve lets into one replica at once.")
    max_queued_requests: int = Field(256, ge=-1, description="Requests waiting in Serve's router (-1 = no limit).")
    max_constructor_retry_count: int = Field(3, ge=1, description="Replica start attempts (a bad path never heals).")
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "radar"

    @property
    def served_model_name(self) -> str:
        """The model id clients send and responses carry."""
        return self.model_name or ("radar-smollm2" if self.model is None else Path(self.model).name)


def config_fields_from_file(path: str | Path) -> dict:
    """ServeConfig fields from a YAML file: either the fields themselves, or a Serve config file (the first
    application's `args`, `name` and `route_prefix`, and `http_options` host/port), like serve_config.yaml."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    if "applications" not in doc:
        return dict(doc)
    apps = doc["applications"] or []
    if not apps:
        raise ValueError(f"{path}: no applications")
    fields = dict(apps[0].get("args") or {})
    if apps[0].get("route_prefix"):
        fields.setdefault("route_prefix", apps[0]["route_prefix"])
    if apps[0].get("name"):
        fields.setdefault("app_name", apps[0]["name"])
    http = doc.get("http_options") or {}
    fields.update({k: http[k] for k in ("host", "port") if k in http and k not in fields})
    return fields
