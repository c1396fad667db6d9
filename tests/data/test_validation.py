"""check_batch: every malformed input raises BatchError naming the feature (and the sample).

Bad batches are built by editing a small generated batch per sample (Python lists) and
constructing the KeyedJaggedTensor directly.
"""

import re
from typing import Dict, List, Optional

import pytest
import torch
from torchrec import KeyedJaggedTensor

from torchrec_longseq.data.batch import FEATURE_KEYS, HIST_ITEM, Batch
from torchrec_longseq.data.synthetic import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.validation import BatchError, check_batch
from torchrec_longseq.schema import SequenceSchema, default_schema

CONFIG = SyntheticConfig(max_seq_len=64, num_users=1000, num_items=1000, num_categories=10,
                         subclusters=10, candidates_per_request=1)
B = 6


class Editable:
    """A batch as per-sample Python lists, turned back into a ``Batch`` by ``build``."""

    def __init__(self) -> None:
        batch = SyntheticGenerator(CONFIG).batch("train", 0, B)
        self.features: Dict[str, List[List[int]]] = {}
        for key in FEATURE_KEYS:
            jt = batch.features[key]
            values, offsets = jt.values().tolist(), jt.offsets().tolist()
            self.features[key] = [values[offsets[b]:offsets[b + 1]] for b in range(B)]
        offsets = batch.features[HIST_ITEM].offsets().tolist()
        t, r = batch.history_time.tolist(), batch.relevant.tolist()
        self.history_time = [t[offsets[b]:offsets[b + 1]] for b in range(B)]
        self.relevant = [r[offsets[b]:offsets[b + 1]] for b in range(B)]
        self.request_time = batch.request_time.tolist()
        self.labels = batch.labels.tolist()

    def empty_history(self, b: int) -> None:
        for key in ("hist_item", "hist_category"):
            self.features[key][b] = []
        self.history_time[b], self.relevant[b] = [], []

    def build(self, keys: Optional[List[str]] = None, lengths: Optional[torch.Tensor] = None) -> Batch:
        keys = FEATURE_KEYS if keys is None else keys
        values = [v for key in keys for sample in self.features[key] for v in sample]
        if lengths is None:
            lengths = torch.tensor([len(s) for key in keys for s in self.features[key]])
        return Batch(
            features=KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.long),
                                       lengths=lengths.int()),
            history_time=torch.tensor([t for s in self.history_time for t in s], dtype=torch.long),
            request_time=torch.tensor(self.request_time, dtype=torch.long),
            labels=torch.tensor(self.labels, dtype=torch.float32),
            relevant=torch.tensor([r for s in self.relevant for r in s], dtype=torch.bool),
        )


def raises(batch: Batch, *fragments: str) -> str:
    with pytest.raises(BatchError) as info:
        check_batch(batch, CONFIG.table_sizes)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_generated_batch_is_accepted() -> None:
    check_batch(Editable().build(), CONFIG.table_sizes)


def test_empty_histories_are_accepted() -> None:
    e = Editable()
    e.empty_history(0)
    e.empty_history(3)
    batch = e.build()
    assert batch.features[HIST_ITEM].lengths().tolist()[3] == 0
    check_batch(batch, CONFIG.table_sizes)
    for b in range(B):
        e.empty_history(b)
    batch = e.build()
    assert batch.features[HIST_ITEM].values().numel() == 0 and batch.history_time.numel() == 0
    check_batch(batch, CONFIG.table_sizes)


def test_missing_key() -> None:
    e = Editable()
    keys = [k for k in FEATURE_KEYS if k != "hist_category"]
    raises(e.build(keys), "missing", "hist_category")


