"""The `radar profile` operation: the cost constants of a pair measured on this machine, written as a cost file."""

from __future__ import annotations

from dataclasses import dataclass

from radar.controller.mdp import CostModel
from radar.controller.policy import load_controller
from radar.controller.profile import profile_costs
from radar.decoding.pair import ModelPair
from radar.ops.models import load_pair, model_paths


@dataclass
class ProfileConfig:
    out: str = "costs.json"
    model: str | None = None  # None: the default pair
    draft: str | None = None
    t_max: int = 8
    k: int = 10
    tree_tokens: int | None = None  # None: the device's default tree budget
    repeats: int = 20
    controller: str | None = None  # whose decisions T_eye times; None: an untrained one of the reference size
    device: str = "auto"
    dtype: str = "auto"
    temperature: float = 0.0  # of the decoding loop that T_c and the AR step are measured in


def profile(cfg: ProfileConfig, pair: ModelPair | None = None) -> CostModel:
    """Measure T_0, T_f, T_eye and the AR step of `pair` (or of cfg's checkpoints) and write the cost file."""
    model, draft = (cfg.model, cfg.draft) if pair is not None else model_paths(cfg.model, cfg.draft)
    if pair is None:
        pair = load_pair(model, draft, cfg.device, cfg.dtype)
    controller = load_controller(cfg.controller, pair.target.device) if cfg.controller else None
    cost = profile_costs(pair, t_max=cfg.t_max, k=cfg.k, total_tokens=cfg.tree_tokens, repeats=cfg.repeats,
                         target_name=str(model), draft_name=str(draft), controller=controller,
                         temperature=cfg.temperature)
    cost.save(cfg.out)
    return cost
