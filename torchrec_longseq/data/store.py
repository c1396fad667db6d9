"""Reading a sample store written by ``torchrec_longseq.data.prepare``.

``SampleStore(path)`` memory-maps the store's arrays (nothing is read until gathered);
``StoreDataset`` is an ``IterableDataset`` of batches, each a plain dict::

    {
      "user":         [B] int64   user feature (dense row or hash)
      "target":       {"item": [B] int64, <attribute>: [B] int64}
      "label":        [B] float32
      "request_time": [B] int64   the target's time; every history time is < it
      "event":        [B] int64   the target's data row in its source file(s)
      "history": {
        <sequence>: {"lengths": [B] int64, "time": [N] int64, "item": [N] int64,
                     <attribute>: [N] int64, "behavior": [N] int64 (if the log has types)}
      }
    }

with ``N = lengths.sum()``; a sample's behaviors are consecutive in the ``[N]`` arrays, oldest
first (the jagged layout of a KeyedJaggedTensor). Arrays are torch tensors (``as_torch=True``,
the default) or numpy arrays.

Partitioning: the ``G = world_size * num_workers`` readers (``torch.utils.data.get_worker_info``)
each take one contiguous range of the split's samples, laid out shard after shard (in a seeded
per-epoch shard order when shuffling): reader ``g`` takes ``[S * g // G, S * (g + 1) // G)``.
So the readers' ranges are disjoint and cover the split: every sample exactly once per epoch
across all ranks x workers, and counts differ by at most one sample. As shards are contiguous
user ranges, a reader touches a few shards and a contiguous block of each history array. With
``shuffle_seed``, the shard order and the order within each reader's part of a shard are
permuted per epoch (``set_epoch``), the same on every rank. Batches are cut from the reader's
stream and may span two shards; the last batch of a reader may be short (``drop_last``).
"""

import json
import os
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from torchrec_longseq.data.prepare import SPLITS, IdMapping

if TYPE_CHECKING:
    from torchrec_longseq.data.batch import Batch
    from torchrec_longseq.schema import SequenceSchema

Part = Tuple[int, np.ndarray]  # (shard, local sample indices in that shard)


def ranges_index(start: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``[start_i, start_i + lengths_i)`` ranges: ``[B]``, ``[B]`` -> ``[sum
    lengths]`` int64 (``np.repeat`` of the shifted starts plus one ``arange``; no loop)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(start, dtype=np.int64) - before, lengths) + np.arange(total, dtype=np.int64)


