"""Ray actors: distributed collection of the controller's dataset (`radar.actors.collect`).

Exports are loaded on first use, so `python -m radar.actors.collect` (a `ray job submit` entrypoint) runs the module
without it having been imported by the package first."""

from importlib import import_module

_EXPORTS = {name: "radar.actors.collect" for name in (
    "MANIFEST", "CollectConfig", "CollectError", "CollectSummary", "CollectWorker", "Shard", "check_reachable",
    "cluster_gpus", "collect_dataset", "connect", "make_shards", "read_manifest",
)}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'radar.actors' has no attribute {name!r}")
