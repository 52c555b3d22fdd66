"""The controller's training data (paper Sec. 2.3): one record per prefix, stored as Parquet.

A record x = {S, D} plus metadata:

    states  S (t_max, k) float32: s_t = the top-k cumulative draft log-probs of the frontier after t draft calls,
            sorted descending, built with `radar.controller.state.frontier_state` (so narrow frontiers are padded
            exactly as the live controller sees them). The policy decides on s_1..s_{t_max - 1}; s_{t_max} is kept
            for analysis.
    dists   D (t_max, t_max + 1) float32: row i - 1 is d_i, the law of the number of accepted draft tokens
            (bonus excluded) over 0..t_max when the tree is built with i draft calls; d_i(l) = 0 for l > i.
    nodes   (n, 4) float32, schema 2: the cycle's pool as far as any tree of up to `budget` tokens reaches (the
            union of T_1..T_tmax, parents before children), one row per node: parent (row index, -1 for the root),
            depth, cumulative draft log-prob, and the target's probability of the node's token given its parent
            (its acceptance probability; 0/1 at temperature 0). That is all the acceptance law of any (calls,
            budget <= `budget`) tree needs: `radar.controller.budgets`.
    prompt_id, position (index of the prefix's last committed token), target, draft (model names),
    temperature, budget (the tree tokens the records were collected with; 0 when unknown, schema 1),
    schema_version.

Schema 1 shards (no nodes, no budget column) stay readable: depth-only training and simulation work on them, and
anything that needs another budget says they must be re-collected.

Storage: Parquet files (`*.parquet`, one per shard) with list columns `states` (list<list<float>>) and `dists`,
the scalar metadata columns, and the file-level key `radar.schema_version`. `read_records` takes one file or a
directory of shards. In memory, `RecordSet` holds the tensors batched (N, t_max, k) and (N, t_max, t_max + 1)
plus a metadata DataFrame, which is what training and simulation consume.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from radar.common.files import write_atomic_with

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_COLUMNS = ("prompt_id", "position", "target", "draft", "temperature", "budget", "schema_version")
NODE_FIELDS = ("parent", "depth", "score", "p_accept")
SCHEMA_KEY = b"radar.schema_version"
DIST_TOLERANCE = 1e-3


@dataclass
class Record:
    """One prefix's record; see the module docstring for the fields."""

    states: np.ndarray  # (t_max, k)
    dists: np.ndarray  # (t_max, t_max + 1)
    prompt_id: str
    position: int
    target: str
    draft: str
    temperature: float
    schema_version: int = SCHEMA_VERSION
    nodes: np.ndarray | None = None  # (n, 4), see NODE_FIELDS
    budget: int = 0