def test_extra_keys_are_accepted_and_missing_keys_named() -> None:
    """Keys neither ``table_sizes`` nor a schema names are the user's: accepted (multi-valued,
    anywhere in the KJT, unchecked ids). A key ``table_sizes`` names is required and its ids
    checked; a key a schema names is required even when ``table_sizes`` does not list it."""
    e = Editable()
    e.features["device_type"] = [[1]] * B
    e.features["query_terms"] = [list(range(b)) for b in range(B)]  # 0 .. B-1 values
    e.features["query_terms"][3] = [10**9, -5]  # no table: not checked
    keys = FEATURE_KEYS[:3] + ["query_terms"] + FEATURE_KEYS[3:] + ["device_type"]
    batch = e.build(keys)
    assert batch.features["query_terms"].lengths().tolist()[3] == 2
    check_batch(batch, CONFIG.table_sizes)

    # an extra key table_sizes names is checked like the others
    sizes = {**CONFIG.table_sizes, "device_type": 2}
    check_batch(batch, sizes)
    e.features["device_type"][4] = [2]
    with pytest.raises(BatchError, match=re.escape("feature 'device_type', sample 4: id 2 "
                                                   "outside the table of 2 rows")):
        check_batch(e.build(keys), sizes)

    # missing: a key of table_sizes (no schema names it)
    with pytest.raises(BatchError, match=re.escape("missing ['device_type']")):
        check_batch(Editable().build(), sizes)
    # missing: a key of the schema (table_sizes does not name it)
    sizes = {k: v for k, v in CONFIG.table_sizes.items() if k != "hist_category"}
    check_batch(Editable().build(), sizes)
    keys = [k for k in FEATURE_KEYS if k != "hist_category"]
    with pytest.raises(BatchError, match=re.escape("missing ['hist_category']")):
        check_batch(Editable().build(keys), sizes)
    # missing: the time key of a schema that reads its timestamps from the KJT
    schema = SequenceSchema(attributes=default_schema().attributes, time_key="hist_time")
    with pytest.raises(BatchError, match=re.escape("missing ['hist_time']")):
        check_batch(Editable().build(), CONFIG.table_sizes, [schema])


def test_lengths_not_summing_to_values() -> None:
    e = Editable()
    lengths = torch.tensor([len(s) for key in FEATURE_KEYS for s in e.features[key]])
    lengths[4 * B + 2] += 1  # hist_item, sample 2 claims one value more than there is
    # checked on the lengths first: the history keys must agree, and the message names both
    raises(e.build(lengths=lengths), "feature 'hist_category', sample 2", "differs from "
           "'hist_item'")
    lengths[5 * B + 2] += 1  # hist_category too: aligned, but more lengths than values
    message = raises(e.build(lengths=lengths), "lengths sum to")
    # the values cannot tell which feature is wrong, but the message names one of them
    assert re.search(r"feature '(hist_item|hist_category)'", message), message
    lengths[4 * B + 2] -= 2  # one value fewer in each
    lengths[5 * B + 2] -= 2
    raises(e.build(lengths=lengths), "lengths sum to", "feature '")
    lengths[4 * B + 2] += 1
    lengths[5 * B + 2] += 1
    lengths[2 * B + 3] += 1  # a candidate key: one value per sample
    raises(e.build(lengths=lengths), "feature 'target_item', sample 3: expected exactly one")


def test_negative_length() -> None:
    e = Editable()
    lengths = torch.tensor([len(s) for key in FEATURE_KEYS for s in e.features[key]])
    # hist_item: sample 1 has length -1, sample 2 compensates (the total is right)
    lengths[4 * B + 2] += int(lengths[4 * B + 1]) + 1
    lengths[4 * B + 1] = -1
    raises(e.build(lengths=lengths), "feature 'hist_item', sample 1", "negative")


def test_history_category_length_differs_from_items() -> None:
    e = Editable()
    e.features["hist_category"][2] = e.features["hist_category"][2][:-1]
    raises(e.build(), "feature 'hist_category', sample 2", "hist_item")


