"""Checks a batch against the layout of ``torchrec_longseq.data.batch`` before it reaches a model.

Every error names the feature and, where there is one, the sample (its index in the batch), so a
broken input pipeline is found at the batch it broke, not as a shape error deep in a model.
All checks are vectorised O(N) scans over the values.
"""

from typing import Dict

import torch

from torchrec_longseq.data.batch import FEATURE_KEYS, HIST_CATEGORY, HIST_ITEM, Batch

SINGLE_VALUED = ["user_id", "context_hour", "target_item", "target_category"]


class BatchError(ValueError):
    """A batch that does not follow the documented layout."""


def integer_dtype(t: torch.Tensor) -> bool:
    """Whether ``t`` holds integers, as ids and timestamps must: a float id would be truncated
    by the compiled searches (3.5 read as 3), a bool id read as 0 / 1."""
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _sample_of(offsets: torch.Tensor, position: int) -> int:
    return int(torch.searchsorted(offsets, offsets.new_tensor(position), right=True)) - 1


def check_batch(batch: Batch, table_sizes: Dict[str, int]) -> None:
    """Raise ``BatchError`` naming the feature and sample if ``batch`` is malformed.

    Args:
        batch (Batch): the batch.
        table_sizes (Dict[str, int]): rows of the table each feature is looked up in.

    Checked: keys (none missing, none extra); lengths summing to the values; one value per
    sample for the single-valued features; ``hist_item`` and ``hist_category`` aligned; ids in
    ``[0, rows)``; timestamps aligned with the history, non-decreasing, strictly before the
    request; labels 0 or 1. An empty history (L = 0) is valid.
    """
    kjt = batch.features
    keys = list(kjt.keys())
    missing = [k for k in FEATURE_KEYS if k not in keys]
    extra = [k for k in keys if k not in FEATURE_KEYS]
    if missing or extra:
        raise BatchError(f"KeyedJaggedTensor keys: missing {missing}, unexpected {extra}")
    for name, t in (("KeyedJaggedTensor values", kjt.values()), ("lengths", kjt.lengths()),
                    ("history_time", batch.history_time), ("request_time", batch.request_time)):
        if not integer_dtype(t):
            raise BatchError(f"{name}: expected integers, got {t.dtype}")
    b = batch.labels.numel()
    if kjt.lengths().numel() % len(keys):
        raise BatchError(f"{kjt.lengths().numel()} lengths for {len(keys)} keys: not the same "
                         f"number of samples per key")
    lengths = kjt.lengths().view(len(keys), -1)
    if lengths.size(1) != b:
        raise BatchError(f"features have {lengths.size(1)} samples per key but there are {b} labels")
    if (lengths < 0).any():
        key = _first((lengths < 0).any(1))
        raise BatchError(f"feature {keys[key]!r}, sample {_first(lengths[key] < 0)}: negative length")
    ends = torch.cumsum(lengths.sum(1), 0)
    n = kjt.values().numel()
    if int(ends[-1]) != n:
        over = ends > n
        key = keys[_first(over)] if over.any() else keys[-1]
        raise BatchError(f"feature {key!r}: lengths sum to {int(ends[-1])} values in all, but the "
                         f"KeyedJaggedTensor holds {n}")
    features = kjt.to_dict()
    for key in SINGLE_VALUED:
        bad = features[key].lengths() != 1
        if bad.any():
            raise BatchError(f"feature {key!r}, sample {_first(bad)}: expected exactly one value, got "
                             f"{int(features[key].lengths()[_first(bad)])}")
    mismatch = features[HIST_ITEM].lengths() != features[HIST_CATEGORY].lengths()
    if mismatch.any():
        raise BatchError(f"feature {HIST_CATEGORY!r}, sample {_first(mismatch)}: length differs from "
                         f"{HIST_ITEM!r}")
    for key in FEATURE_KEYS:
        values, rows = features[key].values(), table_sizes[key]
        bad = (values < 0) | (values >= rows)
        if bad.any():
            pos = _first(bad)
            raise BatchError(f"feature {key!r}, sample {_sample_of(features[key].offsets(), pos)}: id "
                             f"{int(values[pos])} outside the table of {rows} rows")
    hist = features[HIST_ITEM]
    offsets = hist.offsets().long()
    if batch.history_time.numel() != hist.values().numel():
        raise BatchError(f"feature 'history_time': {batch.history_time.numel()} timestamps for "
                         f"{hist.values().numel()} behaviors")
    if batch.relevant.numel() != hist.values().numel():
        raise BatchError(f"feature 'relevant': {batch.relevant.numel()} flags for "
                         f"{hist.values().numel()} behaviors")
    if batch.request_time.numel() != b:
        raise BatchError(f"feature 'request_time': {batch.request_time.numel()} values for {b} samples")
    seg = torch.repeat_interleave(torch.arange(b, device=offsets.device), hist.lengths().long())
    late = batch.history_time >= batch.request_time[seg]
    if late.any():
        pos = _first(late)
        raise BatchError(f"feature 'history_time', sample {int(seg[pos])}: behavior at "
                         f"{int(batch.history_time[pos])} is not before the request time "
                         f"{int(batch.request_time[seg[pos]])}")
    if n > 0:
        same_sample = seg[1:] == seg[:-1]
        unsorted = same_sample & (batch.history_time[1:] < batch.history_time[:-1])
        if unsorted.any():
            raise BatchError(f"feature 'history_time', sample {int(seg[1:][_first(unsorted)])}: "
                             f"timestamps are not in chronological order")
    bad = (batch.labels != 0) & (batch.labels != 1)
    if bad.any():
        raise BatchError(f"labels, sample {_first(bad)}: {float(batch.labels[_first(bad)])} is not 0 or 1")
