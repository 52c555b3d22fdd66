"""The verification budget as a second choice: the cost model's verification curve, the acceptance law of any
(calls, budget) tree from a record's nodes, the joint simulator rows, the budget head (trained and live), and the
rules written as controller networks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from radar.controller.budgets import budget_dists, default_budgets, joint_table, parse_budgets, tree_tokens
from radar.controller.dataset import RecordSet, read_records, write_records
from radar.controller.synthetic import synthetic_records
from radar.controller.mdp import CostModel
from radar.controller.policy import ControllerConfig, ControllerPolicy, LSTMController
from radar.controller.rules import fixed_depth_controller, threshold_controller
from radar.controller.simulate import (controller_choices, joint_oracle, policy_depths, simulate, threshold_depths,
                                       tune_threshold_budget)
from radar.controller.train import TrainConfig, train
from radar.decoding.stop import ThresholdPolicy
from radar.decoding.tree import DraftPool, select_tree
from radar.decoding.verify import acceptance_distribution

# A verification that grows steeply with the tree, as on a CPU: 1 token costs 1, 8 tokens cost 3.
CURVE = CostModel(T_0=3.0, T_f=0.05, T_eye=0.001, t_max=6, ar_step=1.0, verify_tokens=[1, 2, 4, 8],
                  verify_s=[1.0, 1.2, 1.8, 3.0], budget=8)


# ---- the cost model's curve ------------------------------------------------------------------------------


def test_verify_time_interpolates_holds_below_and_extends_above():
    assert CURVE.verify_time(1) == 1.0
    assert CURVE.verify_time(3) == pytest.approx(1.5)
    assert CURVE.verify_time(0) == 1.0  # below the first point: flat
    assert CURVE.verify_time(10) == pytest.approx(3.6)  # the last segment's slope, 0.3 per token
    want = torch.tensor([1.0, 1.5, 3.6], dtype=torch.float64)
    assert torch.allclose(CURVE.verify_time(torch.tensor([1, 3, 10])), want)


def test_without_a_curve_every_tree_costs_t0():
    flat = CostModel(T_0=2.0, T_f=0.1, T_eye=0.0, t_max=4)
    assert flat.verify_time(1) == flat.verify_time(50) == 2.0
    assert flat.t_gen(3, tokens=1) == flat.t_gen(3) == pytest.approx(2.3)


def test_cycle_times_add_bookkeeping_draft_calls_and_decisions():
    cost = CostModel(T_0=3.0, T_f=0.05, T_eye=0.001, t_max=6, verify_tokens=[1, 8], verify_s=[1.0, 3.0], T_c=0.2)
    got = cost.cycle_times(torch.tensor([2, 6]), torch.tensor([1, 8]), controller=True)
    assert got.tolist() == pytest.approx([1.0 + 0.2 + 0.1 + 3 * 0.001, 3.0 + 0.2 + 0.3 + 6 * 0.001])
    assert cost.t_gen(2, tokens=1) == pytest.approx(float(got[0]))


def test_a_curve_round_trips_through_the_cost_file_and_bad_curves_are_refused(tmp_path):
    assert CostModel.load(CURVE.save(tmp_path / "c.json")) == CURVE
    for bad in ({"verify_tokens": [2, 1], "verify_s": [1.0, 2.0]}, {"verify_tokens": [1], "verify_s": []},
                {"verify_tokens": [0], "verify_s": [1.0]}, {"T_c": -1.0}, {"budget": 0}):
        with pytest.raises(ValueError):
            CostModel(T_0=1.0, T_f=0.1, T_eye=0.0, **bad)


def test_a_tree_holds_the_budget_or_the_whole_pool():
    assert tree_tokens(3, 2, [1, 4, 12]).tolist() == [[1, 2, 2], [1, 4, 6], [1, 4, 10]]


def test_budget_lists_parse_and_default():
    assert parse_budgets(None, 12) is None and parse_budgets("", 12) is None
    assert parse_budgets("auto", 12) == default_budgets(12) == [1, 2, 4, 6, 9, 12]
    assert parse_budgets("4,1,4", 12) == [1, 4]
    for bad in ("a,b", "0,2"):
        with pytest.raises(ValueError):
            parse_budgets(bad, 12)
    with pytest.raises(ValueError, match="re-collect"):
        default_budgets(0)


# ---- the acceptance law of any tree, from the nodes ----------------------------------------------------------


def _random_record(rng: np.random.Generator, k: int, t_max: int, budget: int):
    """A random pool of the engine's shape (k children per frontier node, k frontier nodes per call) with random
    acceptance probabilities: the record's nodes, and the pool to cut reference trees from."""
    parents, depths, scores = [-1] * k, [1] * k, list(np.sort(np.log(rng.uniform(0.05, 1, k)))[::-1])
    frontier = list(range(k))
    for call in range(2, t_max + 1):
        new = []
        for f in frontier:
            for _ in range(k):
                parents.append(f)
                depths.append(call)
                scores.append(scores[f] + float(np.log(rng.uniform(0.05, 1))))
                new.append(len(parents) - 1)
        frontier = sorted(new, key=lambda i: -scores[i])[:k]
    n = len(parents)
    p = np.zeros(n)
    for parent in set(parents):  # siblings' probabilities sum to at most 1
        kids = [i for i in range(n) if parents[i] == parent]
        p[kids] = rng.dirichlet(np.ones(len(kids) + 1))[:-1]
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            ancestors[i, j] = True
            j = parents[j]
    pool = DraftPool(tokens=torch.arange(n), parents=torch.tensor(parents), depths=torch.tensor(depths),
                     scores=torch.tensor(scores, dtype=torch.float32), ancestors=ancestors,
                     draft_slots=torch.full((n,), -1), draft_base=0, frontier_scores=[], draft_calls=t_max)
    return pool, torch.tensor(p, dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_dists_equal_the_engine_acceptance_of_every_calls_budget_tree(seed):
    rng = np.random.default_rng(seed)
    k, t_max, budgets = 2, 4, [1, 2, 3, 5, 8]
    pool, p = _random_record(rng, k, t_max, budgets[-1])
    nodes = torch.stack((pool.parents.float(), pool.depths.float(), pool.scores, p), 1)
    records = RecordSet(torch.zeros(1, t_max, k), torch.eye(t_max, t_max + 1)[None], _meta(1, budgets[-1]), nodes[None])
    grid = budget_dists(records, budgets)[0]
    for i in range(1, t_max + 1):
        prefix = pool.depths <= i
        sub = DraftPool(pool.tokens[prefix], pool.parents[prefix], pool.depths[prefix], pool.scores[prefix],
                        pool.ancestors[prefix][:, prefix], pool.draft_slots[prefix], 0, [], i)
        for j, b in enumerate(budgets):
            tree = select_tree(sub, b)
            probs = torch.zeros(1 + len(pool.tokens), len(pool.tokens))  # row r: the law at pool node r - 1
            probs[pool.parents + 1, pool.tokens] = p
            rows = torch.cat((torch.zeros(1, dtype=torch.long), 1 + tree.tokens))
            ref = acceptance_distribution(tree, probs[rows][:, torch.arange(len(pool.tokens))])
            want = torch.zeros(t_max + 1)
            want[: ref.numel()] = ref
            assert torch.allclose(grid[i - 1, j], want, atol=1e-6), (i, b)


def _meta(n: int, budget: int) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"p{j}" for j in range(n)], "position": 0, "target": "t", "draft": "d",
                         "temperature": 0.0, "budget": budget, "schema_version": 2})


