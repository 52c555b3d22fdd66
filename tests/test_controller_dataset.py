"""Record schema, Parquet shards, schema-version checks, splits and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from radar.controller.dataset import (
    SCHEMA_VERSION,
    Record,
    RecordSet,
    read_records,
    split,
    to_dataframe,
    train_test_split,
    write_records,
)
from radar.controller.synthetic import synthetic_records


def test_synthetic_records_are_valid_and_state_dependent():
    rs = synthetic_records(200, t_max=6, k=5, seed=2)
    assert rs.states.shape == (200, 6, 5) and rs.dists.shape == (200, 6, 7)
    torch.testing.assert_close(rs.dists.sum(-1), torch.ones(200, 6))
    # States are sorted descending and d_i has no mass beyond i.
    assert (rs.states[..., :-1] >= rs.states[..., 1:]).all()
    for i in range(1, 7):
        assert (rs.dists[:, i - 1, i + 1:] == 0).all()
    # d_i and d_{i+1} agree below i (one extra call only splits the mass at l = i).
    torch.testing.assert_close(rs.dists[:, 2, :2], rs.dists[:, 3, :2])
    # Higher first-step confidence means more accepted tokens.
    conf = rs.states[:, 0, 0]
    mean_l = (rs.dists[:, -1] * torch.arange(7)).sum(-1)
    assert mean_l[conf > conf.median()].mean() > 2 * mean_l[conf <= conf.median()].mean()
    assert torch.equal(synthetic_records(10, seed=4).states, synthetic_records(10, seed=4).states)


def test_parquet_round_trip_file_and_directory(tmp_path):
    rs = synthetic_records(50, seed=1)
    f = write_records(rs, tmp_path / "one.parquet")
    back = read_records(f)
    assert torch.equal(back.states, rs.states) and torch.equal(back.dists, rs.dists)
    assert back.meta.to_dict("records") == rs.meta.to_dict("records")

    # A directory of shards (read in name order), from RecordSets and from plain Records, reads back as one set.
    d = tmp_path / "shards"
    write_records(rs[:20], d / "part-0.parquet")
    write_records(rs[20:].to_records(), d / "part-1.parquet")
    both = read_records(d)
    assert torch.equal(both.states, rs.states) and both.meta.equals(rs.meta)
    # Given a directory, write_records names a fresh shard itself; nothing temporary is left behind.
    shard = write_records(rs[:5], d)
    assert shard.parent == d and len(read_records(d)) == 55
    assert not any(p.name.startswith(".") for p in d.iterdir())

    # Nested lists on disk, readable by plain pandas too.
    df = pq.read_table(f).to_pandas()
    assert len(df["states"][0]) == rs.t_max and len(df["states"][0][0]) == rs.k
    assert to_dataframe(rs)["dists"][0] == rs.dists[0].tolist()


def test_record_fields_round_trip():
    rec = Record(states=np.zeros((2, 3), np.float32), dists=np.array([[0.4, 0.6, 0], [0.2, 0.3, 0.5]], np.float32),
                 prompt_id="p", position=7, target="t", draft="d", temperature=0.5)
    back = RecordSet.from_records([rec]).to_records()[0]
    assert back.prompt_id == "p" and back.position == 7 and back.temperature == 0.5
    assert back.schema_version == SCHEMA_VERSION
    np.testing.assert_array_equal(back.dists, rec.dists)


def test_version_mismatch_is_a_clear_error(tmp_path):
    f = write_records(synthetic_records(5), tmp_path / "a.parquet")
    table = pq.read_table(f)
    old = table.set_column(table.column_names.index("schema_version"), "schema_version",
                           pa.array([SCHEMA_VERSION + 1] * 5, type=pa.int32()))
    pq.write_table(old.replace_schema_metadata({}), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match=f"schema version .*{SCHEMA_VERSION + 1}.*reads versions 1, {SCHEMA_VERSION}"):
        read_records(tmp_path / "old.parquet")
    meta_only = table.replace_schema_metadata({b"radar.schema_version": b"99"})
    pq.write_table(meta_only, tmp_path / "meta.parquet")
    with pytest.raises(ValueError, match="schema version 99"):
        read_records(tmp_path / "meta.parquet")


def test_empty_or_missing_dataset_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no records in"):
        read_records(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="radar collect"):
        read_records(tmp_path / "missing")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        read_records(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="empty shard"):
        write_records(synthetic_records(3)[[]], tmp_path / "e.parquet")


def test_validation_rejects_bad_distributions():
    rs = synthetic_records(4, t_max=3)
    bad = rs.dists.clone()
    bad[1, 0] = torch.tensor([0.5, 0.4, 0.1, 0.0])  # d_1 with mass at l = 2
    with pytest.raises(ValueError, match="record 1.*> i"):
        RecordSet(rs.states, bad, rs.meta)
    bad = rs.dists.clone()
    bad[2, 1, 0] += 0.1
    with pytest.raises(ValueError, match="record 2: d_2 sums to"):
        RecordSet(rs.states, bad, rs.meta)
    with pytest.raises(ValueError, match="dists must be"):
        RecordSet(rs.states, rs.dists[:, :, :3], rs.meta)
    states = rs.states.clone()
    states[0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match="finite"):
        RecordSet(states, rs.dists, rs.meta)


def test_split_keeps_prompts_whole_and_is_seeded():
    rs = synthetic_records(400, seed=0, prefixes_per_prompt=8)  # 50 prompts
    train, test = train_test_split(rs, test_fraction=0.2, seed=3)
    assert len(train) + len(test) == 400
    assert set(train.meta.prompt_id).isdisjoint(test.meta.prompt_id)
    assert len(set(test.meta.prompt_id)) == 10
    again, _ = train_test_split(rs, test_fraction=0.2, seed=3)
    assert train.meta.equals(again.meta)
    other, _ = train_test_split(rs, test_fraction=0.2, seed=4)
    assert not train.meta.equals(other.meta)
    parts = split(rs, (0.5, 0.3, 0.2), seed=0, by=None)
    assert [len(p) for p in parts] == [200, 120, 80]
    with pytest.raises(ValueError, match="empty side"):
        train_test_split(synthetic_records(4, prefixes_per_prompt=8), 0.2)