@dataclass
class RecordSet:
    """A batch of records: states (N, t_max, k), dists (N, t_max, t_max + 1), meta (N rows of META_COLUMNS) and,
    from schema 2, nodes (N, n_max, 4) padded with rows of depth 0."""

    states: torch.Tensor
    dists: torch.Tensor
    meta: pd.DataFrame
    nodes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.states = torch.as_tensor(self.states, dtype=torch.float32)
        self.dists = torch.as_tensor(self.dists, dtype=torch.float32)
        meta = self.meta if "budget" in self.meta.columns else self.meta.assign(budget=0)
        missing = [c for c in META_COLUMNS if c not in meta.columns]
        if missing:
            raise ValueError(f"record metadata lacks columns {missing}")
        self.meta = meta[list(META_COLUMNS)].reset_index(drop=True).astype(
            {"prompt_id": str, "position": "int64", "target": str, "draft": str, "temperature": "float64",
             "budget": "int64", "schema_version": "int64"})
        validate(self.states, self.dists, len(self.meta))
        if self.nodes is not None:
            self.nodes = torch.as_tensor(self.nodes, dtype=torch.float32)
            if self.nodes.dim() != 3 or self.nodes.shape[0] != len(self) or self.nodes.shape[2] != len(NODE_FIELDS):
                raise ValueError(f"nodes must be (N, n, {len(NODE_FIELDS)}) for {len(self)} records, got "
                                 f"{tuple(self.nodes.shape)}")

    @property
    def budget(self) -> int:
        """The tree tokens every record was collected with (0 when unknown); mixed budgets are an error."""
        budgets = set(self.meta["budget"].tolist())
        if len(budgets) > 1:
            raise ValueError(f"records collected with different tree budgets {sorted(budgets)}; use one budget")
        return int(budgets.pop()) if budgets else 0

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def t_max(self) -> int:
        """Draft calls per cycle the records cover (states' second axis)."""
        return self.states.shape[1]

    @property
    def k(self) -> int:
        """Frontier scores per state (states' last axis)."""
        return self.states.shape[2]

    def __getitem__(self, idx) -> "RecordSet":
        """A subset by index array, slice, boolean mask or int (an int still gives a RecordSet of one)."""
        if isinstance(idx, (int, np.integer)):
            idx = [int(idx)]
        if isinstance(idx, slice):
            rows = np.arange(len(self))[idx]
        else:
            rows = np.atleast_1d(np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx))
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
        t = torch.as_tensor(rows, dtype=torch.long)
        return RecordSet(self.states[t], self.dists[t], self.meta.iloc[rows],
                         None if self.nodes is None else self.nodes[t])

    @classmethod
    def from_records(cls, records: Sequence[Record]) -> "RecordSet":
        """Batch a list of records."""
        if not records:
            raise ValueError("no records")
        states = torch.as_tensor(np.stack([np.asarray(r.states, dtype=np.float32) for r in records]))
        dists = torch.as_tensor(np.stack([np.asarray(r.dists, dtype=np.float32) for r in records]))
        meta = pd.DataFrame([{c: getattr(r, c) for c in META_COLUMNS} for r in records], columns=list(META_COLUMNS))
        has = {r.nodes is not None for r in records}
        if has == {True, False}:
            raise ValueError("some records carry their pool's nodes and some do not")
        nodes = pad_nodes([torch.as_tensor(np.array(r.nodes, dtype=np.float32)) for r in records]) \
            if has == {True} else None
        return cls(states, dists, meta, nodes)

    def to_records(self) -> list[Record]:
        """One `Record` per row (nodes without their padding)."""
        rows = self.meta.to_dict("records")
        return [
            Record(states=self.states[i].numpy(), dists=self.dists[i].numpy(), **{c: rows[i][c] for c in META_COLUMNS},
                   nodes=None if self.nodes is None else self.nodes[i][self.nodes[i, :, 1] > 0].numpy())
            for i in range(len(self))
        ]

    @staticmethod
    def concat(parts: Sequence["RecordSet"]) -> "RecordSet":
        """Stack record sets with the same (t_max, k)."""
        if not parts:
            raise ValueError("no record sets to concatenate")
        shapes = {tuple(p.states.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"record sets disagree on (t_max, k): {sorted(shapes)}")
        with_nodes = {p.nodes is not None for p in parts}
        if with_nodes == {True, False}:
            raise ValueError("cannot mix schema 1 records (no pool nodes) with schema 2 ones; re-collect the old ones")
        return RecordSet(
            torch.cat([p.states for p in parts]),
            torch.cat([p.dists for p in parts]),
            pd.concat([p.meta for p in parts], ignore_index=True),
            pad_nodes([p.nodes for p in parts], batched=True) if with_nodes == {True} else None,
        )


def pad_nodes(parts: Sequence[torch.Tensor], batched: bool = False) -> torch.Tensor:
    """Stack (n_i, 4) node tables (or (N_i, n_i, 4) batches) into one batch padded with rows of depth 0."""
    parts = [p if batched else p[None] for p in parts]
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts])


def validate(states: torch.Tensor, dists: torch.Tensor, n_meta: int | None = None) -> None:
    """Raise ValueError unless the shapes agree and every d_i is a distribution supported on 0..i."""
    if states.dim() != 3 or dists.dim() != 3:
        raise ValueError(f"states must be (N, t_max, k) and dists (N, t_max, t_max + 1); got "
                         f"{tuple(states.shape)} and {tuple(dists.shape)}")
    n, t_max, _ = states.shape
    if dists.shape != (n, t_max, t_max + 1):
        raise ValueError(f"dists must be {(n, t_max, t_max + 1)} for states {tuple(states.shape)}, "
                         f"got {tuple(dists.shape)}")
    if n_meta is not None and n_meta != n:
        raise ValueError(f"{n} records but {n_meta} metadata rows")
    if n == 0:
        return
    if not torch.isfinite(states).all():
        raise ValueError("states must be finite (clamp with radar.controller.state.frontier_state)")
    if (dists < -1e-6).any() or not torch.isfinite(dists).all():
        raise ValueError("dists must be finite and non-negative")
    sums = dists.double().sum(-1)
    bad = (sums - 1).abs() > DIST_TOLERANCE
    if bad.any():
        r, i = bad.nonzero()[0].tolist()
        raise ValueError(f"record {r}: d_{i + 1} sums to {sums[r, i]:.6f}, not 1")
    beyond = torch.arange(t_max + 1)[None, :] > torch.arange(1, t_max + 1)[:, None]  # l > i
    if (dists[:, beyond].abs() > DIST_TOLERANCE).any():
        r = int((dists[:, beyond].abs() > DIST_TOLERANCE).any(-1).nonzero()[0])
        raise ValueError(f"record {r}: some d_i puts mass on acceptance lengths > i (a tree of depth i)")


