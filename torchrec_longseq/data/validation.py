"""Checks a batch before it reaches a model: the keys its sequence schemas name, and the rest.

Every error names the feature and, where there is one, the sample (its index in the batch), so a
broken input pipeline is found at the batch it broke, not as a shape error deep in a model.
All checks are vectorised O(N) scans over the values.
"""

from typing import Dict, Optional, Sequence

import torch

from torchrec_longseq.data.batch import Batch
from torchrec_longseq.schema import SequenceSchema, default_schema


class BatchError(ValueError):
    """A batch that does not follow the documented layout."""


# timestamps (int64 seconds, or any integer unit) must lie in [0, MAX_TIME): request time minus
# behavior time then never overflows int64
MAX_TIME = 2**62
# what the models index and compute with; anything else is named in the error
ID_DTYPES = (torch.int32, torch.int64)
TIME_DTYPES = (torch.int32, torch.int64)
LABEL_DTYPES = (torch.float32, torch.float64)


def integer_dtype(t: torch.Tensor) -> bool:
    """Whether ``t`` holds integers, as ids and timestamps must: a float id would be truncated
    by the compiled searches (3.5 read as 3), a bool id read as 0 / 1."""
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _sample_of(offsets: torch.Tensor, position: int) -> int:
    return int(torch.searchsorted(offsets, offsets.new_tensor(position), right=True)) - 1