def test_schema_1_shards_stay_readable_for_depth_only_work(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = synthetic_records(20, t_max=4, k=3)
    table = pq.read_table(write_records(records, tmp_path / "new.parquet")).drop(["nodes", "budget"])
    table = table.set_column(table.column_names.index("schema_version"), "schema_version",
                             pa.array([1] * 20, type=pa.int32()))
    pq.write_table(table.replace_schema_metadata({b"radar.schema_version": b"1"}), tmp_path / "old.parquet")
    old = read_records(tmp_path / "old.parquet")
    assert old.nodes is None and old.budget == 0 and torch.equal(old.dists, records.dists)
    assert simulate(old, CostModel(T_0=1.0, T_f=0.1, T_eye=0.0, t_max=4)).best_fixed is not None
    with pytest.raises(ValueError, match="re-collect"):
        budget_dists(old, [1, 2])
    with pytest.raises(ValueError, match="schema 1"):
        RecordSet.concat([old, records])


# ---- the simulator's joint rows ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain_records():
    return synthetic_records(600, t_max=6, k=1, seed=3)


def test_joint_oracle_is_at_least_every_fixed_pair_and_the_depth_only_oracle(chain_records):
    result = simulate(chain_records, CURVE, budgets=[1, 2, 4, 6])
    joint = result.policies["oracle-joint"].speedup
    assert all(joint >= p.speedup - 1e-9 for p in result.policies.values())
    assert joint > result.policies["oracle-throughput"].speedup  # the budget choice is worth something here


def test_the_joint_oracle_is_the_exhaustive_optimum_on_a_few_records(chain_records):
    few = chain_records[:4]
    table = joint_table(few, CURVE, [1, 3, 6])
    _, _, rate = joint_oracle(table)
    tok, time = table.tokens.reshape(4, -1), table.time.reshape(-1)
    best = max(float(sum(tok[r, c] for r, c in enumerate(ch)) / sum(time[c] for c in ch))
               for ch in np.ndindex(*(tok.shape[1],) * 4))
    assert rate == pytest.approx(best)


def test_a_tuned_threshold_and_budget_beat_the_threshold_at_the_full_budget_on_their_data(chain_records):
    thr, budget = tune_threshold_budget(chain_records, CURVE, [1, 2, 4, 6])
    result = simulate(chain_records, CURVE, budgets=[1, 2, 4, 6], train_records=chain_records)
    assert result.policies["threshold@budget"].params == {"threshold": thr, "budget": budget}
    assert result.policies["threshold@budget"].speedup >= result.policies["threshold"].speedup - 1e-9


# ---- the budget head, trained and live ------------------------------------------------------------------------


def test_a_budget_head_learns_to_beat_every_fixed_pair(chain_records):
    fit, held = chain_records[:400], chain_records[400:]
    budgets = [1, 2, 4, 6]
    cfg = TrainConfig(variant="reinforce", expected_reward=True, baseline="mean", reward="throughput", alpha=0.0,
                      lr=3e-3, epochs=25, batch_size=128, cost=CURVE, seed=0)
    controller, _ = train(fit, cfg, ControllerConfig(input_size=1, hidden_size=16, mlp_hidden=16, budgets=budgets),
                          progress=False)
    result = simulate(held, CURVE, controller=controller, budgets=budgets)
    row = result.policies["controller+budget"]
    assert row.speedup > result.best_fixed_pair.speedup
    assert row.speedup >= 0.95 * result.policies["oracle-joint"].speedup
    assert 1 < row.mean_budget < 6  # it does choose


def test_live_budget_choice_is_the_simulated_one():
    records = synthetic_records(40, t_max=5, k=3, seed=4)
    torch.manual_seed(0)
    controller = LSTMController(ControllerConfig(input_size=3, hidden_size=8, mlp_hidden=8, budgets=[2, 5, 9])).eval()
    depths, picks = controller_choices(controller, records.states)
    for cpu in (True, False):
        policy = ControllerPolicy(controller)
        if not cpu:
            policy.cpu = None  # the PyTorch step (as on a GPU)
        for n in range(len(records)):
            policy.reset()
            calls = 1
            while calls < 5 and policy.decide(calls, records.states[n, calls - 1]):
                calls += 1
            assert calls == depths[n]
            assert policy.choose_budget(calls, records.states[n, calls - 1]) == [2, 5, 9][picks[n]]


def test_a_controller_without_a_budget_head_leaves_the_budget_alone():
    policy = ControllerPolicy(LSTMController(ControllerConfig(input_size=2, hidden_size=4, mlp_hidden=4)))
    policy.reset()
    assert policy.choose_budget(1, torch.tensor([-0.1, -0.5])) is None


def test_ppo_trains_a_controller_that_beats_the_fixed_depths():
    records = synthetic_records(600, t_max=6, k=4, seed=5)
    fit, held = records[:400], records[400:]
    cost = CostModel(T_0=1.0, T_f=0.25, T_eye=0.01, t_max=6, ar_step=1.0)
    cfg = TrainConfig(variant="ppo", lr=3e-3, epochs=15, batch_size=128, cost=cost, seed=0)
    controller, history = train(fit, cfg, ControllerConfig(input_size=4, hidden_size=16, mlp_hidden=16),
                                progress=False)
    result = simulate(held, cost, controller=controller)
    assert result.policies["controller"].speedup > result.best_fixed.speedup


# ---- rules as controller networks -----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_a_fixed_depth_network_makes_exactly_that_many_calls_with_its_budget(depth):
    records = synthetic_records(50, t_max=6, k=3, seed=6)
    network = fixed_depth_controller(depth, 3, budgets=[2, 4, 8], budget=4)
    depths, picks = controller_choices(network, records.states)
    assert (depths == depth).all() and (picks == 1).all()
    assert (policy_depths(records, ControllerPolicy(network)) == depth).all()


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5, 0.9, 2.0])
def test_a_threshold_network_decides_as_the_threshold_rule(threshold):
    records = synthetic_records(200, t_max=6, k=3, seed=7)
    network = threshold_controller(threshold, 3)
    want = threshold_depths(records.states, threshold)
    assert torch.equal(policy_depths(records, ControllerPolicy(network)), want)
    assert torch.equal(policy_depths(records, ThresholdPolicy(threshold)), want)


