"""The RADAR controller in plain PyTorch: the LSTM stop policy, the MDP and cost model, the record dataset,
offline policy-gradient training, and offline simulation against fixed depths, a threshold rule and oracles.

    state.py     frontier_state(): the controller's input, built one way everywhere
    policy.py    ControllerConfig, LSTMController, ControllerPolicy (a radar.decoding.stop.StopPolicy)
    cpu_step.py  CpuStep: one decision on the CPU as a single compiled call
    mdp.py       CostModel (T_gen, the verification curve, the cost file, presets), rewards, returns
    dataset.py   Record / RecordSet, Parquet shards (SCHEMA_VERSION), splits
    synthetic.py synthetic_records(): a calibrated toy drafter's records, for tests and demos
    budgets.py   the acceptance law and price of every (calls, budget) tree from the records' pool nodes
    train_config.py  TrainConfig: variants, baselines, rewards, starts
    train.py     train(): the loop, the threshold start, with an optional budget head
    objectives.py  the losses: REINFORCE (paper, improved), PPO, and the exact expected throughput
    simulate.py  simulate(), oracles, threshold tuning, the (depth, budget) grid
    plots.py     plot(): the simulator's table as a PNG
    rules.py     fixed depths and thresholds written as controller networks
    profile.py   profile_costs(): measure the cost model's constants for a model pair
    collect.py   collect_records(): one record per decoding cycle of real generations

Submodules are imported on use (dataset pulls in pandas/pyarrow, plots matplotlib); the light names are
re-exported here.
"""

from radar.controller.mdp import CostModel
from radar.controller.policy import ControllerConfig, ControllerPolicy, LSTMController

__all__ = ["ControllerConfig", "ControllerPolicy", "CostModel", "LSTMController"]