def _dtype(name: str, t: torch.Tensor, allowed: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise BatchError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise BatchError(f"{name}: expected {' or '.join(str(d) for d in allowed)}, got {t.dtype}")


def check_batch(batch: Batch, table_sizes: Dict[str, int],
                schemas: Optional[Sequence[SequenceSchema]] = None) -> None:
    """Raise ``BatchError`` naming the feature and sample if ``batch`` is malformed.

    Args:
        batch (Batch): the batch.
        table_sizes (Dict[str, int]): rows of the table each feature is looked up in
            (``LongSeqCTR.table_rows``); these keys must be present.
        schemas (Optional[Sequence[SequenceSchema]]): the model's sequences (default: the
            synthetic ``default_schema()``).

    Checked: keys (every key of ``table_sizes`` and of the schemas present; extra keys are the
    user's and allowed); dtypes (KJT values and lengths, timestamps int32 / int64, labels
    float32 / float64); one value per sample for every candidate key and a schema's history keys
    (and time key) of equal lengths, checked on the lengths before the values, so a corrupted
    length is named by its feature; lengths summing to the values; ids in ``[0, rows)``;
    timestamps in ``[0, MAX_TIME)``, aligned with the history, non-decreasing, strictly before
    the request; labels 0 or 1. An empty history (L = 0) and a batch of zero samples are valid.
    """
    schemas = [default_schema()] if schemas is None else list(schemas)
    kjt = batch.features
    keys = list(kjt.keys())
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise BatchError(f"KeyedJaggedTensor keys: {repeated} given more than once")
    needed = list(dict.fromkeys(list(table_sizes) + [k for s in schemas for k in s.keys()]))
    missing = [k for k in needed if k not in keys]
    if missing:
        raise BatchError(f"KeyedJaggedTensor keys: missing {missing} (has {keys})")
    _dtype("KeyedJaggedTensor values", kjt.values(), ID_DTYPES)
    _dtype("KeyedJaggedTensor lengths", kjt.lengths(), ID_DTYPES)
    _dtype("history_time", batch.history_time, TIME_DTYPES)
    _dtype("request_time", batch.request_time, TIME_DTYPES)
    _dtype("labels", batch.labels, LABEL_DTYPES)
    for name, t in (("labels", batch.labels), ("request_time", batch.request_time),
                    ("history_time", batch.history_time)):
        if t.dim() != 1:
            raise BatchError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    b = batch.labels.numel()
    if kjt.lengths().numel() % max(len(keys), 1):
        raise BatchError(f"{kjt.lengths().numel()} lengths for {len(keys)} keys: not the same "
                         f"number of samples per key")
    lengths = kjt.lengths().view(len(keys), -1)
    if lengths.size(1) != b:
        raise BatchError(f"features have {lengths.size(1)} samples per key but there are {b} labels")
    if (lengths < 0).any():
        key = _first((lengths < 0).any(1))
        raise BatchError(f"feature {keys[key]!r}, sample {_first(lengths[key] < 0)}: negative length")
    per_key = dict(zip(keys, lengths))
    for key in dict.fromkeys(k for s in schemas for k in s.candidate_keys):
        bad = per_key[key] != 1
        if bad.any():
            raise BatchError(f"feature {key!r}, sample {_first(bad)}: expected exactly one value, got "
                             f"{int(per_key[key][_first(bad)])}")
    for schema in schemas:
        first = schema.history_keys[0]
        for key in schema.history_keys[1:] + ([schema.time_key] if schema.time_key else []):
            mismatch = per_key[key] != per_key[first]
            if mismatch.any():
                at = _first(mismatch)
                raise BatchError(f"feature {key!r}, sample {at}: length {int(per_key[key][at])} "
                                 f"differs from {first!r}'s {int(per_key[first][at])}")
    ends = torch.cumsum(lengths.sum(1), 0)
    n = kjt.values().numel()
    if keys and int(ends[-1]) != n:
        over = ends > n
        key = keys[_first(over)] if over.any() else keys[-1]
        raise BatchError(f"feature {key!r}: lengths sum to {int(ends[-1])} values in all, but the "
                         f"KeyedJaggedTensor holds {n}")
    features = kjt.to_dict()
    for key, rows in table_sizes.items():
        values = features[key].values()
        bad = (values < 0) | (values >= rows)
        if bad.any():
            pos = _first(bad)
            raise BatchError(f"feature {key!r}, sample {_sample_of(features[key].offsets(), pos)}: id "
                             f"{int(values[pos])} outside the table of {rows} rows")
    if batch.request_time.numel() != b:
        raise BatchError(f"feature 'request_time': {batch.request_time.numel()} values for {b} samples")
    _check_range("request_time", batch.request_time, torch.arange(b))
    dense = [s for s in schemas if s.time_key is None]
    if dense:
        behaviors = features[dense[0].history_keys[0]].values().numel()
        if batch.history_time.numel() != behaviors:
            raise BatchError(f"feature 'history_time': {batch.history_time.numel()} timestamps for "
                             f"{behaviors} behaviors")
        if batch.relevant.numel() not in (0, behaviors):
            raise BatchError(f"feature 'relevant': {batch.relevant.numel()} flags for "
                             f"{behaviors} behaviors")
    for schema in schemas:
        hist = features[schema.history_keys[0]]
        if schema.time_key is None:
            name, times = "history_time", batch.history_time
        else:
            name, times = schema.time_key, features[schema.time_key].values()
        _check_times(name, times, hist.lengths(), batch.request_time)
    bad = (batch.labels != 0) & (batch.labels != 1)
    if bad.any():
        raise BatchError(f"labels, sample {_first(bad)}: {float(batch.labels[_first(bad)])} is not 0 or 1")


def _check_range(name: str, times: torch.Tensor, sample: torch.Tensor) -> None:
    """Timestamps ``times`` (of samples ``sample``) in ``[0, MAX_TIME)``."""
    bad = (times < 0) | (times.long() >= MAX_TIME)  # (an int32 tensor cannot hold 2^62)
    if bad.any():
        at = _first(bad)
        raise BatchError(f"feature {name!r}, sample {int(sample[at])}: timestamp {int(times[at])} "
                         f"outside [0, 2^62)")


def _check_times(name: str, times: torch.Tensor, lengths: torch.Tensor,
                 request_time: torch.Tensor) -> None:
    """Timestamps ``times [N]`` of a history with ``lengths [B]``: in range, before the request,
    in order."""
    b = lengths.numel()
    seg = torch.repeat_interleave(torch.arange(b, device=times.device), lengths.long())
    _check_range(name, times, seg)
    late = times >= request_time[seg]
    if late.any():
        pos = _first(late)
        raise BatchError(f"feature {name!r}, sample {int(seg[pos])}: behavior at "
                         f"{int(times[pos])} is not before the request time "
                         f"{int(request_time[seg[pos]])}")
    if times.numel() > 0:
        same_sample = seg[1:] == seg[:-1]
        unsorted = same_sample & (times[1:] < times[:-1])
        if unsorted.any():
            raise BatchError(f"feature {name!r}, sample {int(seg[1:][_first(unsorted)])}: "
                             f"timestamps are not in chronological order")