# ---- Parquet ------------------------------------------------------------------------------------------


def _nested(x: torch.Tensor):
    """(N, a, b) float32 tensor -> a pyarrow list<list<float>> array, built from offsets (no Python loop)."""
    import pyarrow as pa

    n, a, b = x.shape
    values = pa.array(x.reshape(-1).numpy(), type=pa.float32())
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * a * b + 1, b, dtype=np.int32)), values)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * a + 1, a, dtype=np.int32)), inner)


def _ragged(nodes: torch.Tensor):
    """(N, n_max, 4) padded node tables -> a list<list<float>> array holding each record's real rows only."""
    import pyarrow as pa

    real = nodes[:, :, 1] > 0  # padding rows have depth 0
    lengths = real.sum(1).numpy()
    values = pa.array(nodes[real].reshape(-1).numpy(), type=pa.float32())
    width = nodes.shape[2]
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, int(lengths.sum()) * width + 1, width, dtype=np.int32)),
                                     values)
    return pa.ListArray.from_arrays(pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)), inner)


def _unragged(col, source: str) -> torch.Tensor:
    """The `nodes` column back to an (N, n_max, 4) batch padded with depth-0 rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    values = np.array(arr.flatten().flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    width = len(NODE_FIELDS)
    if values.size != lengths.sum() * width:
        raise ValueError(f"{source}: column 'nodes' rows must have {width} fields each")
    flat = torch.from_numpy(values).view(-1, width)
    out = torch.zeros(len(lengths), int(lengths.max(initial=0)), width)
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.from_numpy(lengths))
    cols = torch.arange(len(flat)) - torch.repeat_interleave(torch.from_numpy(np.cumsum(lengths) - lengths),
                                                             torch.from_numpy(lengths))
    out[rows, cols] = flat
    return out


def _unnested(col, shape_tail: tuple[int, int] | None, name: str, source: str) -> np.ndarray:
    """A list<list<float>> column (ChunkedArray) -> (N, a, b) float32, checking every row has the same shape."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    outer = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    inner_arr = arr.flatten()
    inner = pc.list_value_length(inner_arr).to_numpy(zero_copy_only=False)
    if n == 0:
        return np.zeros((0, *(shape_tail or (0, 0))), dtype=np.float32)
    a, b = int(outer[0]), int(inner[0]) if len(inner) else 0
    if (outer != a).any() or (inner != b).any():
        raise ValueError(f"{source}: column {name!r} has rows of different shapes")
    if shape_tail is not None and (a, b) != shape_tail:
        raise ValueError(f"{source}: column {name!r} rows are {(a, b)}, expected {shape_tail}")
    values = np.array(inner_arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)  # writable copy
    return values.reshape(n, a, b)


def write_records(records: RecordSet | Sequence[Record], path: str | Path) -> Path:
    """Write one Parquet shard atomically (temp file + rename), so a killed writer never leaves a partial
    shard. `path` ending in .parquet is the file; otherwise it is a directory and a uniquely named shard is
    created in it. Returns the file written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rs = records if isinstance(records, RecordSet) else RecordSet.from_records(list(records))
    if len(rs) == 0:
        raise ValueError("refusing to write an empty shard")
    versions = set(rs.meta["schema_version"].astype(int))
    if versions != {SCHEMA_VERSION} or rs.nodes is None:
        raise ValueError(f"records carry schema versions {sorted(versions)}"
                         f"{'' if rs.nodes is not None else ' without pool nodes'}, this radar writes "
                         f"{SCHEMA_VERSION} (with nodes)")
    p = Path(path)
    if p.suffix != ".parquet":
        p.mkdir(parents=True, exist_ok=True)
        p = p / f"part-{uuid.uuid4().hex[:12]}.parquet"
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
    meta = rs.meta
    table = pa.table({
        "states": _nested(rs.states.contiguous()),
        "dists": _nested(rs.dists.contiguous()),
        "prompt_id": pa.array(meta["prompt_id"].astype(str).tolist(), type=pa.string()),
        "position": pa.array(meta["position"].astype("int64").to_numpy(), type=pa.int64()),
        "target": pa.array(meta["target"].astype(str).tolist(), type=pa.string()),
        "draft": pa.array(meta["draft"].astype(str).tolist(), type=pa.string()),
        "temperature": pa.array(meta["temperature"].astype("float64").to_numpy(), type=pa.float64()),
        "budget": pa.array(meta["budget"].astype("int64").to_numpy(), type=pa.int64()),
        "nodes": _ragged(rs.nodes),
        "schema_version": pa.array(meta["schema_version"].astype("int32").to_numpy(), type=pa.int32()),
    })
    table = table.replace_schema_metadata({SCHEMA_KEY: str(SCHEMA_VERSION).encode(),
                                           b"radar.t_max": str(rs.t_max).encode(), b"radar.k": str(rs.k).encode()})
    return write_atomic_with(p, lambda tmp: pq.write_table(table, tmp))


def shard_files(path: str | Path) -> list[Path]:
    """The Parquet files a path names: itself, or every *.parquet under a directory (sorted, recursive, hidden
    temp files excluded)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise FileNotFoundError(f"no dataset at {p}; collect one first (radar collect)")
    return sorted(f for f in p.rglob("*.parquet") if not f.name.startswith("."))


