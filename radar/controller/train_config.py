"""The training settings (`TrainConfig`): the variants, baselines, rewards and starts `radar.controller.train`
describes, each checked when the config is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from radar.controller.mdp import CostModel

VARIANTS = ("reinforce", "improved", "ppo", "exact")
BASELINES = ("none", "mean", "group")
SCHEDULES = ("cosine", "constant")
REWARDS = ("ratio", "throughput")
INITS = ("random", "threshold")


@dataclass
class TrainConfig:
    """Training settings; the defaults are the reference's REINFORCE (see the module docstring)."""

    alpha: float = 0.02  # penalty per "continue"
    gamma: float = 0.99
    beta: float | None = None  # terminal reward scale; None = auto (module docstring)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    epochs: int = 100
    batch_size: int = 64  # records per step (each expanded to group_size rollouts with baseline="group")
    grad_clip: float = 1.0
    schedule: str = "cosine"
    min_lr: float = 1e-6
    seed: int = 0
    variant: str = "reinforce"
    expected_reward: bool = False
    baseline: str = "none"
    group_size: int = 8
    entropy_coef: float = 0.0
    bonus_in_reward: bool = False
    reward: str = "ratio"  # "ratio" (Eq. 4) | "throughput" (tokens - lambda * time, see the module docstring)
    init: str = "random"  # "random" | "threshold": start from the tuned threshold rule (behaviour cloning)
    init_epochs: int = 20
    clip: float = 0.2  # PPO's ratio clip
    ppo_epochs: int = 4  # PPO's optimiser steps per batch of rollouts
    cost: CostModel = field(default_factory=lambda: CostModel.preset("llama3.1-8b"))
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.cost, dict):
            self.cost = CostModel.from_dict(self.cost)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0")
        if self.init not in INITS or self.init_epochs < 1:
            raise ValueError(f"init must be one of {INITS} and init_epochs >= 1, got {self.init!r}, {self.init_epochs}")
        if not 0 < self.clip < 1 or self.ppo_epochs < 1:
            raise ValueError(f"clip must be in (0, 1) and ppo_epochs >= 1, got {self.clip} and {self.ppo_epochs}")
        if self.beta is not None and self.beta <= 0:
            raise ValueError("beta must be > 0 (or None for auto)")
        group = self.baseline == "group" or (self.variant == "improved" and self.baseline == "none")
        if group and self.group_size < 2:
            raise ValueError("baseline='group' needs group_size >= 2")

    def effective(self) -> "TrainConfig":
        """The settings actually used: the 'improved' and 'ppo' presets filled in."""
        if self.variant == "ppo":
            return replace(self, expected_reward=True, reward="throughput",
                           baseline="mean" if self.baseline == "none" else self.baseline)
        if self.variant == "exact":
            return replace(self, expected_reward=True, reward="throughput")
        if self.variant != "improved":
            return self
        return replace(self, variant="reinforce", expected_reward=True,
                       baseline="group" if self.baseline == "none" else self.baseline)

    def to_dict(self) -> dict:
        """Plain dict of the settings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict; unknown keys are a one-line error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


__all__ = ["TrainConfig", "VARIANTS", "BASELINES", "SCHEDULES", "REWARDS", "INITS"]