@pytest.mark.parametrize("key", ["target_item", "target_category"])
def test_candidate_key_with_two_values(key: str) -> None:
    """A schema's candidate keys hold exactly one id per sample."""
    e = Editable()
    e.features[key][4] = e.features[key][4] * 2
    raises(e.build(), f"feature '{key}', sample 4", "got 2")
    e = Editable()
    e.features[key][1] = []
    raises(e.build(), f"feature '{key}', sample 1", "got 0")


@pytest.mark.parametrize("key", ["user_id", "context_hour"])
def test_pooled_features_may_have_any_number_of_values(key: str) -> None:
    """Only candidate keys must be single-valued: a pooled feature is a bag (the EBC pools it),
    of any length, its ids still checked."""
    e = Editable()
    e.features[key][4] = e.features[key][4] * 2
    e.features[key][1] = []
    check_batch(e.build(), CONFIG.table_sizes)
    e.features[key][4] = e.features[key][4][:1] + [CONFIG.table_sizes[key]]
    raises(e.build(), f"feature '{key}', sample 4", str(CONFIG.table_sizes[key]), "outside")


def test_id_outside_the_table() -> None:
    e = Editable()
    e.empty_history(1)  # an empty sample before the bad one: the sample index must skip it
    e.features["hist_item"][2][5] = CONFIG.num_items
    raises(e.build(), "feature 'hist_item', sample 2", str(CONFIG.num_items))

    e = Editable()
    e.features["hist_category"][3][0] = -1
    raises(e.build(), "feature 'hist_category', sample 3", "-1")

    e = Editable()
    e.features["hist_item"][B - 1][-1] = CONFIG.num_items + 7  # the very last value
    raises(e.build(), f"feature 'hist_item', sample {B - 1}")

    e = Editable()
    e.features["user_id"][5] = [CONFIG.num_users]
    raises(e.build(), "feature 'user_id', sample 5")

    e = Editable()
    e.features["context_hour"][0] = [24]
    raises(e.build(), "feature 'context_hour', sample 0")

    e = Editable()
    e.features["target_category"][2] = [-3]
    raises(e.build(), "feature 'target_category', sample 2")

    # the largest valid ids are accepted
    e = Editable()
    e.features["hist_item"][2][0] = CONFIG.num_items - 1
    e.features["hist_category"][2][0] = CONFIG.num_categories - 1
    check_batch(e.build(), CONFIG.table_sizes)


def test_history_time_at_or_after_the_request() -> None:
    for delta in (0, 1, 10**6):
        e = Editable()
        e.history_time[2][-1] = e.request_time[2] + delta
        raises(e.build(), "feature 'history_time', sample 2", str(e.request_time[2]))
    # one second before is fine
    e = Editable()
    e.history_time[2][-1] = e.request_time[2] - 1
    check_batch(e.build(), CONFIG.table_sizes)


def test_unsorted_history_time() -> None:
    e = Editable()
    times = e.history_time[3]
    assert times[0] < times[1]
    times[0], times[1] = times[1], times[0]
    raises(e.build(), "feature 'history_time', sample 3", "chronological")
    # equal timestamps are allowed (non-decreasing)
    e = Editable()
    e.history_time[3][0] = e.history_time[3][1]
    check_batch(e.build(), CONFIG.table_sizes)


def test_decrease_across_samples_is_not_unsorted() -> None:
    """Timestamps restart at every sample: only order within a sample is checked."""
    e = Editable()
    shift = max(0, e.history_time[1][0] - e.history_time[0][-1] + 1000)
    e.history_time[1] = [t - shift for t in e.history_time[1]]
    assert e.history_time[1][0] < e.history_time[0][-1]
    check_batch(e.build(), CONFIG.table_sizes)


def test_history_time_count_mismatch() -> None:
    e = Editable()
    e.history_time[4] = e.history_time[4][:-1]
    raises(e.build(), "history_time")


def test_request_time_count_mismatch() -> None:
    e = Editable()
    e.request_time = e.request_time[:-1]
    raises(e.build(), "request_time")


