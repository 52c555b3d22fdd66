"""The RADAR controller in plain PyTorch: the LSTM stop policy, the MDP and cost model, the record dataset,
offline policy-gradient training, and offline simulation against fixed depths, a threshold rule and oracles.

    state.py     frontier_state(): the controller's input, built one way everywhere
    policy.py    ControllerConfig, LSTMController, ControllerPolicy (a radar.decoding.stop.StopPolicy)
    cpu_step.py  CpuStep: one decision on the CPU as a single compiled call
    mdp.py       CostModel (T_gen, the cost file, presets), rewards, returns, expected speedup
    dataset.py   Record / RecordSet, Parquet shards (SCHEMA_VERSION), splits, synthetic records
    train.py     TrainConfig, train()
    simulate.py  simulate(), oracles, threshold tuning, plot()
    profile.py   profile_costs(): measure the cost model's constants for a model pair
    collect.py   collect_records(): one record per decoding cycle of real generations

Submodules are imported on use (dataset pulls in pandas/pyarrow, simulate.plot matplotlib); the light names are
re-exported here.
"""

from radar.controller.mdp import CostModel
from radar.controller.policy import ControllerConfig, ControllerPolicy, LSTMController

__all__ = ["ControllerConfig", "ControllerPolicy", "CostModel", "LSTMController"]
