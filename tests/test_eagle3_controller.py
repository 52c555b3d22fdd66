"""The controller's tools work with an EAGLE-3 head as the draft: record collection decodes exactly what the engine
decodes at depth t_max, and profiling measures the head's costs."""

from __future__ import annotations

import pytest

from radar.common.prompts import Prompt
from radar.controller.collect import collect_prompt
from radar.controller.profile import profile_costs
from radar.decoding.model import Transformer
from radar.decoding.pair import ModelPair
from radar.decoding.tree import TreeConfig
from tiny_models import make_tiny_eagle3

T_MAX, K = 3, 4


@pytest.fixture(scope="module")
def head_pair(tiny_pair, tmp_path_factory) -> ModelPair:
    target_dir, _ = tiny_pair
    head_dir = tmp_path_factory.mktemp("head") / "head"
    make_tiny_eagle3(Transformer.from_pretrained(target_dir), draft_vocab=64, layer_ids=(0, 1, 1)).save_pretrained(
        head_dir)
    return ModelPair.load(target_dir, head_dir, device="cpu")


def test_collection_with_a_head_commits_what_the_engine_decodes_at_depth_t_max(head_pair):
    prompt = Prompt("p0", "def add(a, b):", "test")
    records, tokens = collect_prompt(head_pair, prompt, t_max=T_MAX, k=K, total_tokens=6, max_new_tokens=12)
    head_pair.tree = TreeConfig(branching=K, max_calls=T_MAX, total_tokens=6)
    engine = head_pair.generate(head_pair.chat_ids(prompt.text), f"tree:{T_MAX}", max_new_tokens=12)
    assert tokens == engine.token_ids
    assert len(records) == len(engine.stats.accept_lengths)  # one record per cycle


def test_profiling_a_head_measures_positive_costs(head_pair):
    cost = profile_costs(head_pair, t_max=T_MAX, k=K, total_tokens=6, prompt_tokens=16, repeats=2)
    assert min(cost.T_0, cost.T_f, cost.T_eye, cost.ar_step) > 0