def read_records(path: str | Path) -> RecordSet:
    """Read a Parquet file or a directory of shards into one RecordSet, checking the schema version."""
    import pyarrow.parquet as pq

    files = shard_files(path)
    parts: list[RecordSet] = []
    shape: tuple[int, int] | None = None
    for f in files:
        table = pq.read_table(f)
        file_version = (table.schema.metadata or {}).get(SCHEMA_KEY)
        if file_version is not None and int(file_version) not in READABLE_VERSIONS:
            raise ValueError(_version_error(f, int(file_version)))
        if file_version is None:  # written without the key: the columns tell
            v1 = "nodes" not in table.column_names
        else:
            v1 = int(file_version) == 1
        needed = [c for c in META_COLUMNS if not (v1 and c == "budget")] + ([] if v1 else ["nodes"])
        missing = [c for c in ("states", "dists", *needed) if c not in table.column_names]
        if missing:
            raise ValueError(f"{f} is not a RADAR record shard: missing columns {missing}")
        if table.num_rows == 0:
            continue
        versions = set(table.column("schema_version").to_pylist())
        if versions != {1 if v1 else SCHEMA_VERSION}:
            raise ValueError(_version_error(f, sorted(versions)))
        states = _unnested(table.column("states"), None if shape is None else shape, "states", str(f))
        t_max = states.shape[1]
        dists = _unnested(table.column("dists"), (t_max, t_max + 1), "dists", str(f))
        if shape is None:
            shape = states.shape[1:]
        meta = table.select([c for c in META_COLUMNS if c in table.column_names]).to_pandas()
        nodes = None if v1 else _unragged(table.column("nodes"), str(f))
        parts.append(RecordSet(torch.from_numpy(states), torch.from_numpy(dists), meta, nodes))
    if not parts:
        raise ValueError(f"no records in {path} ({len(files)} Parquet file(s)); collect some first (radar collect)")
    return RecordSet.concat(parts)


def _version_error(f: Path, found) -> str:
    return (f"{f} has record schema version {found}, this radar reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; re-collect the dataset with this version (radar collect)")


def to_dataframe(records: RecordSet) -> pd.DataFrame:
    """One row per record with `states`/`dists` as nested lists (for inspection, not for training)."""
    df = records.meta.copy()
    df.insert(0, "dists", [d.tolist() for d in records.dists])
    df.insert(0, "states", [s.tolist() for s in records.states])
    return df


# ---- splits -------------------------------------------------------------------------------------------


def split(
    records: RecordSet, fractions: Sequence[float] = (0.8, 0.2), seed: int = 0, by: str | None = "prompt_id"
) -> list[RecordSet]:
    """Random split into len(fractions) parts. With `by` (default prompt_id) whole groups go to one part, so
    prefixes of one prompt never sit on both sides; fractions then hold in groups, not records. Parts can be
    empty only when there are fewer groups than parts."""
    if not fractions or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions}")
    total = float(sum(fractions))
    keys = records.meta[by].astype(str).to_numpy() if by else np.arange(len(records)).astype(str)
    groups = np.unique(keys)  # sorted, so the split does not depend on record order within the file
    order = np.random.default_rng(seed).permutation(len(groups))
    bounds = np.round(np.cumsum([0.0, *fractions]) / total * len(groups)).astype(int)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        chosen = set(groups[order[a:b]])
        parts.append(records[np.fromiter((k in chosen for k in keys), dtype=bool, count=len(keys))])
    return parts


def train_test_split(
    records: RecordSet, test_fraction: float = 0.2, seed: int = 0, by: str | None = "prompt_id"
) -> tuple[RecordSet, RecordSet]:
    """Split into (train, test) by `split`, failing clearly when either side would be empty."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test = split(records, (1 - test_fraction, test_fraction), seed=seed, by=by)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"split left an empty side ({len(train)} train, {len(test)} test records); need more "
                         f"distinct {by or 'records'}")
    return train, test


__all__ = [
    "SCHEMA_VERSION", "READABLE_VERSIONS", "NODE_FIELDS", "Record", "RecordSet", "pad_nodes", "validate",
    "write_records", "read_records", "shard_files",
    "to_dataframe", "split", "train_test_split",
]
