"""Ray Tune sweeps of the RADAR controller: the search space and the function trainable."""

from radar.cluster.tune.space import METRIC, MODE, SEARCHES, SPACES, grid_space, param_space, search_space
from radar.cluster.tune.trainable import scaled_cost, train_controller_trial, trial_configs

__all__ = ["METRIC", "MODE", "SEARCHES", "SPACES", "grid_space", "param_space", "search_space", "scaled_cost",
           "train_controller_trial", "trial_configs"]
