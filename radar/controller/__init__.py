"""The RADAR controller in plain PyTorch: the LSTM stop policy, the MDP and cost model, the record dataset,
offline policy-gradient training, and offline simulation against fixed depths, a threshold rule and oracles.

    policy.py    ControllerConfig, LSTMController, ControllerPolicy / ThresholdPolicy (StopPolicy for draft_pool)
    mdp.py       CostModel (T_gen, the cost file, presets), rewards, returns, expected speedup
    dataset.py   Record / RecordSet, Parquet shards (SCHEMA_VERSION), splits, synthetic records
    train.py     TrainConfig, train()
    simulate.py  simulate(), oracles, threshold tuning, plot()

Submodules are imported on use (dataset pulls in pandas/pyarrow, simulate.plot matplotlib); the light names are
re-exported here.
"""

from radar.controller.mdp import CostModel
from radar.controller.policy import ControllerConfig, ControllerPolicy, LSTMController, ThresholdPolicy

__all__ = ["ControllerConfig", "ControllerPolicy", "CostModel", "LSTMController", "ThresholdPolicy"]
