"""Your data in: event logs -> point-in-time lifelong-sequence samples on disk.

``prepare`` reads event logs (CSV or Parquet, with pyarrow) and writes a *sample store*, a
directory that ``torchrec_longseq.data.store.SampleStore`` reads. Everything is vectorised numpy /
pyarrow.compute: no Python loop runs per row, event or sample (loops run per file, per column,
per sequence, per shard, per resampling round).

Inputs
------
A log has one event per row: ``user``, ``item``, ``timestamp`` (integer seconds; Parquet
timestamp columns are converted to seconds since the epoch), any number of id *attribute*
columns (category, shop, ...), optionally a *behavior type* column (``pv``, ``buy``, ...) and
optionally a *label* column (0/1, e.g. ``clicked``). ``ColumnMapping`` names the columns;
``ColumnMapping.taobao()`` is the public Taobao UserBehavior file (``user_id, item_id,
category_id, behavior_type, timestamp``, no header, behavior types ``pv, cart, fav, buy``). Ids
must be integers.

Targets and labels
------------------
* **Explicit labels** (the target rows' mapping has a ``label`` column): the targets are the rows
  of the impression file (``impressions=``), or the rows of the event file whose behavior type is
  in ``target_behaviors``; their label is the label column. The histories come from the event
  log, filtered by behavior type per sequence.
* **Implicit labels** (no label column, e.g. Taobao): the targets are the events whose behavior
  type is in ``target_behaviors`` (all events when ``None``), label 1. For each of them,
  ``negatives_per_positive`` negatives (label 0) are drawn with a ``numpy.random.Generator``
  seeded by ``seed``: items drawn uniformly, independently (with replacement), from all items
  of the logs, rejecting any item the user interacted with (any behavior type, any file) *at or
  before* the target's time - so a negative is never an item the user had seen before the
  target, nor the target item itself. Rejected draws are redrawn, vectorised over all pending
  draws, for at most ``negative_rounds`` rounds; a draw still rejected after that (a user who
  has seen nearly all items: the chance is ``seen_share ** negative_rounds``) is dropped, and
  the number of dropped negatives is printed and recorded in ``meta.json``
  (``skipped.negatives_not_drawn``). A negative shares its positive's user, request time,
  history slices, split and ``event``; its attributes (category, ...) are the item's own: those
  of the item's most recent event in the logs (largest timestamp; ties: the later row, event
  file(s) before impression file).

Samples
-------
A sample is ``(user, target event, label, split)``. Its history, per sequence, is the user's
events of that sequence's behavior types *strictly before* the target's timestamp (events at
the same second are not history: point-in-time correct), the most recent ``max_seq_len`` of
them, oldest first. As the events of a sequence are stored sorted by (user, time) (stable: ties
keep file order), a history is the slice ``[start, end)`` of that sequence's arrays, stored as
two integers per sample, not a copy. ``event`` is the target's 0-based data row in its source
(the concatenation of the target files' parsed data rows: rows skipped for a bad value count,
rows with the wrong number of fields do not); a negative carries its positive's.

Splits by target time (``split_of``): ``time < train_end`` -> train, ``< val_end`` -> val, else
test. A cut-off left ``None`` never splits (no ``val_end``: no test split; no ``train_end``:
train up to ``val_end``).

Ids
---
Every id column (``user``, ``item``, each attribute) becomes a row of an embedding table, per
column either

* *dense* (default): raw ids -> rows ``1..n`` in ascending raw-id order over all files; row 0 is
  reserved for padding / ids unknown at serving time. The mapping is ``vocab/<column>.npy``, the
  sorted raw ids (row ``r`` is ``vocab[r - 1]``); ``IdMapping.lookup`` maps raw ids, unknown ->
  0; or
* *hashed* (``hash_buckets={column: size}``): ``row = splitmix64(raw as uint64) % size`` (the
  splitmix64 finaliser, see ``hash_ids``), no row reserved, nothing saved but the size.

Table sizes (dense: ``n + 1``; hashed: ``size``) are in ``meta.json``. Events are grouped by the
dense user row even when the user *feature* is hashed. Behavior types are codes ``1..k`` in the
order of ``meta["behavior_types"]`` (0: none).

Store layout
------------
::

    meta.json                        columns, tables, sequences, splits, counts, skipped, shards
    vocab/<column>.npy               [n] int64 sorted raw ids of each dense id column
    sequences/<name>/offsets.npy     [U + 1] int64: user row u's events are [offsets[u], offsets[u+1])
    sequences/<name>/time.npy        [N] int64, sorted by (user, time)
    sequences/<name>/item.npy        [N] id rows (and <attribute>.npy; behavior.npy [N] int8)
    shards/<kkkkk>/user.npy              [S_k] user feature (dense row or hash)
    shards/<kkkkk>/time.npy              [S_k] int64 request (target) time
    shards/<kkkkk>/label.npy             [S_k] float32
    shards/<kkkkk>/event.npy             [S_k] the target's data row
    shards/<kkkkk>/target/<column>.npy   [S_k] item and attributes of the target
    shards/<kkkkk>/history/<seq>/start.npy, end.npy   [S_k] slice [start, end) of sequences/<seq>

Id rows, ``event``, ``start`` and ``end`` are stored as int32 when their range fits (int64
otherwise); ``SampleStore`` hands out int64. ``U`` is the number of dense user rows (row 0 included, empty). Shards are contiguous ranges of
dense user rows (a user never spans two shards), cut so that each shard holds about
``S / num_shards`` samples; a shard's history is thus a contiguous block of each sequence. In a
shard, samples are ordered by split (train, val, test), then user, then time;
``meta["shards"][k]["samples"]`` gives the count per split. ``meta.json`` is written last.

Sorting packs ``(user row, time, position)`` into one int64 and sorts the values (numpy's SIMD
sort; stable by construction); when the key does not fit in 63 bits it falls back to a stable
``argsort``. Times are replaced by their rank among all times when ``users * time span`` would
not fit. Peak memory is about 150 bytes per event above the interpreter (10M Taobao events:
1.5 GB; ``benchmarks/prepare.py``).

Bad rows
--------
A row with a non-integer or missing id or timestamp, an unknown behavior type (when the types
are declared), a missing or non-0/1 label (target rows only), or the wrong number of fields
raises ``ValueError("<file>, row <r>, column '<c>': <reason>")`` (a row with the wrong number
of fields: ``"<file>, row <r>: expected <n> fields, got <m>"``) with ``r`` the 1-based data row
(header not counted; for Parquet the row in the file) - or, with ``on_bad_rows="skip"``, is dropped, counted per file and
column, printed, and recorded in ``meta["skipped"]["bad_rows"]``. Files are first read with
typed columns; only when that fails are the columns re-read as strings and validated with
``pyarrow.compute`` (regexes, null masks).

CLI::

    python -m torchrec_longseq.data.prepare UserBehavior.csv --format taobao --out store \\
        --targets buy --negatives 1 --sequence clicks=pv --sequence buys=cart,fav,buy \\
        --max-seq-len 1000 --train-end 1512000000 --val-end 1512100000 --num-shards 16
    python -m torchrec_longseq.data.prepare behaviors.parquet --user uid --item iid --time ts \\
        --attr cate --attr shop --behavior btype --sequence clicks=click --hash shop=100000 \\
        --impressions imps.csv --impressions-config imps.json --out store   # imps.json: {..., "label": "clicked"}
    python -m torchrec_longseq.data.prepare events.csv --config mapping.json --out store
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time as _time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

PathLike = Union[str, "os.PathLike[str]"]
SPLITS: Tuple[str, ...] = ("train", "val", "test")
TAOBAO_COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
TAOBAO_BEHAVIORS = ["pv", "cart", "fav", "buy"]
DEFAULT_SEQUENCE = "history"
_RESERVED = {"user", "item", "time", "behavior", "label", "lengths", "event", "request_time"}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INT_RE = r"^\s*-?\d{1,18}\s*$"
_NUM_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
_BLOCK_SIZE = 4 << 20


# --------------------------------------------------------------------------------------------
# Column mapping


@dataclass
class ColumnMapping:
    """Which file columns hold what.

    ``user``, ``item``, ``timestamp``: column names. ``attributes``: id attribute columns (their
    names are also the store's names for them). ``behavior``: the behavior type column, with
    ``behavior_types`` the allowed values (``None``: whatever the event file holds, in sorted
    order of first file). ``label``: 0/1 label column (explicit labels). ``names``: column names
    for a CSV without a header (or to rename a header, with ``header=True``); ``header``: whether
    the CSV's first line is a header (default: ``names is None``). ``delimiter``: CSV delimiter.
    """

    user: str
    item: str
    timestamp: str
    attributes: List[str] = field(default_factory=list)
    behavior: Optional[str] = None
    label: Optional[str] = None
    behavior_types: Optional[List[str]] = None
    names: Optional[List[str]] = None
    header: Optional[bool] = None
    delimiter: str = ","

    @classmethod
    def taobao(cls) -> "ColumnMapping":
        """The Taobao UserBehavior layout (no header, ``pv/cart/fav/buy``, implicit labels)."""
        return cls(
            user="user_id",
            item="item_id",
            timestamp="timestamp",
            attributes=["category_id"],
            behavior="behavior_type",
            behavior_types=list(TAOBAO_BEHAVIORS),
            names=list(TAOBAO_COLUMNS),
            header=False,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "ColumnMapping":
        """From a plain dict (the keys are this class's fields; ``time`` = ``timestamp``)."""
        d = dict(d)
        if "time" in d and "timestamp" not in d:
            d["timestamp"] = d.pop("time")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown column mapping keys {unknown} (known: {sorted(known)})")
        for key in ("attributes", "behavior_types", "names"):
            if isinstance(d.get(key), str):
                d[key] = [s for s in str(d[key]).split(",") if s]
        if d.get("behavior_types") is not None:
            d["behavior_types"] = [str(b) for b in d["behavior_types"]]  # type: ignore[union-attr]
        return cls(**d)  # type: ignore[arg-type]

    def file_columns(self) -> Dict[str, str]:
        """Logical name -> file column, for the columns present (``user, item, <attributes>,
        behavior, time, label``)."""
        cols = {"user": self.user, "item": self.item}
        cols.update({a: a for a in self.attributes})
        if self.behavior:
            cols["behavior"] = self.behavior
        cols["time"] = self.timestamp
        if self.label:
            cols["label"] = self.label
        return cols

    def uses_header(self) -> bool:
        return self.names is None if self.header is None else self.header


def load_config(path: PathLike) -> Dict[str, object]:
    """Read a JSON (or, when PyYAML is importable, YAML) config file into a dict."""
    text = open(path, encoding="utf-8").read()
    if str(path).endswith((".yaml", ".yml")):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError as e:
            raise ValueError(f"{path}: YAML needs PyYAML, which is not installed; use JSON") from e
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def _resolve_mapping(mapping: Union[str, Mapping[str, object], ColumnMapping]) -> ColumnMapping:
    if isinstance(mapping, ColumnMapping):
        return mapping
    if isinstance(mapping, str):
        if mapping == "taobao":
            return ColumnMapping.taobao()
        return ColumnMapping.from_dict(load_config(mapping))
    return ColumnMapping.from_dict(mapping)


# --------------------------------------------------------------------------------------------
# Ids: dense vocabularies and hashing


def hash_ids(raw: np.ndarray, size: int) -> np.ndarray:
    """``[n]`` int64 raw ids -> ``[n]`` int64 rows in ``[0, size)``: the splitmix64 finaliser of
    the id's 64 bits (``z += 0x9E3779B97F4A7C15; z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9;
    z = (z ^ z >> 27) * 0x94D049BB133111EB; z ^= z >> 31``, mod 2**64) modulo ``size``.
    Deterministic across runs, machines and numpy versions."""
    z = np.asarray(raw, dtype=np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z % np.uint64(size)).astype(np.int64)


@dataclass(frozen=True)
class IdMapping:
    """Raw id -> table row for one id column: dense (``keys``: ``[n]`` sorted raw ids, row
    ``r`` <-> ``keys[r - 1]``, row 0 for unknown) or hashed (``hash_size``)."""

    column: str
    keys: Optional[np.ndarray] = None
    hash_size: Optional[int] = None

    @property
    def size(self) -> int:
        """Rows of the embedding table: ``n + 1`` (dense) or the hash size."""
        return int(self.hash_size) if self.hash_size is not None else int(len(self.keys)) + 1

    @property
    def hashed(self) -> bool:
        return self.hash_size is not None

    def lookup(self, raw: np.ndarray) -> np.ndarray:
        """``[...]`` raw ids -> ``[...]`` int64 rows; unknown ids -> 0 (dense)."""
        raw = np.asarray(raw, dtype=np.int64)
        if self.hash_size is not None:
            return hash_ids(raw, self.hash_size)
        assert self.keys is not None
        if len(self.keys) == 0:
            return np.zeros(raw.shape, np.int64)
        pos = np.searchsorted(self.keys, raw)
        found = self.keys[np.minimum(pos, len(self.keys) - 1)] == raw
        return np.where(found, pos + 1, 0).astype(np.int64)

    def raw(self, rows: np.ndarray) -> np.ndarray:
        """``[...]`` dense rows -> raw ids (row 0 -> -1). Hashed columns cannot be inverted."""
        if self.hash_size is not None:
            raise ValueError(f"column {self.column!r} is hashed: rows cannot be mapped back")
        assert self.keys is not None
        rows = np.asarray(rows, dtype=np.int64)
        padded = np.concatenate([np.array([-1], np.int64), self.keys.astype(np.int64)])
        return padded[rows]

    @classmethod
    def load(cls, store: PathLike, column: str) -> "IdMapping":
        """The mapping of ``column`` saved in the store directory ``store``."""
        meta = json.load(open(os.path.join(store, "meta.json"), encoding="utf-8"))
        table = meta["tables"][column]
        if table["kind"] == "hash":
            return cls(column, hash_size=int(table["size"]))
        return cls(column, keys=np.load(os.path.join(store, "vocab", f"{column}.npy")))


def _dense_rows(raw: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``[n]`` raw ids -> (``[m]`` sorted distinct ids, ``[n]`` rows in ``1..m``, int32 when
    ``m < 2**31``). A presence bitmap when the id range is small (linear time), ``np.unique``
    otherwise."""
    if raw.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    lo, hi = int(raw.min()), int(raw.max())
    if hi - lo < 4 * raw.size + (1 << 20):
        base = 0 if 0 <= lo < (1 << 20) else lo  # index with the raw ids themselves when possible
        idx = raw - base if base else raw
        present = np.zeros(hi - base + 1, dtype=bool)
        present[idx] = True
        keys = np.flatnonzero(present).astype(np.int64) + base
        lut = np.cumsum(present, dtype=np.int32 if keys.size < 2**31 else np.int64)
        return keys, lut[idx]
    keys, inverse = np.unique(raw, return_inverse=True)
    inverse += 1
    return keys.astype(np.int64), _narrow(inverse, keys.size + 1)


# --------------------------------------------------------------------------------------------
# Reading and validating


@dataclass
class _Log:
    """One event log after validation, in file order (all arrays ``[n]``)."""

    row: np.ndarray  # int64 data row (0-based, counting skipped rows, across the source's files)
    user: np.ndarray  # int64 raw
    item: np.ndarray  # int64 raw
    attrs: Dict[str, np.ndarray]  # int64 raw
    behavior: Optional[np.ndarray]  # int8 codes 1..k
    time: np.ndarray  # int64 seconds
    label: Optional[np.ndarray]  # float32 (0 outside the target rows)

    def __len__(self) -> int:
        return len(self.time)

    @staticmethod
    def concat(logs: Sequence["_Log"]) -> "_Log":
        if len(logs) == 1:
            return logs[0]

        def c(get: Callable[["_Log"], Optional[np.ndarray]]) -> Optional[np.ndarray]:
            parts = [get(g) for g in logs]
            return None if parts[0] is None else np.concatenate(parts)  # type: ignore[arg-type]

        return _Log(
            c(lambda g: g.row), c(lambda g: g.user), c(lambda g: g.item),  # type: ignore[arg-type]
            {k: np.concatenate([g.attrs[k] for g in logs]) for k in logs[0].attrs},
            c(lambda g: g.behavior), c(lambda g: g.time), c(lambda g: g.label),  # type: ignore[arg-type]
        )


class _BehaviorVocab:
    """Behavior type names -> codes ``1..k``; grows with new values when not declared."""

    def __init__(self, declared: Optional[Sequence[str]]) -> None:
        self.names: List[str] = [str(b) for b in declared] if declared is not None else []
        self.fixed = declared is not None

    def codes(self, names: Sequence[str]) -> np.ndarray:
        unknown = [n for n in names if str(n) not in self.names]
        if unknown:
            raise ValueError(f"unknown behavior types {unknown} (known: {self.names})")
        return np.array([self.names.index(str(n)) + 1 for n in names], dtype=np.int8)


@dataclass
class _Checked:
    """A validated column: ``values [n]``, ``bad [n]`` bool (or None) and the reason of a bad
    row (computed only for the row reported)."""

    values: np.ndarray
    bad: Optional[np.ndarray]
    reason: Callable[[int], str]


def _missing_or(arr: pa.ChunkedArray, what: str) -> Callable[[int], str]:
    def reason(i: int) -> str:
        v = arr[i].as_py()
        if v is None or (isinstance(v, str) and not v.strip()):
            return "missing value"
        return f"{what}: {v!r}"

    return reason


def _to_strings(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    return arr if pa.types.is_string(arr.type) else pc.cast(arr, pa.string())


def _numpy_int64(arr: pa.ChunkedArray) -> np.ndarray:
    """A null-free integer column -> one ``[n]`` int64 array (one copy)."""
    if arr.type != pa.int64():
        arr = pc.cast(arr, pa.int64())
    out = np.empty(len(arr), dtype=np.int64)
    at = 0
    for chunk in arr.chunks:
        out[at:at + len(chunk)] = chunk.to_numpy()
        at += len(chunk)
    return out


def _check_int(arr: pa.ChunkedArray, what: str) -> _Checked:
    """An id / timestamp column -> int64, with its bad rows (missing, not an integer)."""
    t = arr.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        arr = pc.cast(pc.cast(arr, pa.timestamp("s"), safe=False), pa.int64())
        t = arr.type
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        if not arr.null_count:
            return _Checked(_numpy_int64(arr), None, _missing_or(arr, what))
        bad = arr.is_null().to_numpy(zero_copy_only=False)
        return _Checked(_numpy_int64(pc.fill_null(arr, 0)), bad, _missing_or(arr, what))
    if pa.types.is_floating(t):
        f = pc.fill_null(pc.cast(arr, pa.float64()), np.nan).to_numpy()
        ok = np.isfinite(f) & (np.floor(f) == f) & (np.abs(f) < 2.0**62)
        values = np.where(ok, f, 0).astype(np.int64)
        return _Checked(values, None if ok.all() else ~ok, _missing_or(arr, what))
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        s = _to_strings(arr)
        ok = pc.fill_null(pc.match_substring_regex(s, _INT_RE), False)
        clean = pc.if_else(ok, pc.utf8_trim_whitespace(s), "0")
        values = pc.cast(clean, pa.int64()).to_numpy()
        okn = ok.to_numpy(zero_copy_only=False)
        return _Checked(values, None if okn.all() else ~okn, _missing_or(s, what))
    raise TypeError(f"type {t}, expected integers")


def _check_time(arr: pa.ChunkedArray) -> _Checked:
    """A timestamp column -> int64 in ``[0, 2^62)`` (the models' range: request time minus
    behavior time cannot overflow), with its bad rows."""
    checked = _check_int(arr, "not an integer")
    outside = (checked.values < 0) | (checked.values >= 2**62)
    if not outside.any():
        return checked
    bad = outside if checked.bad is None else (checked.bad | outside)

    def reason(i: int) -> str:
        if checked.bad is not None and checked.bad[i]:
            return checked.reason(i)
        return f"timestamp outside [0, 2^62): {int(checked.values[i])}"

    return _Checked(checked.values, bad, reason)


def _check_label(arr: pa.ChunkedArray) -> _Checked:
    """A label column -> float32 0.0 / 1.0, with its bad rows."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        s = _to_strings(arr)
        ok = pc.fill_null(pc.match_substring_regex(s, _NUM_RE), False)
        f = pc.cast(pc.if_else(ok, pc.utf8_trim_whitespace(s), "nan"), pa.float64()).to_numpy()
        src = s
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        f = pc.fill_null(pc.cast(arr, pa.float64()), np.nan).to_numpy()
        src = arr
    else:
        raise TypeError(f"type {t}, expected 0/1 labels")
    ok = (f == 0) | (f == 1)  # what a CTR loss and check_batch accept

    def reason(i: int) -> str:
        v = src[i].as_py()
        if v is None or (isinstance(v, str) and not v.strip()):
            return "missing value"
        return f"label not 0 or 1: {v!r}"

    return _Checked(np.where(ok, f, 0).astype(np.float32), None if ok.all() else ~ok, reason)


def _check_behavior(arr: pa.ChunkedArray, vocab: _BehaviorVocab) -> _Checked:
    """A behavior type column -> int8 codes (``vocab``), bad rows = missing / unknown types.
    Loops over chunks and over each chunk's distinct values, never over rows."""
    parts, bads = [], []
    for chunk in arr.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = pc.dictionary_encode(_to_strings(pa.chunked_array([chunk])).chunk(0))
        dictionary = [str(v) for v in _to_strings(pa.chunked_array([chunk.dictionary])).to_pylist()]
        if not vocab.fixed:
            vocab.names.extend(sorted(set(dictionary) - set(vocab.names)))
        lut = np.array([vocab.names.index(v) + 1 if v in vocab.names else 0 for v in dictionary] + [0], np.int8)
        idx = pc.fill_null(chunk.indices, len(dictionary)).to_numpy(zero_copy_only=False)
        codes = lut[idx]
        parts.append(codes)
        bads.append(codes == 0)
    codes = np.concatenate(parts) if parts else np.zeros(0, np.int8)
    bad = np.concatenate(bads) if bads else np.zeros(0, bool)
    known = ", ".join(vocab.names)

    def reason(i: int) -> str:
        v = arr[i].as_py()
        if v is None or (isinstance(v, str) and not v.strip()):
            return "missing value"
        return f"unknown behavior type {str(v)!r} (expected one of {known})"

    return _Checked(codes, bad if bad.any() else None, reason)


class _Malformed:
    """pyarrow ``invalid_row_handler``: counts rows with the wrong number of fields; skips them
    (``skip``) or lets pyarrow stop (``error``). Called per malformed row only."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.count = 0
        self.first: Optional[Tuple[Optional[int], int, int]] = None

    def __call__(self, row: "pacsv.InvalidRow") -> str:
        self.count += 1
        if self.first is None:
            self.first = (row.number, row.expected_columns, row.actual_columns)
        return "skip" if self.skip else "error"


def _is_parquet(path: PathLike) -> bool:
    return str(path).lower().endswith((".parquet", ".pq", ".parq"))


def _read_csv(path: PathLike, mapping: ColumnMapping, columns: Dict[str, str], skip: bool) -> Tuple[pa.Table, int]:
    """Read the needed columns of a CSV: typed first, as strings when a value does not parse."""
    header = mapping.uses_header()
    if mapping.names is None and not header:
        raise ValueError(f"{path}: a CSV without a header needs the column names (names=...)")
    read = dict(column_names=mapping.names, skip_rows=1 if (mapping.names and header) else 0)
    fast: Dict[str, pa.DataType] = {}
    for logical, col in columns.items():
        fast[col] = (
            pa.dictionary(pa.int32(), pa.string()) if logical == "behavior"
            else pa.float64() if logical == "label" else pa.int64()
        )
    for types in (fast, {col: pa.string() for col in columns.values()}):
        handler = _Malformed(skip)
        try:
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=_BLOCK_SIZE, **read),  # type: ignore[arg-type]
                parse_options=pacsv.ParseOptions(delimiter=mapping.delimiter, invalid_row_handler=handler),
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(columns.values()), column_types=types, strings_can_be_null=True
                ),
            )
            return table, handler.count
        except pa.ArrowKeyError as e:
            raise ValueError(f"{path}: {e}") from None
        except pa.ArrowInvalid as e:
            if handler.count and not skip:
                _raise_malformed(path, mapping, columns, header)
            if "include_columns" in str(e) or types is not fast:
                raise ValueError(f"{path}: {e}") from None
    raise AssertionError("unreachable")


def _raise_malformed(path: PathLike, mapping: ColumnMapping, columns: Dict[str, str], header: bool) -> None:
    """Re-read single-threaded (pyarrow knows line numbers only then) to name the bad row."""
    handler = _Malformed(False)
    try:
        pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                use_threads=False, column_names=mapping.names,
                skip_rows=1 if (mapping.names and header) else 0,
            ),
            parse_options=pacsv.ParseOptions(delimiter=mapping.delimiter, invalid_row_handler=handler),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(columns.values()), column_types={c: pa.string() for c in columns.values()}
            ),
        )
    except pa.ArrowInvalid:
        pass
    number, expected, actual = handler.first or (None, 0, 0)
    row = "?" if number is None else number - (1 if header else 0)
    raise ValueError(f"{path}, row {row}: expected {expected} fields, got {actual}")


def _read_table(path: PathLike, mapping: ColumnMapping, columns: Dict[str, str], skip: bool) -> Tuple[pa.Table, int]:
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if _is_parquet(path):
        names = pq.read_schema(path).names
        missing = [c for c in columns.values() if c not in names]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} (columns: {names})")
        return pq.read_table(path, columns=list(columns.values())), 0
    return _read_csv(path, mapping, columns, skip)


def _read_log(
    path: PathLike,
    mapping: ColumnMapping,
    attr_names: Sequence[str],
    vocab: _BehaviorVocab,
    target_behaviors: Optional[Sequence[str]],
    on_bad_rows: str,
    row_offset: int,
) -> Tuple[_Log, int, Dict[str, object]]:
    """Read and validate one file. Returns the valid rows, the number of data rows read
    (including skipped ones) and the skip report ``{"rows", "by_column", "malformed"}``."""
    skip = on_bad_rows == "skip"
    columns = {"user": mapping.user, "item": mapping.item}
    if len(mapping.attributes) != len(attr_names):
        raise ValueError(f"{path}: mapping has attributes {mapping.attributes}, expected {len(attr_names)}")
    columns.update(dict(zip(attr_names, mapping.attributes)))
    if mapping.behavior:
        columns["behavior"] = mapping.behavior
    columns["time"] = mapping.timestamp
    if mapping.label:
        columns["label"] = mapping.label
    table, malformed = _read_table(path, mapping, columns, skip)
    n = table.num_rows

    checked: Dict[str, _Checked] = {}
    for logical, col in columns.items():
        arr = table.column(col)
        try:
            if logical == "behavior":
                checked[logical] = _check_behavior(arr, vocab)
            elif logical == "label":
                checked[logical] = _check_label(arr)
            elif logical == "time":
                checked[logical] = _check_time(arr)
            else:
                checked[logical] = _check_int(arr, "not an integer")
        except TypeError as e:
            raise ValueError(f"{path}, column {col!r}: {e}") from None
    del table
    if "label" in checked and checked["label"].bad is not None and target_behaviors is not None and "behavior" in checked:
        scope = np.isin(checked["behavior"].values, vocab.codes(target_behaviors))
        checked["label"].bad &= scope  # labels matter on target rows only

    bad_any = np.zeros(n, dtype=bool)
    by_column: Dict[str, int] = {}
    first: Optional[Tuple[int, str]] = None
    for logical, c in checked.items():
        if c.bad is None or not c.bad.any():
            continue
        by_column[columns[logical]] = int(c.bad.sum())
        bad_any |= c.bad
        i = int(np.argmax(c.bad))
        if first is None or i < first[0]:
            first = (i, logical)
    if first is not None and not skip:
        i, logical = first
        raise ValueError(f"{path}, row {i + 1}, column {columns[logical]!r}: {checked[logical].reason(i)}")

    keep = None if first is None else np.flatnonzero(~bad_any)

    def values(logical: str) -> np.ndarray:
        v = checked[logical].values
        return v if keep is None else v[keep]

    row = np.arange(n, dtype=np.int64) if keep is None else keep.astype(np.int64)
    log = _Log(
        row=row + row_offset,
        user=values("user"),
        item=values("item"),
        attrs={a: values(a) for a in attr_names},
        behavior=values("behavior").astype(np.int8) if "behavior" in checked else None,
        time=values("time"),
        label=values("label") if "label" in checked else None,
    )
    report = {"rows": int(bad_any.sum()) + malformed, "by_column": by_column, "malformed": malformed}
    return log, n + malformed, report


def _read_logs(
    paths: Sequence[PathLike], mapping: ColumnMapping, attr_names: Sequence[str], vocab: _BehaviorVocab,
    target_behaviors: Optional[Sequence[str]], on_bad_rows: str, skipped: Dict[str, object],
) -> Tuple[_Log, int]:
    """Read several files of one layout as one log (rows numbered across them)."""
    logs, offset = [], 0
    for path in paths:
        log, n_read, report = _read_log(path, mapping, attr_names, vocab, target_behaviors, on_bad_rows, offset)
        offset += n_read
        logs.append(log)
        if report["rows"]:
            skipped[str(path)] = report
    return _Log.concat(logs), offset


# --------------------------------------------------------------------------------------------
# Building blocks of the store


def _concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _narrow(rows: np.ndarray, size: int) -> np.ndarray:
    """Rows of a table of ``size`` rows as int32 when they fit (half the memory and I/O)."""
    return rows.astype(np.int32 if size < 2**31 else np.int64, copy=False)


@dataclass
class _KeySpace:
    """One int64 key per event ordered as (user row, time): ``user * span + offset(time)``, the
    offset ``t - tmin``, or the rank of ``t`` among all times (``ranks``) when ``U * span``
    would not fit in 62 bits. Offsets compare as times do."""

    tmin: int
    span: int
    ranks: Optional[np.ndarray]

    @classmethod
    def build(cls, times: Sequence[np.ndarray], num_users: int) -> "_KeySpace":
        tmin = min((int(t.min()) for t in times if t.size), default=0)
        tmax = max((int(t.max()) for t in times if t.size), default=0)
        if num_users * (tmax - tmin + 1) < 2**62:
            return cls(tmin, tmax - tmin + 1, None)
        ranks = np.unique(np.concatenate(times))
        return cls(0, len(ranks), ranks)

    def key(self, users: np.ndarray, times: np.ndarray) -> np.ndarray:
        key = users.astype(np.int64)
        key *= self.span
        if self.ranks is None:
            key += times
            key -= self.tmin
        else:
            key += np.searchsorted(self.ranks, times)
        return key

    def user(self, key: np.ndarray) -> np.ndarray:
        return key // self.span

    def offset(self, key: np.ndarray) -> np.ndarray:
        return key % self.span

    def time(self, key: np.ndarray) -> np.ndarray:
        off = key % self.span
        if self.ranks is None:
            off += self.tmin
            return off
        return self.ranks[off]


def _sort_by_key(key: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Stable sort of ``[n]`` non-negative int64 keys: (``[n]`` order, ``[n]`` sorted keys).
    Packs ``key << bits(n) | position`` into one int64 and sorts values (SIMD, no argsort)
    when that fits in 63 bits; stable ``argsort`` otherwise."""
    n = key.size
    bits = max(1, (n - 1).bit_length())
    if n == 0 or int(key.max()) < (1 << (63 - bits)):
        packed = key << bits
        packed |= np.arange(n, dtype=np.int64)
        packed.sort()
        order = packed & ((1 << bits) - 1)
        packed >>= bits
        return order, packed
    order = np.argsort(key, kind="stable")
    return order, key[order]


def _offsets(user_rows_sorted: np.ndarray, num_users: int) -> np.ndarray:
    """``[U + 1]`` int64: events of user row ``u`` are ``[offsets[u], offsets[u + 1])``."""
    out = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_rows_sorted, minlength=num_users), out=out[1:])
    return out


def _item_universe(item_rows: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(``[m]`` sorted distinct item rows, ``[n]`` each event's index in it)."""
    if size <= 4 * item_rows.size + (1 << 20):
        present = np.zeros(size, dtype=bool)
        present[item_rows] = True
        universe = np.flatnonzero(present).astype(np.int64)
        lut = np.cumsum(present, dtype=np.int32 if size < 2**31 else np.int64)
        lut -= 1
        return universe, lut[item_rows]
    universe, inverse = np.unique(item_rows, return_inverse=True)
    return universe.astype(np.int64), inverse.astype(np.int64)


def _latest_per_item(index: np.ndarray, times: np.ndarray, rows: np.ndarray, m: int) -> np.ndarray:
    """``[m]``: for each item index (every one of ``0..m-1`` occurs in ``index [n]``), the
    position in ``index`` of its event with the largest time, ties -> the largest ``rows``
    (the later data row)."""
    latest = np.full(m, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(latest, index, times)
    at_latest = np.flatnonzero(times == latest[index])
    best = np.full(m, -1, dtype=np.int64)
    np.maximum.at(best, index[at_latest], rows[at_latest])
    winner = at_latest[rows[at_latest] == best[index[at_latest]]]
    pos = np.empty(m, dtype=np.int64)
    pos[index[winner]] = winner
    return pos


@dataclass
class _Seen:
    """Which (user, item) pairs exist and since when: ``pairs [P]`` sorted ``user * m + item
    index``, ``first [P]`` the earliest time offset of each pair."""

    pairs: np.ndarray
    first: np.ndarray
    m: int

    @classmethod
    def build(cls, users: np.ndarray, item_index: np.ndarray, offsets: np.ndarray, m: int, span: int) -> "_Seen":
        """From ``[n]`` user rows, item indices and time offsets (``_KeySpace.offset``)."""
        if users.size == 0:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), m)
        pair = users.astype(np.int64)
        pair *= m
        pair += item_index
        if (int(pair.max()) + 1) * span < 2**63:  # sort (pair, offset) packed: SIMD value sort
            pair *= span
            pair += offsets
            pair.sort()
            off = pair % span
            pair //= span
        else:
            order = np.argsort(pair)
            pair, off = pair[order], offsets[order]
        starts = np.flatnonzero(np.concatenate([[True], pair[1:] != pair[:-1]]))
        return cls(pair[starts], np.minimum.reduceat(off, starts), m)

    def seen(self, users: np.ndarray, item_index: np.ndarray, at: np.ndarray) -> np.ndarray:
        """``[n]`` bool: user interacted with the item at or before time offset ``at``."""
        if self.pairs.size == 0:
            return np.zeros(users.shape, dtype=bool)
        key = users.astype(np.int64) * self.m + item_index
        pos = np.minimum(np.searchsorted(self.pairs, key), self.pairs.size - 1)
        return (self.pairs[pos] == key) & (self.first[pos] <= at)


def _sample_negatives(
    seen: "_Seen", users: np.ndarray, times: np.ndarray, k: int, m: int, rng: np.random.Generator, rounds: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Draw ``k`` negatives per positive (``users [P]``, ``times [P]``): ``([P, k]`` item
    indices in ``0..m-1``, ``[P, k]`` bool drawn)``. Uniform over the ``m`` items; draws the
    user had seen at or before the time are redrawn, all pending at once, for at most ``rounds``
    rounds; those still colliding are marked not drawn."""
    draws = rng.integers(0, m, size=(users.size, k), dtype=np.int64).reshape(-1)
    owner = np.repeat(np.arange(users.size, dtype=np.int64), k)
    pending = np.arange(draws.size, dtype=np.int64)
    for r in range(rounds):
        collide = seen.seen(users[owner[pending]], draws[pending], times[owner[pending]])
        pending = pending[collide]
        if pending.size == 0 or r == rounds - 1:
            break
        draws[pending] = rng.integers(0, m, size=pending.size, dtype=np.int64)
    ok = np.ones(draws.size, dtype=bool)
    ok[pending] = False
    return draws.reshape(users.size, k), ok.reshape(users.size, k)


def split_of(times: np.ndarray, train_end: Optional[int], val_end: Optional[int]) -> np.ndarray:
    """``[n]`` int8 split of each target time: 0 train (``t < train_end``), 1 val
    (``t < val_end``), 2 test (otherwise). A cut-off that is ``None`` never splits: without
    ``val_end`` there is no test split, without ``train_end`` everything before ``val_end`` is
    train."""
    split = np.zeros(times.size, dtype=np.int8)
    if train_end is not None:
        split[times >= train_end] = 1
    if val_end is not None:
        split[times >= val_end] = 2
    return split


def _shard_of_user(samples_per_user: np.ndarray, num_shards: int) -> np.ndarray:
    """``[U]`` shard of each user row: contiguous ranges with about ``S / num_shards`` samples
    each (user ``u`` goes to ``floor(num_shards * samples before u / S)``)."""
    total = int(samples_per_user.sum())
    before = np.cumsum(samples_per_user) - samples_per_user
    if total == 0:
        return np.zeros(samples_per_user.size, dtype=np.int64)
    return np.minimum(before * num_shards // total, num_shards - 1).astype(np.int64)


def _save(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.ascontiguousarray(array))


# --------------------------------------------------------------------------------------------
# prepare


def _check_name(name: str, what: str) -> None:
    if not _NAME_RE.match(name) or name in _RESERVED:
        raise ValueError(f"{what} {name!r} must be an identifier and not one of {sorted(_RESERVED)}")


def _as_list(paths: Union[PathLike, Sequence[PathLike]]) -> List[PathLike]:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


@contextlib.contextmanager
def _numpy_hugepages(enabled: Optional[bool]) -> Iterator[None]:
    """Set numpy's ``madvise(MADV_HUGEPAGE)`` of large arrays for the block (``None``: leave it).
    Off by default in ``prepare``: its arrays are written once and streamed, and faulting in
    transparent huge pages (zeroing, compaction) made the first touch of fresh memory about
    five times slower than 4 KiB pages on the VMs measured (see ``benchmarks/prepare.py``)."""
    setter = getattr(getattr(getattr(np, "_core", np), "multiarray", None), "_set_madvise_hugepage", None)
    if enabled is None or setter is None:
        yield
        return
    previous = setter(enabled)
    try:
        yield
    finally:
        setter(previous)


def prepare(
    events: Union[PathLike, Sequence[PathLike]],
    out: PathLike,
    *,
    mapping: Union[str, Mapping[str, object], ColumnMapping] = "taobao",
    impressions: Optional[Union[PathLike, Sequence[PathLike]]] = None,
    impression_mapping: Optional[Union[str, Mapping[str, object], ColumnMapping]] = None,
    target_behaviors: Optional[Sequence[str]] = None,
    sequences: Optional[Mapping[str, Optional[Sequence[str]]]] = None,
    max_seq_len: int = 1000,
    negatives_per_positive: int = 0,
    negative_rounds: int = 16,
    train_end: Optional[int] = None,
    val_end: Optional[int] = None,
    num_shards: int = 1,
    hash_buckets: Optional[Mapping[str, int]] = None,
    seed: int = 0,
    on_bad_rows: str = "error",
    overwrite: bool = False,
    verbose: bool = True,
    numpy_hugepages: Optional[bool] = False,
) -> Dict[str, object]:
    """Turn event logs into a sample store at ``out`` (see the module docstring for the
    semantics and the layout) and return its ``meta`` plus, not saved, ``"timings_s"`` (wall
    seconds per stage) and ``"cpu_s"`` (user, system CPU seconds per stage).

    ``events``: the behavior log (one path or several with one layout), read with ``mapping``
    (``"taobao"``, a ``ColumnMapping``, a dict or a JSON/YAML file). ``impressions``: optional
    target file(s) read with ``impression_mapping`` (default ``mapping``; its attributes
    correspond by position); without it the targets are rows of ``events``.
    ``target_behaviors``: behavior types of the target rows (``None``: all rows).
    ``sequences``: ``{name: behavior types or None (all)}``, one history per name (default
    ``{"history": None}``). ``hash_buckets``: ``{column: size}`` for hashed id columns (store
    names ``user``, ``item``, attribute names; file column names are accepted too).
    ``on_bad_rows``: ``"error"`` or ``"skip"``. ``overwrite``: replace an existing store.
    ``numpy_hugepages``: numpy's huge-page ``madvise`` while this runs (``None``: as it is).
    """
    kwargs = {k: v for k, v in locals().items() if k != "numpy_hugepages"}
    with _numpy_hugepages(numpy_hugepages):
        return _prepare(**kwargs)


@dataclass
class _Run:
    """The validated options of one ``prepare`` call."""

    out: str
    ev_paths: List[PathLike]
    imp_paths: List[PathLike]
    ev_map: ColumnMapping
    imp_map: ColumnMapping
    attrs: List[str]
    seqs: Dict[str, Optional[List[str]]]
    target_behaviors: Optional[List[str]]
    explicit: bool
    hashed: Dict[str, int]
    max_seq_len: int
    k: int
    rounds: int
    train_end: Optional[int]
    val_end: Optional[int]
    num_shards: int
    seed: int
    on_bad_rows: str

    @property
    def targets_from_events(self) -> bool:
        return not self.imp_paths


def _validate(
    events: Union[PathLike, Sequence[PathLike]], out: PathLike, *, mapping: Union[str, Mapping[str, object], ColumnMapping],
    impressions: Optional[Union[PathLike, Sequence[PathLike]]],
    impression_mapping: Optional[Union[str, Mapping[str, object], ColumnMapping]],
    target_behaviors: Optional[Sequence[str]], sequences: Optional[Mapping[str, Optional[Sequence[str]]]],
    max_seq_len: int, negatives_per_positive: int, negative_rounds: int, train_end: Optional[int],
    val_end: Optional[int], num_shards: int, hash_buckets: Optional[Mapping[str, int]], seed: int,
    on_bad_rows: str, **_: object,
) -> _Run:
    """Check ``prepare``'s arguments (before anything is read) into a ``_Run``."""
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', not {on_bad_rows!r}")
    if train_end is not None and val_end is not None and val_end < train_end:
        raise ValueError(f"val_end ({val_end}) must not be before train_end ({train_end})")
    if max_seq_len < 1 or num_shards < 1 or negatives_per_positive < 0 or negative_rounds < 1:
        raise ValueError("max_seq_len, num_shards, negative_rounds must be >= 1, negatives_per_positive >= 0")
    ev_map = _resolve_mapping(mapping)
    imp_map = _resolve_mapping(impression_mapping) if impression_mapping is not None else ev_map
    attrs = list(ev_map.attributes)
    for a in attrs:
        _check_name(a, "attribute column")
    seqs: Dict[str, Optional[List[str]]] = (
        {DEFAULT_SEQUENCE: None} if sequences is None
        else {k: (None if v is None else [str(b) for b in v]) for k, v in sequences.items()}
    )
    if not seqs:
        raise ValueError("sequences must name at least one sequence")
    for name, types in seqs.items():
        _check_name(name, "sequence name")
        if types is not None and not ev_map.behavior:
            raise ValueError(f"sequence {name!r} selects behavior types, but the event log has no behavior column")
    imp_paths = [] if impressions is None else _as_list(impressions)
    target_map = imp_map if imp_paths else ev_map
    if target_behaviors is not None and not target_map.behavior:
        raise ValueError("target_behaviors needs a behavior column in the target rows")
    explicit = target_map.label is not None
    if explicit and negatives_per_positive:
        raise ValueError("negatives_per_positive needs implicit labels (no label column in the target rows)")
    return _Run(
        out=os.fspath(out), ev_paths=_as_list(events), imp_paths=imp_paths, ev_map=ev_map, imp_map=imp_map,
        attrs=attrs, seqs=seqs, target_behaviors=[str(b) for b in target_behaviors] if target_behaviors else None,
        explicit=explicit, hashed=_hash_sizes(hash_buckets, ev_map, attrs), max_seq_len=max_seq_len,
        k=negatives_per_positive, rounds=negative_rounds, train_end=train_end, val_end=val_end,
        num_shards=num_shards, seed=seed, on_bad_rows=on_bad_rows,
    )


def _prepare(**kwargs: object) -> Dict[str, object]:
    """``prepare`` with numpy's huge-page setting in place: the stages, timed."""
    t0 = _time.perf_counter()
    timings: Dict[str, float] = {}
    cpu: Dict[str, Tuple[float, float]] = {}
    last = [os.times()]

    def lap(name: str) -> None:
        timings[name] = round(_time.perf_counter() - t0 - sum(timings.values()), 3)
        now = os.times()
        cpu[name] = (round(now.user - last[0].user, 2), round(now.system - last[0].system, 2))
        last[0] = now

    run = _validate(**kwargs)  # type: ignore[arg-type]
    _prepare_dir(run.out, bool(kwargs["overwrite"]))
    vocab = _BehaviorVocab(run.ev_map.behavior_types)
    logs, rows_read, bad_rows = _read_inputs(run, vocab)
    lap("read")
    tables, ids, num_users = _map_ids(run, logs)
    lap("ids")
    space = _KeySpace.build([g.time for g in logs], num_users)
    n_logged = [len(g) for g in logs]
    srt = [_sort_log(g, ids, i, space, run) for i, g in enumerate(logs)]
    del logs, ids
    lap("sort")
    pos = _targets(srt[0] if run.targets_from_events else srt[1], run, vocab)
    lap("targets")
    hist, seq_counts = _write_sequences(srt[0], pos, space, num_users, vocab, run)
    lap("sequences")
    cand, valid, not_drawn = _negatives(srt, pos, space, int(tables["item"]["size"]), rows_read, run)
    del srt
    lap("negatives")
    counts, shard_users = _write_samples(pos, cand, valid, hist, seq_counts, num_users, max(rows_read) + 1, run)
    lap("write")
    n_pos = int(pos["key"].size)
    n_neg = int(valid[:, 1:].sum()) if run.k else int((pos["label"] == 0).sum())
    meta = _meta(run, vocab, tables, num_users, seq_counts, counts, shard_users, bad_rows, {
        "events_read": rows_read[0], "events": n_logged[0], "impressions": sum(n_logged[1:]),
        "positives": n_pos - (0 if run.k else n_neg), "negatives": n_neg, "negatives_not_drawn": not_drawn,
    })
    with open(os.path.join(run.out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    lap("meta")
    if kwargs["verbose"]:
        _print_summary(run.out, meta, _time.perf_counter() - t0)
    return dict(meta, timings_s=timings, cpu_s=cpu)


def _read_inputs(run: _Run, vocab: _BehaviorVocab) -> Tuple[List[_Log], List[int], Dict[str, object]]:
    """Read the event log and the impressions: (logs, data rows read per log, bad-row reports)."""
    bad_rows: Dict[str, object] = {}
    ev, ev_read = _read_logs(run.ev_paths, run.ev_map, run.attrs, vocab,
                             run.target_behaviors if run.targets_from_events else None, run.on_bad_rows, bad_rows)
    logs, rows_read = [ev], [ev_read]
    if not run.targets_from_events:
        imp, imp_read = _read_logs(run.imp_paths, run.imp_map, run.attrs, vocab, run.target_behaviors,
                                   run.on_bad_rows, bad_rows)
        logs.append(imp)
        rows_read.append(imp_read)
    for types in [t for t in run.seqs.values() if t is not None] + ([run.target_behaviors] if run.target_behaviors else []):
        vocab.codes(types)  # raises on unknown types
    return logs, rows_read, bad_rows


def _map_ids(run: _Run, logs: List[_Log]) -> Tuple[Dict[str, Dict[str, object]], Dict[str, List[np.ndarray]], int]:
    """Map every id column of every log (one table per column across the logs), save the dense
    vocabularies, drop the raw ids. Returns (tables, ``{column: [rows per log]}`` with
    ``"user_dense"`` the grouping rows, number of dense user rows)."""
    tables: Dict[str, Dict[str, object]] = {}
    ids: Dict[str, List[np.ndarray]] = {}
    num_users = 0
    for col in ["user", "item"] + run.attrs:
        raw = _concat([(g.user if col == "user" else g.item if col == "item" else g.attrs[col]) for g in logs])
        if col != "user" and col in run.hashed:
            mapped = hash_ids(raw, run.hashed[col])
            tables[col] = {"kind": "hash", "size": run.hashed[col], "hash": "splitmix64"}
        else:
            keys, mapped = _dense_rows(raw)
            _save(os.path.join(run.out, "vocab", f"{col}.npy"), keys)
            tables[col] = {"kind": "dense", "size": int(len(keys)) + 1}
            if col == "user":  # events are grouped by the dense user row, even when hashed
                num_users = int(len(keys)) + 1
                ids["user_dense"] = _split_like(mapped, logs)
                if "user" in run.hashed:
                    tables[col] = {"kind": "hash", "size": run.hashed["user"], "hash": "splitmix64", "dense_rows": num_users}
                    mapped = hash_ids(raw, run.hashed["user"])
        ids[col] = _split_like(_narrow(mapped, int(tables[col]["size"])), logs)  # type: ignore[arg-type]
        del raw, mapped
    for g in logs:  # the raw ids are not needed any more
        g.user = g.item = np.zeros(0, np.int64)
        g.attrs = {}
    return tables, ids, num_users


def _sort_log(g: _Log, ids: Dict[str, List[np.ndarray]], i: int, space: "_KeySpace", run: _Run) -> Dict[str, np.ndarray]:
    """Log ``i`` sorted by (user, time), stable, as ``{key, user (dense), time, feat_user, item,
    <attributes>, behavior?, row, label?}`` (all ``[n]``)."""
    users = ids["user_dense"][i]
    order, key = _sort_by_key(space.key(users, g.time))
    d = {"key": key, "user": users[order], "time": space.time(key)}
    d["feat_user"] = ids["user"][i][order] if "user" in run.hashed else d["user"]
    d.update({c: ids[c][i][order] for c in ["item"] + run.attrs})
    if g.behavior is not None:
        d["behavior"] = g.behavior[order]
    contiguous = g.row.size and g.row[-1] - g.row[0] == g.row.size - 1  # nothing skipped: rows are positions
    d["row"] = (order + g.row[0] if g.row[0] else order) if contiguous else g.row[order]
    if g.label is not None:
        d["label"] = g.label[order]
    return d


def _targets(tgt: Dict[str, np.ndarray], run: _Run, vocab: _BehaviorVocab) -> Dict[str, np.ndarray]:
    """The target rows (of the target types), in (user, time) order, with their labels."""
    sel = None if not run.target_behaviors else np.flatnonzero(np.isin(tgt["behavior"], vocab.codes(run.target_behaviors)))
    pos = {c: tgt[c] if sel is None else tgt[c][sel] for c in ["key", "user", "time", "feat_user", "row", "item"] + run.attrs}
    if run.explicit:
        pos["label"] = tgt["label"] if sel is None else tgt["label"][sel]
    else:
        pos["label"] = np.ones(pos["key"].size, np.float32)
    return pos


def _write_sequences(
    evs: Dict[str, np.ndarray], pos: Dict[str, np.ndarray], space: "_KeySpace", num_users: int,
    vocab: _BehaviorVocab, run: _Run,
) -> Tuple[Dict[str, Tuple[np.ndarray, np.ndarray]], Dict[str, int]]:
    """Save each sequence's events; return every target's history slice ``(start [P], end [P])``
    per sequence (``end``: the first event at or after the target's (user, time); ``start``:
    ``max_seq_len`` before it, not before the user's first event) and the sequences' sizes."""
    hist: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    counts: Dict[str, int] = {}
    for name, types in run.seqs.items():
        m = None if types is None else np.flatnonzero(np.isin(evs["behavior"], vocab.codes(types)))

        def sub(a: np.ndarray) -> np.ndarray:
            return a if m is None else a[m]

        s_key = sub(evs["key"])
        offsets = _offsets(space.user(s_key), num_users)
        end = np.searchsorted(s_key, pos["key"], side="left")
        start = np.maximum(offsets[pos["user"]], end - run.max_seq_len)
        hist[name] = (start, end)
        base = os.path.join(run.out, "sequences", name)
        _save(os.path.join(base, "offsets.npy"), offsets)
        for c in ["time", "item"] + run.attrs + (["behavior"] if "behavior" in evs else []):
            _save(os.path.join(base, f"{c}.npy"), sub(evs[c]))
        counts[name] = int(s_key.size)
    return hist, counts


def _negatives(
    srt: List[Dict[str, np.ndarray]], pos: Dict[str, np.ndarray], space: "_KeySpace", item_size: int,
    rows_read: List[int], run: _Run,
) -> Tuple[Dict[str, np.ndarray], np.ndarray, int]:
    """The candidates: ``{column: [P, 1 + k]}`` (the target, then its negatives), ``valid [P, 1
    + k]`` (negatives not drawn are False) and the number not drawn."""
    cand = {c: pos[c][:, None] for c in ["item"] + run.attrs}
    valid = np.ones((pos["key"].size, run.k + 1), dtype=bool)
    if not run.k:
        return cand, valid, 0
    universe, uidx = _item_universe(_concat([d["item"] for d in srt]), item_size)
    t_off = _concat([space.offset(d["key"]) for d in srt])
    offsets = [0] + list(np.cumsum(rows_read[:-1]))  # ties of the latest attributes: impressions after events
    tie_rows = _concat([d["row"] + r if r else d["row"] for d, r in zip(srt, offsets)])
    latest = _latest_per_item(uidx, t_off, tie_rows, universe.size)
    del tie_rows
    seen = _Seen.build(_concat([d["user"] for d in srt]), uidx, t_off, universe.size, space.span)
    del uidx, t_off
    rng = np.random.default_rng(run.seed)
    draws, ok = _sample_negatives(seen, pos["user"], space.offset(pos["key"]), run.k, universe.size, rng, run.rounds)
    valid[:, 1:] = ok
    cand["item"] = np.concatenate([cand["item"], universe[draws].astype(cand["item"].dtype)], axis=1)
    for a in run.attrs:
        cand[a] = np.concatenate([cand[a], _concat([d[a] for d in srt])[latest][draws]], axis=1)
    return cand, valid, int((~ok).sum())


def _write_samples(
    pos: Dict[str, np.ndarray], cand: Dict[str, np.ndarray], valid: np.ndarray,
    hist: Dict[str, Tuple[np.ndarray, np.ndarray]], seq_counts: Dict[str, int], num_users: int, max_row: int, run: _Run,
) -> Tuple[np.ndarray, np.ndarray]:
    """Lay the samples out (each target, then its negatives), split them, cut the shards, write
    them. Returns ``counts [num_shards, 3]`` per split and ``[num_shards + 1]`` user row bounds."""
    k, n_shards = run.k, run.num_shards
    flat_valid = valid.reshape(-1)

    def per_sample(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, k + 1)[flat_valid] if k else a

    s_time, s_user = per_sample(pos["time"]), per_sample(pos["user"])
    split = split_of(s_time, run.train_end, run.val_end)
    shard_of_user = _shard_of_user(np.bincount(s_user, minlength=num_users), n_shards)
    group = shard_of_user[s_user] * len(SPLITS) + split
    order = np.argsort(group.astype(np.int16 if n_shards * 3 < 2**15 else np.int64), kind="stable")
    counts = np.bincount(group, minlength=n_shards * len(SPLITS)).reshape(n_shards, len(SPLITS))
    bounds = np.concatenate([[0], np.cumsum(counts.sum(axis=1))])
    del group, split, s_user

    def write(rel: str, a: np.ndarray) -> None:
        a = a[order]
        for s in range(n_shards):
            _save(os.path.join(run.out, "shards", f"{s:05d}", rel), a[bounds[s]:bounds[s + 1]])

    write("user.npy", per_sample(pos["feat_user"]))
    write("time.npy", s_time)
    write("event.npy", _narrow(per_sample(pos["row"]), max_row))
    labels = np.zeros((pos["label"].size, k + 1), np.float32)
    labels[:, 0] = pos["label"]
    write("label.npy", labels.reshape(-1)[flat_valid])
    for c, v in cand.items():
        write(os.path.join("target", f"{c}.npy"), v.reshape(-1)[flat_valid])
    for name, (start, end) in hist.items():
        write(os.path.join("history", name, "start.npy"), _narrow(per_sample(start), seq_counts[name] + 1))
        write(os.path.join("history", name, "end.npy"), _narrow(per_sample(end), seq_counts[name] + 1))
    shard_users = np.concatenate([[0], np.cumsum(np.bincount(shard_of_user, minlength=n_shards))])
    return counts, shard_users


def _meta(
    run: _Run, vocab: _BehaviorVocab, tables: Dict[str, Dict[str, object]], num_users: int,
    seq_counts: Dict[str, int], counts: np.ndarray, shard_users: np.ndarray, bad_rows: Dict[str, object],
    tallies: Dict[str, int],
) -> Dict[str, object]:
    """The store's ``meta.json`` content."""
    split_counts = counts.sum(axis=0)
    item_table = tables["item"]
    return {
        "version": 1,
        "columns": {
            "events": asdict(run.ev_map),
            "impressions": None if run.targets_from_events else asdict(run.imp_map),
            "id_columns": ["user", "item"] + run.attrs,
            "attributes": run.attrs,
        },
        "sources": {"events": [str(p) for p in run.ev_paths], "impressions": [str(p) for p in run.imp_paths]},
        "tables": tables,
        "num_user_rows": num_users,
        "behavior_types": list(vocab.names) if run.ev_map.behavior else None,
        "sequences": run.seqs,
        "target_behaviors": run.target_behaviors,
        "labels": "explicit" if run.explicit else "implicit",
        "negatives_per_positive": run.k,
        "negative_rounds": run.rounds,
        "max_seq_len": run.max_seq_len,
        "splits": {"train_end": run.train_end, "val_end": run.val_end,
                   "rule": "time < train_end: train; < val_end: val; else test"},
        "seed": run.seed,
        "num_shards": run.num_shards,
        "shards": [
            {"users": [int(shard_users[s]), int(shard_users[s + 1])],
             "samples": {sp: int(counts[s, j]) for j, sp in enumerate(SPLITS)}}
            for s in range(run.num_shards)
        ],
        "counts": {
            "events_read": tallies["events_read"],
            "events": tallies["events"],
            "impressions": tallies["impressions"],
            "sequence_events": seq_counts,
            "users": num_users - 1,
            "items": int(item_table["size"]) - 1 if item_table["kind"] == "dense" else None,  # type: ignore[call-overload]
            "positives": tallies["positives"],
            "negatives": tallies["negatives"],
            "samples": {sp: int(split_counts[j]) for j, sp in enumerate(SPLITS)},
        },
        "skipped": {
            "on_bad_rows": run.on_bad_rows,
            "bad_rows": bad_rows,
            "bad_rows_total": sum(int(r["rows"]) for r in bad_rows.values()),  # type: ignore[index]
            "negatives_not_drawn": tallies["negatives_not_drawn"],
        },
    }


def _split_like(a: np.ndarray, logs: Sequence[_Log]) -> List[np.ndarray]:
    cuts = np.cumsum([len(g) for g in logs])[:-1]
    return np.split(a, cuts)


def _hash_sizes(hash_buckets: Optional[Mapping[str, int]], m: ColumnMapping, attrs: Sequence[str]) -> Dict[str, int]:
    """``hash_buckets`` keyed by store names (``user``, ``item``, attributes); file column names
    of ``user`` / ``item`` are accepted too."""
    out: Dict[str, int] = {}
    alias = {m.user: "user", m.item: "item"}
    for col, size in (hash_buckets or {}).items():
        name = alias.get(col, col)
        if name not in ("user", "item", *attrs):
            raise ValueError(f"hash_buckets: unknown id column {col!r}")
        if int(size) < 1:
            raise ValueError(f"hash_buckets[{col!r}] must be >= 1")
        out[name] = int(size)
    return out


def _prepare_dir(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (overwrite=True / --overwrite replaces a store)")
        if not os.path.exists(os.path.join(out, "meta.json")):
            raise FileExistsError(f"{out} is not a sample store (no meta.json); not removing it")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)


def _print_summary(out: str, meta: Dict[str, object], seconds: float) -> None:
    counts = meta["counts"]
    skipped = meta["skipped"]
    assert isinstance(counts, dict) and isinstance(skipped, dict)
    print(f"prepared {out} in {seconds:.1f}s: {counts['events']:,} events, samples {counts['samples']}")
    for path, report in skipped["bad_rows"].items():
        print(f"  skipped {report['rows']:,} bad rows of {path}: {report['by_column']}, malformed {report['malformed']}")
    if skipped["bad_rows_total"] == 0:
        print("  skipped bad rows: 0")
    if meta["negatives_per_positive"]:
        print(f"  negatives not drawn (user had seen nearly all items): {skipped['negatives_not_drawn']:,}")


# --------------------------------------------------------------------------------------------
# CLI


def _parse_sequences(specs: Sequence[str]) -> Optional[Dict[str, Optional[List[str]]]]:
    """``["clicks=pv", "buys=cart,buy", "all"]`` -> ``{"clicks": ["pv"], ..., "all": None}``."""
    if not specs:
        return None
    out: Dict[str, Optional[List[str]]] = {}
    for spec in specs:
        name, _, types = spec.partition("=")
        out[name] = [t for t in types.split(",") if t] if types else None
    return out


def _parse_hash(specs: Sequence[str]) -> Dict[str, int]:
    out = {}
    for spec in specs:
        name, _, size = spec.partition("=")
        if not size:
            raise ValueError(f"--hash expects COLUMN=SIZE, got {spec!r}")
        out[name] = int(size)
    return out


_OPTION_KEYS = {
    "target_behaviors", "sequences", "max_seq_len", "negatives_per_positive", "negative_rounds",
    "train_end", "val_end", "num_shards", "hash_buckets", "seed", "on_bad_rows",
}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """The CLI; see ``--help``."""
    p = argparse.ArgumentParser(
        prog="python -m torchrec_longseq.data.prepare",
        description="Event logs (CSV / Parquet) -> point-in-time lifelong-sequence sample store.",
    )
    p.add_argument("events", nargs="+", help="event (behavior) log file(s), CSV or Parquet")
    p.add_argument("--out", required=True, help="store directory to create")
    p.add_argument("--format", choices=["taobao", "custom"], default=None,
                   help="taobao: UserBehavior layout; custom (default when --user/--config given)")
    p.add_argument("--config", help="JSON/YAML file: column mapping keys (user, item, timestamp, attributes, "
                   "behavior, label, behavior_types, names, header, delimiter) and optionally prepare options "
                   f"({', '.join(sorted(_OPTION_KEYS))})")
    p.add_argument("--user"), p.add_argument("--item"), p.add_argument("--time", dest="timestamp")
    p.add_argument("--attr", action="append", default=None, help="id attribute column (repeatable)")
    p.add_argument("--behavior", help="behavior type column")
    p.add_argument("--behavior-types", help="allowed behavior types, comma-separated")
    p.add_argument("--label", help="0/1 label column (explicit labels)")
    p.add_argument("--names", help="column names of a header-less CSV, comma-separated")
    p.add_argument("--no-header", action="store_true", help="the CSV has no header line")
    p.add_argument("--delimiter", default=None)
    p.add_argument("--impressions", nargs="+", help="target (impression) file(s); default: targets from events")
    p.add_argument("--impressions-config", help="JSON/YAML column mapping of the impression file(s)")
    p.add_argument("--targets", help="behavior types of the target rows, comma-separated (default: all rows)")
    p.add_argument("--sequence", action="append", default=[], metavar="NAME[=TYPE,TYPE]",
                   help="a history sequence and its behavior types (repeatable; default: history=all)")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--negatives", type=int, dest="negatives_per_positive")
    p.add_argument("--negative-rounds", type=int)
    p.add_argument("--train-end", type=int), p.add_argument("--val-end", type=int)
    p.add_argument("--num-shards", type=int)
    p.add_argument("--hash", action="append", default=[], metavar="COLUMN=SIZE", help="hash this id column")
    p.add_argument("--seed", type=int)
    p.add_argument("--on-bad-rows", choices=["error", "skip"])
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)

    options: Dict[str, object] = {}
    mapping_dict: Dict[str, object] = {}
    if a.config:
        for key, value in load_config(a.config).items():
            (options if key in _OPTION_KEYS else mapping_dict)[key] = value
    cli_mapping = {
        "user": a.user, "item": a.item, "timestamp": a.timestamp, "attributes": a.attr, "behavior": a.behavior,
        "behavior_types": a.behavior_types, "label": a.label, "names": a.names, "delimiter": a.delimiter,
    }
    mapping_dict.update({k: v for k, v in cli_mapping.items() if v is not None})
    if a.no_header:
        mapping_dict["header"] = False
    mapping: Union[str, ColumnMapping]
    if a.format == "taobao" or (a.format is None and not mapping_dict):
        if mapping_dict:
            p.error("--format taobao takes no column options")
        mapping = "taobao"
    else:
        mapping = ColumnMapping.from_dict(mapping_dict)
    cli_options = {
        "target_behaviors": a.targets.split(",") if a.targets else None,
        "sequences": _parse_sequences(a.sequence),
        "max_seq_len": a.max_seq_len, "negatives_per_positive": a.negatives_per_positive,
        "negative_rounds": a.negative_rounds, "train_end": a.train_end, "val_end": a.val_end,
        "num_shards": a.num_shards, "hash_buckets": _parse_hash(a.hash) or None, "seed": a.seed,
        "on_bad_rows": a.on_bad_rows,
    }
    options.update({k: v for k, v in cli_options.items() if v is not None})
    imp_mapping = ColumnMapping.from_dict(load_config(a.impressions_config)) if a.impressions_config else None
    try:
        return prepare(
            a.events if len(a.events) > 1 else a.events[0], a.out, mapping=mapping, impressions=a.impressions,
            impression_mapping=imp_mapping, overwrite=a.overwrite, **options,  # type: ignore[arg-type]
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