class SampleStore:
    """A sample store directory: ``meta``, id mappings, memory-mapped sequences and shards."""

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self.path = os.fspath(path)
        meta_path = os.path.join(self.path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{self.path} is not a complete sample store (no meta.json)")
        with open(meta_path, encoding="utf-8") as f:
            self.meta: Dict = json.load(f)
        self._sequences: Dict[str, Dict[str, np.ndarray]] = {}
        self._shards: Dict[int, Dict[str, np.ndarray]] = {}

    def __getstate__(self) -> Dict:  # pickle the path only (DataLoader workers re-open the maps)
        return {"path": self.path}

    def __setstate__(self, state: Dict) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    @property
    def sequence_names(self) -> List[str]:
        return list(self.meta["sequences"])

    @property
    def attributes(self) -> List[str]:
        return list(self.meta["columns"]["attributes"])

    @property
    def num_shards(self) -> int:
        return int(self.meta["num_shards"])

    @property
    def table_sizes(self) -> Dict[str, int]:
        """Rows of each id column's embedding table (dense: distinct ids + 1; hashed: size)."""
        return {c: int(t["size"]) for c, t in self.meta["tables"].items()}

    def id_mapping(self, column: str) -> IdMapping:
        """Raw id -> row of ``column`` (``user``, ``item`` or an attribute)."""
        table = self.meta["tables"][column]
        if table["kind"] == "hash":
            return IdMapping(column, hash_size=int(table["size"]))
        return IdMapping(column, keys=np.load(os.path.join(self.path, "vocab", f"{column}.npy")))

    def num_samples(self, split: str) -> int:
        return int(self.meta["counts"]["samples"][split])

    def shard_split_range(self, shard: int, split: str) -> Tuple[int, int]:
        """``[lo, hi)`` of ``split``'s samples in ``shard`` (ordered train, val, test)."""
        counts = self.meta["shards"][shard]["samples"]
        lo = sum(int(counts[s]) for s in SPLITS[: SPLITS.index(split)])
        return lo, lo + int(counts[split])

    def sequence(self, name: str) -> Dict[str, np.ndarray]:
        """Memory maps of ``sequences/<name>``: ``offsets [U+1]``, ``time [N]``, ``item [N]``,
        attributes, ``behavior`` (when present)."""
        if name not in self._sequences:
            base = os.path.join(self.path, "sequences", name)
            self._sequences[name] = {
                f[:-4]: np.load(os.path.join(base, f), mmap_mode="r") for f in os.listdir(base) if f.endswith(".npy")
            }
        return self._sequences[name]

    def shard(self, shard: int) -> Dict[str, np.ndarray]:
        """Memory maps of one shard's sample arrays, keyed ``user, time, label, event,
        target/<column>, history/<sequence>/start|end``."""
        if shard not in self._shards:
            base = os.path.join(self.path, "shards", f"{shard:05d}")
            arrays = {}
            for root, _, files in os.walk(base):
                for f in files:
                    if f.endswith(".npy"):
                        key = os.path.relpath(os.path.join(root, f[:-4]), base).replace(os.sep, "/")
                        arrays[key] = np.load(os.path.join(root, f), mmap_mode="r")
            self._shards[shard] = arrays
        return self._shards[shard]

    def gather(self, parts: Sequence[Part]) -> Dict:
        """The batch (numpy, layout in the module docstring) of the samples ``parts`` (in that
        order). History slices are gathered with one index array per sequence."""
        def cat(key: str) -> np.ndarray:
            arrays = [np.asarray(self.shard(s)[key][idx]) for s, idx in parts]
            out = np.concatenate(arrays) if len(arrays) != 1 else arrays[0]
            return out.astype(np.int64, copy=False) if out.dtype.kind == "i" else out

        batch: Dict = {
            "user": cat("user"),
            "target": {c: cat(f"target/{c}") for c in ["item"] + self.attributes},
            "label": cat("label"),
            "request_time": cat("time"),
            "event": cat("event"),
            "history": {},
        }
        for name in self.sequence_names:
            start, end = cat(f"history/{name}/start"), cat(f"history/{name}/end")
            lengths = end - start
            pos = ranges_index(start, lengths)
            seq = self.sequence(name)
            h = {"lengths": lengths}
            for col, arr in seq.items():
                if col != "offsets":
                    h[col] = np.asarray(arr[pos]).astype(np.int64, copy=False)
            batch["history"][name] = h
        return batch

    def samples(self, split: str) -> Dict:
        """All samples of ``split`` as one batch (numpy), shard after shard - for inspection
        and tests; a large split wants ``StoreDataset``."""
        parts = []
        for s in range(self.num_shards):
            lo, hi = self.shard_split_range(s, split)
            parts.append((s, np.arange(lo, hi, dtype=np.int64)))
        return self.gather(parts)


def _to_torch(batch: Dict) -> Dict:
    return {k: _to_torch(v) if isinstance(v, dict) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class StoreDataset(IterableDataset):
    """Batches of one split of a ``SampleStore`` for rank ``rank`` of ``world_size``; see the
    module docstring for the layout and the partitioning across ranks x DataLoader workers.
    Use it with ``DataLoader(dataset, batch_size=None, num_workers=...)``."""

    def __init__(
        self,
        store: Union[SampleStore, str, "os.PathLike[str]"],
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_seed: Optional[int] = None,
        drop_last: bool = False,
        as_torch: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError("need 0 <= rank < world_size and batch_size >= 1")
        self.store = store if isinstance(store, SampleStore) else SampleStore(store)
        self.split, self.batch_size = split, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_seed, self.drop_last, self.as_torch = shuffle_seed, drop_last, as_torch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle of the next iteration (call it before each epoch, every rank)."""
        self.epoch = epoch

    def assignment(self, worker_id: int = 0, num_workers: int = 1) -> List[Part]:
        """The samples reader ``(rank, worker_id)`` reads this epoch, in order, as
        ``(shard, local indices)`` parts."""
        g, total_readers = self.rank * num_workers + worker_id, self.world_size * num_workers
        n = self.store.num_shards
        rng = None if self.shuffle_seed is None else np.random.default_rng([self.shuffle_seed, self.epoch])
        order = np.arange(n) if rng is None else rng.permutation(n)
        ranges = [self.store.shard_split_range(int(s), self.split) for s in order]
        sizes = np.array([hi - lo for lo, hi in ranges], dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(sizes)])
        total = int(cum[-1])
        lo, hi = total * g // total_readers, total * (g + 1) // total_readers
        parts: List[Part] = []
        for j, s in enumerate(order):
            a, b = max(lo, int(cum[j])), min(hi, int(cum[j + 1]))
            if a >= b:
                continue
            local = np.arange(a - cum[j], b - cum[j], dtype=np.int64) + ranges[j][0]
            if self.shuffle_seed is not None:
                local = np.random.default_rng([self.shuffle_seed, self.epoch, g, int(s)]).permutation(local)
            parts.append((int(s), local))
        return parts

    def _worker(self) -> Tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def batches(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[Dict]:
        """The batches of one reader (``__iter__`` asks ``get_worker_info`` for the worker)."""
        pending: List[Part] = []
        have = 0
        for shard, local in self.assignment(worker_id, num_workers):
            while local.size:
                take = min(self.batch_size - have, local.size)
                pending.append((shard, local[:take]))
                local, have = local[take:], have + take
                if have == self.batch_size:
                    yield self._emit(pending)
                    pending, have = [], 0
        if have and not self.drop_last:
            yield self._emit(pending)

    def _emit(self, parts: List[Part]) -> Dict:
        batch = self.store.gather(parts)
        return _to_torch(batch) if self.as_torch else batch

    def __iter__(self) -> Iterator[Dict]:
        return self.batches(*self._worker())


# --------------------------------------------------------------------------- the model's layout

USER_KEY = "user_id"  # the pooled user feature (GAUC groups by it)


def store_tables(store: SampleStore) -> Dict[str, int]:
    """Rows of every embedding table a model of ``store`` needs: ``user``, ``item``, each id
    attribute, and ``behavior`` (the behavior types + row 0 for none) if the log has types."""
    sizes = dict(store.table_sizes)
    if store.meta.get("behavior_types"):
        sizes["behavior"] = len(store.meta["behavior_types"]) + 1
    return sizes


def store_schemas(store: SampleStore) -> Dict[str, "SequenceSchema"]:
    """One ``SequenceSchema`` per sequence of ``store``, in the keys ``to_batch`` writes:

    ==================  ==========================  =====================
    what                 KJT key                     table
    ==================  ==========================  =====================
    the user             ``user_id``                 ``user`` (pooled)
    candidate column c   ``target_<c>``              ``<c>``
    history column c     ``<sequence>_<c>``          ``<c>``
    behavior type        ``<sequence>_behavior``     ``behavior`` (no candidate key)
    timestamps           ``<sequence>_time``         (not looked up)
    ==================  ==========================  =====================

    ``c`` is ``item`` and each id attribute (``category_id``, ...); hard search matches the
    first attribute (the item when there is none)."""
    from torchrec_longseq.schema import Attribute, SequenceSchema

    columns = ["item"] + store.attributes
    typed = bool(store.meta.get("behavior_types"))
    schemas = {}
    for name in store.sequence_names:
        attributes = [Attribute(f"{name}_{c}", c, candidate_key=f"target_{c}") for c in columns]
        if typed:
            attributes.append(Attribute(f"{name}_behavior", "behavior"))
        schemas[name] = SequenceSchema(attributes, time_key=f"{name}_time")
    return schemas


def to_batch(batch: Dict, store: SampleStore) -> "Batch":
    """A ``StoreDataset`` batch (torch tensors) as the model's ``Batch``: one KJT with the keys
    of ``store_schemas`` (timestamps included), labels and request times; no dense
    ``history_time`` (every sequence has a time key) and no ``relevant`` flags."""
    from torchrec import KeyedJaggedTensor

    from torchrec_longseq.data.batch import Batch

    b = batch["label"].numel()
    one = torch.ones(b, dtype=torch.long)
    keys, values, lengths = [USER_KEY], [batch["user"]], [one]
    for column, ids in batch["target"].items():
        keys.append(f"target_{column}")
        values.append(ids)
        lengths.append(one)
    typed = bool(store.meta.get("behavior_types"))
    for name, history in batch["history"].items():
        for column in ["item"] + store.attributes + (["behavior"] if typed else []) + ["time"]:
            keys.append(f"{name}_{column}")
            values.append(history[column])
            lengths.append(history["lengths"])
    empty = torch.zeros(0, dtype=torch.long)
    return Batch(features=KeyedJaggedTensor(keys=keys, values=torch.cat([v.long() for v in values]),
                                            lengths=torch.cat(lengths).int()),
                 history_time=empty, request_time=batch["request_time"].long(),
                 labels=batch["label"].float(), relevant=empty.bool())


class StoreBatches(IterableDataset):
    """``StoreDataset``'s batches as the model's ``Batch`` (``to_batch``), converted in the
    DataLoader's workers."""

    def __init__(self, dataset: StoreDataset) -> None:
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        for batch in self.dataset:
            yield to_batch(batch, self.dataset.store)