def test_a_rule_network_saves_and_loads_like_any_controller(tmp_path):
    network = fixed_depth_controller(2, 3, budgets=[2, 4], budget=2)
    back = LSTMController.load(network.save(tmp_path / "rule"))
    assert back.budgets == [2, 4]
    states = synthetic_records(10, t_max=4, k=3).states
    assert all(torch.equal(a, b) for a, b in zip(controller_choices(back, states), controller_choices(network, states)))


def test_the_outcome_law_of_depth_and_budget_sums_to_one():
    from radar.controller.objectives import depth_budget_logprobs

    torch.manual_seed(1)
    logp = torch.log_softmax(torch.randn(5, 3, 2), -1)
    logp_b = torch.log_softmax(torch.randn(5, 4, 3), -1)
    prob = depth_budget_logprobs(logp, logp_b).exp()
    assert prob.shape == (5, 4, 3)
    assert torch.allclose(prob.sum((1, 2)), torch.ones(5))
    cont = logp[..., 1].exp()
    assert torch.allclose(prob[:, 1].sum(-1), cont[:, 0] * (1 - cont[:, 1]))  # continue once, then stop


def test_the_exact_variant_learns_depth_and_budget_without_sampling(chain_records):
    fit, held = chain_records[:400], chain_records[400:]
    budgets = [1, 2, 4, 6]
    cfg = TrainConfig(variant="exact", alpha=0.0, lr=3e-3, epochs=25, batch_size=128, cost=CURVE, seed=0)
    controller, history = train(fit, cfg, ControllerConfig(input_size=1, hidden_size=16, mlp_hidden=16,
                                                           budgets=budgets), progress=False)
    result = simulate(held, CURVE, controller=controller, budgets=budgets)
    assert result.policies["controller+budget"].speedup > result.best_fixed_pair.speedup
    assert history.metric("return")[-1] > history.metric("return")[0]


def test_a_measured_curve_is_made_non_decreasing():
    from radar.controller.profile import monotone

    assert monotone([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert monotone([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert monotone([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]


def test_a_threshold_start_begins_training_at_the_tuned_rule():
    from radar.controller.simulate import controller_depths, tune_threshold

    records = synthetic_records(400, t_max=6, k=3, seed=8)
    cost = CostModel(T_0=1.0, T_f=0.25, T_eye=0.0, t_max=6, ar_step=1.0)
    cfg = TrainConfig(variant="exact", init="threshold", init_epochs=30, lr=1e-6, epochs=1, batch_size=64, cost=cost)
    controller, _ = train(records, cfg, ControllerConfig(input_size=3, hidden_size=16, mlp_hidden=16), progress=False)
    rule = threshold_depths(records.states, tune_threshold(records, cost))
    agree = (controller_depths(controller, records.states) == rule).double().mean()
    assert agree > 0.9 and len(set(rule.tolist())) > 1