def test_label_not_zero_or_one() -> None:
    e = Editable()
    e.labels[4] = 0.5
    raises(e.build(), "labels, sample 4", "0.5")


def test_labels_count_differs_from_samples() -> None:
    e = Editable()
    e.labels = e.labels + [0.0]
    raises(e.build(), f"{B} samples per key", f"{B + 1} labels")


def test_float_ids_and_times_are_rejected() -> None:
    """A float id would be truncated by the compiled searches (3.5 read as 3)."""
    batch = Editable().build()
    kjt = batch.features
    floats = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().double() + 0.5,
                               lengths=kjt.lengths())
    raises(Batch(**{**batch.__dict__, "features": floats}), "KeyedJaggedTensor values",
           "expected torch.int32 or torch.int64", "torch.float64")
    raises(Batch(**{**batch.__dict__, "history_time": batch.history_time.float()}),
           "history_time: expected torch.int32 or torch.int64")


@pytest.mark.parametrize("field, convert, message", [
    ("labels", lambda t: t.long(), "labels: expected torch.float32 or torch.float64, got torch.int64"),
    ("labels", lambda t: t.bool(), "labels: expected torch.float32 or torch.float64, got torch.bool"),
    ("labels", lambda t: t.to(torch.uint8), "labels: expected torch.float32 or torch.float64"),
    ("lengths", lambda t: t.to(torch.int16), "KeyedJaggedTensor lengths: expected torch.int32 or "
                                            "torch.int64, got torch.int16"),
    ("lengths", lambda t: t.to(torch.uint8), "KeyedJaggedTensor lengths: expected"),
    ("values", lambda t: t.to(torch.int16), "KeyedJaggedTensor values: expected torch.int32 or "
                                           "torch.int64, got torch.int16"),
    ("history_time", lambda t: t.to(torch.uint64), "history_time: expected torch.int32 or "
                                                  "torch.int64, got torch.uint64"),
])
def test_dtypes_the_models_cannot_use_are_named(field: str, convert, message: str) -> None:
    """Each used to pass the check and fail inside torch or fbgemm ("result type Float can't be
    cast to Long", "asynchronous_complete_cumsum_cpu_kernel not implemented for 'Short'"), or
    crash inside the check (uint64)."""
    batch = Editable().build()
    kjt = batch.features
    if field in ("lengths", "values"):
        parts = {"values": kjt.values(), "lengths": kjt.lengths()}
        parts[field] = convert(parts[field])
        changed = {"features": KeyedJaggedTensor(keys=kjt.keys(), **parts)}
    else:
        changed = {field: convert(getattr(batch, field))}
    raises(Batch(**{**batch.__dict__, **changed}), message)


@pytest.mark.parametrize("time", [-1, 2**62, 2**63 - 1, -(2**63)])
def test_timestamps_outside_the_range_are_named(time: int) -> None:
    """``request_time - history_time`` would overflow int64 (a behavior at the smallest int64
    landed in the "under a minute old" bucket)."""
    batch = Editable().build()
    history = batch.history_time.clone()
    history[0] = time if time < 0 else history[0]
    request = batch.request_time.clone()
    request[0] = time if time > 0 else request[0]
    raises(Batch(**{**batch.__dict__, "history_time": history, "request_time": request}),
           f"timestamp {time} outside [0, 2^62)")


def test_lengths_not_a_multiple_of_the_keys() -> None:
    e = Editable()
    lengths = torch.tensor([len(s) for key in FEATURE_KEYS for s in e.features[key]])
    raises(e.build(lengths=lengths[:-1]), f"{lengths.numel() - 1} lengths for {len(FEATURE_KEYS)} keys")


def test_relevant_count_mismatch() -> None:
    e = Editable()
    e.relevant[2] = e.relevant[2][:-1]
    raises(e.build(), "feature 'relevant'", "flags for")
