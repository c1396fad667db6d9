"""Event logs -> sample store (``torchrec_longseq.data.prepare``) and its reader (``store``).

Every sample is checked against a brute-force pure-Python construction written from the
documented semantics (history = the user's events of the sequence's types strictly before the
target's time, oldest first, stable on ties, the last ``max_seq_len``; split by target time),
on small logs written here: the Taobao layout and custom mappings, CSV and Parquet.
"""

import csv
import json
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.utils.data import DataLoader

from torchrec_longseq.data.prepare import ColumnMapping, IdMapping, hash_ids, main, prepare
from torchrec_longseq.data.store import SampleStore, StoreDataset, ranges_index

TAOBAO = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
SPLIT_NAMES = ("train", "val", "test")

# ---------------------------------------------------------------------------------------------
# writing logs


def write_log(path: str, columns: Sequence[str], rows: Sequence[Sequence[object]], header: bool = True) -> str:
    """Rows -> CSV (``.csv``) or Parquet (``.parquet``; ints stay ints, strings strings)."""
    if path.endswith(".parquet"):
        data = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
        pq.write_table(pa.table(data), path)
        return path
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(columns)
        w.writerows(rows)
    return path


def random_taobao(rng: np.random.Generator, n: int, users: int = 8, items: int = 40, tmax: int = 30) -> List[tuple]:
    """Taobao rows ``(user, item, category, behavior, time)``; times in a small range (many ties);
    an item's category is fixed except for a few items whose category changes over time."""
    user = rng.integers(0, users, n) * 10 + 1000
    item = rng.integers(0, items, n) * 3 + 7
    time = rng.integers(100, 100 + tmax, n)
    cat = item % 5 + np.where((item % 7 == 0) & (time > 100 + tmax // 2), 50, 0)
    beh = rng.choice(["pv", "pv", "cart", "fav", "buy"], n)
    return [(int(u), int(i), int(c), str(b), int(t)) for u, i, c, b, t in zip(user, item, cat, beh, time)]


# ---------------------------------------------------------------------------------------------
# brute-force reference and the store's samples in raw ids


def reference(
    events: Sequence[dict], targets: Sequence[dict], sequences: Dict[str, Optional[List[str]]], max_len: int,
    train_end: Optional[int], val_end: Optional[int],
) -> Dict[int, dict]:
    """``{target row: sample}`` built one sample at a time with Python lists."""
    out = {}
    for tg in targets:
        hist = {}
        for name, types in sequences.items():
            h = [e for e in events if e["user"] == tg["user"] and (types is None or e["beh"] in types)
                 and e["time"] < tg["time"]]
            h = sorted(h, key=lambda e: e["time"])[-max_len:]  # sorted() is stable: file order on ties
            hist[name] = [(e["item"], e["attrs"], e["beh"], e["time"]) for e in h]
        t = tg["time"]
        split = "train" if train_end is not None and t < train_end else "val" if val_end is None or t < val_end else "test"
        if train_end is None:
            split = "train" if val_end is None or t < val_end else "test"
        out[tg["row"]] = dict(user=tg["user"], item=tg["item"], attrs=tg["attrs"], time=t, label=tg["label"],
                              split=split, hist=hist)
    return out


def store_samples(path: str) -> List[dict]:
    """Every sample of the store, ids mapped back to raw ids (hashed columns left as rows)."""
    store = SampleStore(path)
    attrs = store.attributes
    maps = {c: store.id_mapping(c) for c in ["user", "item"] + attrs}

    def raw(col: str, rows: np.ndarray) -> List[int]:
        return [int(x) for x in (rows if maps[col].hashed else maps[col].raw(rows))]

    btypes = store.meta["behavior_types"]
    out = []
    for split in SPLIT_NAMES:
        b = store.samples(split)
        n = len(b["label"])
        users, items = raw("user", b["user"]), raw("item", b["target"]["item"])
        tattrs = [raw(a, b["target"][a]) for a in attrs]
        hist: Dict[str, List[list]] = {}
        for name, h in b["history"].items():
            cuts = np.cumsum(h["lengths"])[:-1]
            cols = [raw("item", h["item"])] + [raw(a, h[a]) for a in attrs]
            beh = [btypes[x - 1] for x in h["behavior"]] if btypes else [None] * len(h["time"])
            flat = [(c[0], tuple(c[1:]), bb, int(t)) for c, bb, t in zip(zip(*cols), beh, h["time"])] if len(h["time"]) else []
            hist[name] = [list(x) for x in np.split(np.array(flat, dtype=object).reshape(len(flat), 4), cuts)] if n else []
        for i in range(n):
            out.append(dict(
                event=int(b["event"][i]), user=users[i], item=items[i], attrs=tuple(a[i] for a in tattrs),
                time=int(b["request_time"][i]), label=float(b["label"][i]), split=split,
                hist={name: [tuple(e) for e in hist[name][i]] for name in hist},
            ))
    return out


def check_against_reference(samples: List[dict], ref: Dict[int, dict], labelled: bool) -> None:
    """Positives (or all explicit-label samples) equal the reference, one per target row."""
    got = [s for s in samples if (labelled or s["label"] == 1.0)]
    assert sorted(s["event"] for s in got) == sorted(ref)
    for s in got:
        r = ref[s["event"]]
        for key in ("user", "item", "attrs", "time", "label", "split"):
            assert s[key] == r[key], (key, s, r)
        assert s["hist"] == {k: [(i, a, b, t) for i, a, b, t in v] for k, v in r["hist"].items()}, (s, r)
        for h in s["hist"].values():
            assert all(t < s["time"] for *_, t in h)  # point in time


def taobao_dicts(rows: Sequence[tuple]) -> List[dict]:
    return [dict(row=i, user=u, item=it, attrs=(c,), beh=b, time=t, label=1.0) for i, (u, it, c, b, t) in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# Taobao layout, implicit labels, negatives


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_taobao_matches_reference(tmp_path, fmt: str) -> None:
    rows = random_taobao(np.random.default_rng(1), 400)
    path = write_log(str(tmp_path / f"UserBehavior.{fmt}"), TAOBAO, rows, header=False)
    seqs = {"clicks": ["pv"], "all": None}
    meta = prepare(path, tmp_path / "store", target_behaviors=["buy", "cart"], sequences=seqs, max_seq_len=6,
                   negatives_per_positive=2, train_end=115, val_end=122, num_shards=3, seed=5, verbose=False)
    ev = taobao_dicts(rows)
    targets = [e for e in ev if e["beh"] in ("buy", "cart")]
    ref = reference(ev, targets, seqs, 6, 115, 122)
    samples = store_samples(str(tmp_path / "store"))
    check_against_reference(samples, ref, labelled=False)

    # negatives: k per positive, same user/time/history/split, never an item seen at or before
    # the target, attributes = the item's most recent (ties: later row)
    latest: Dict[int, Tuple[int, int, int]] = {}
    for e in ev:
        if e["item"] not in latest or (e["time"], e["row"]) >= latest[e["item"]][:2]:
            latest[e["item"]] = (e["time"], e["row"], e["attrs"][0])
    negs = [s for s in samples if s["label"] == 0.0]
    assert len(negs) == 2 * len(targets) - meta["skipped"]["negatives_not_drawn"]
    assert meta["skipped"]["negatives_not_drawn"] == 0
    pos_by_event = {s["event"]: s for s in samples if s["label"] == 1.0}
    for s in negs:
        p = pos_by_event[s["event"]]
        assert (s["user"], s["time"], s["split"], s["hist"]) == (p["user"], p["time"], p["split"], p["hist"])
        seen = {e["item"] for e in ev if e["user"] == s["user"] and e["time"] <= s["time"]}
        assert s["item"] not in seen
        assert s["attrs"] == (latest[s["item"]][2],)
    counts = meta["counts"]
    assert counts["samples"] == {sp: sum(s["split"] == sp for s in samples) for sp in SPLIT_NAMES}
    assert meta["tables"]["item"]["size"] == len({r[1] for r in rows}) + 1
    assert meta["sequences"] == seqs and meta["seed"] == 5 and meta["max_seq_len"] == 6


def test_negatives_when_user_has_seen_nearly_all_items(tmp_path) -> None:
    # items 1..4; user 1 saw 1, 2, 3 before buying 3 at t=10 -> the only negative is 4;
    # user 2 saw every item before t=20 -> no negative can be drawn: dropped and counted
    rows = [(1, 1, 1, "pv", 1), (1, 2, 1, "pv", 2), (1, 3, 1, "buy", 10),
            (2, 1, 1, "pv", 1), (2, 2, 1, "pv", 1), (2, 3, 1, "pv", 1), (2, 4, 9, "pv", 1), (2, 1, 1, "buy", 20)]
    path = write_log(str(tmp_path / "ub.csv"), TAOBAO, rows, header=False)
    meta = prepare(path, tmp_path / "s", target_behaviors=["buy"], negatives_per_positive=3, negative_rounds=32,
                   verbose=False)
    samples = store_samples(str(tmp_path / "s"))
    negs = [s for s in samples if s["label"] == 0]
    assert all(s["user"] == 1 and s["item"] == 4 and s["attrs"] == (9,) for s in negs)
    assert len(negs) == 3
    assert meta["skipped"]["negatives_not_drawn"] == 3
    assert meta["counts"]["negatives"] == 3 and meta["counts"]["positives"] == 2


# ---------------------------------------------------------------------------------------------
# custom mapping: explicit labels, impressions file, hashing, JSON config + CLI


def custom_logs(rng: np.random.Generator, n_ev: int, n_imp: int) -> Tuple[List[tuple], List[tuple]]:
    """Events ``(ts, uid, iid, cate, shop, act)`` and impressions ``(uid, iid, cate, shop, ts, clicked)``."""
    ev = [(int(t), int(u), int(i), int(i % 4), int(i % 3 + 100), str(a)) for t, u, i, a in zip(
        rng.integers(0, 40, n_ev), rng.integers(0, 6, n_ev) + 50, rng.integers(0, 25, n_ev),
        rng.choice(["click", "click", "buy", "view"], n_ev))]
    imp = [(int(u), int(i), int(i % 4), int(i % 3 + 100), int(t), int(c)) for u, i, t, c in zip(
        rng.integers(0, 7, n_imp) + 50, rng.integers(0, 30, n_imp), rng.integers(0, 45, n_imp), rng.integers(0, 2, n_imp))]
    return ev, imp


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_custom_mapping_impressions_explicit_labels(tmp_path, fmt: str) -> None:
    ev_rows, imp_rows = custom_logs(np.random.default_rng(2), 300, 120)
    ev_path = write_log(str(tmp_path / f"events.{fmt}"), ["ts", "uid", "iid", "cate", "shop", "act"], ev_rows)
    imp_path = write_log(str(tmp_path / f"imps.{fmt}"), ["uid", "iid", "cate", "shop", "ts", "clicked"], imp_rows)
    ev_map = {"user": "uid", "item": "iid", "timestamp": "ts", "attributes": ["cate", "shop"], "behavior": "act"}
    imp_map = dict(ev_map, behavior=None, label="clicked")
    config = tmp_path / "mapping.json"
    config.write_text(json.dumps(dict(ev_map, sequences={"clicks": ["click"], "buys": ["buy"]}, max_seq_len=5,
                                      train_end=20, val_end=35, num_shards=2, hash_buckets={"shop": 7})))
    imp_config = tmp_path / "imps.json"
    imp_config.write_text(json.dumps(imp_map))
    meta = main([ev_path, "--config", str(config), "--impressions", imp_path, "--impressions-config", str(imp_config),
                 "--out", str(tmp_path / "store")])

    ev = [dict(row=i, user=u, item=it, attrs=(c, s), beh=a, time=t) for i, (t, u, it, c, s, a) in enumerate(ev_rows)]
    targets = [dict(row=i, user=u, item=it, attrs=(c, s), time=t, label=float(y))
               for i, (u, it, c, s, t, y) in enumerate(imp_rows)]
    seqs = {"clicks": ["click"], "buys": ["buy"]}
    ref = reference(ev, targets, seqs, 5, 20, 35)
    shop = IdMapping("shop", hash_size=7)
    for r in ref.values():  # the shop column is hashed: compare rows
        r["attrs"] = (r["attrs"][0], int(shop.lookup(np.array([r["attrs"][1]]))[0]))
        r["hist"] = {k: [(i, (a[0], int(shop.lookup(np.array([a[1]]))[0])), b, t) for i, a, b, t in v]
                     for k, v in r["hist"].items()}
    check_against_reference(store_samples(str(tmp_path / "store")), ref, labelled=True)
    assert meta["tables"]["shop"] == {"kind": "hash", "size": 7, "hash": "splitmix64"}
    assert meta["labels"] == "explicit" and meta["behavior_types"] == ["buy", "click", "view"]
    # ids of both files share one table
    assert meta["tables"]["item"]["size"] == len({r[2] for r in ev_rows} | {r[1] for r in imp_rows}) + 1


def test_same_file_targets_by_behavior_type(tmp_path) -> None:
    # one log: "imp" rows are the targets (label column), history = "click" rows; labels of the
    # other rows are empty and not checked
    rng = np.random.default_rng(3)
    rows = []
    for i in range(200):
        kind = str(rng.choice(["imp", "click", "click"]))
        rows.append((int(rng.integers(0, 5)), int(rng.integers(0, 20)), kind, int(rng.integers(0, 30)),
                     int(rng.integers(0, 2)) if kind == "imp" else ""))
    path = write_log(str(tmp_path / "log.csv"), ["u", "i", "kind", "t", "clicked"], rows)
    mapping = ColumnMapping(user="u", item="i", timestamp="t", behavior="kind", label="clicked")
    prepare(path, tmp_path / "s", mapping=mapping, target_behaviors=["imp"], sequences={"clicks": ["click"]},
            max_seq_len=3, train_end=15, verbose=False)
    ev = [dict(row=j, user=u, item=i, attrs=(), beh=k, time=t) for j, (u, i, k, t, _) in enumerate(rows)]
    targets = [dict(row=j, user=u, item=i, attrs=(), time=t, label=float(y)) for j, (u, i, k, t, y) in enumerate(rows)
               if k == "imp"]
    ref = reference(ev, targets, {"clicks": ["click"]}, 3, 15, None)
    check_against_reference(store_samples(str(tmp_path / "s")), ref, labelled=True)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), n=st.integers(1, 60), max_len=st.integers(1, 8), shards=st.integers(1, 4),
       cut=st.integers(100, 130))
def test_property_random_logs(tmp_path, seed: int, n: int, max_len: int, shards: int, cut: int) -> None:
    rows = random_taobao(np.random.default_rng(seed), n, users=4, items=6, tmax=12)
    out = tmp_path / f"s{seed}-{n}-{max_len}-{shards}-{cut}"
    path = write_log(str(out) + ".csv", TAOBAO, rows, header=False)
    seqs = {"pv": ["pv"], "buys": ["buy", "cart"]}
    prepare(path, out, sequences=seqs, max_seq_len=max_len, train_end=cut, val_end=cut + 3, num_shards=shards,
            verbose=False, overwrite=True)
    ev = taobao_dicts(rows)
    check_against_reference(store_samples(str(out)), reference(ev, ev, seqs, max_len, cut, cut + 3), labelled=True)


# ---------------------------------------------------------------------------------------------
# reading: ranks x workers, DataLoader


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("store")
    rows = random_taobao(np.random.default_rng(4), 600, users=13)
    path = write_log(str(tmp / "ub.csv"), TAOBAO, rows, header=False)
    prepare(path, tmp / "s", target_behaviors=["pv", "buy"], negatives_per_positive=1, sequences={"clicks": ["pv"]},
            max_seq_len=7, train_end=118, val_end=124, num_shards=5, verbose=False)
    return str(tmp / "s")


def sample_ids(batch: Dict) -> List[Tuple[int, int, float]]:
    return list(zip(np.asarray(batch["event"]).tolist(), np.asarray(batch["target"]["item"]).tolist(),
                    np.asarray(batch["label"]).tolist()))


@pytest.mark.parametrize("shuffle_seed", [None, 7])
def test_ranks_x_workers_cover_every_sample_once(store_path: str, shuffle_seed: Optional[int]) -> None:
    store = SampleStore(store_path)
    for split in SPLIT_NAMES:
        total = store.num_samples(split)
        for world in (1, 2, 3):
            for workers in (1, 2, 3):
                seen: List[Tuple[int, int]] = []
                sizes = []
                for rank in range(world):
                    ds = StoreDataset(store, split, batch_size=4, rank=rank, world_size=world, shuffle_seed=shuffle_seed)
                    ds.set_epoch(3)
                    for w in range(workers):
                        parts = ds.assignment(w, workers)
                        sizes.append(sum(len(i) for _, i in parts))
                        seen += [(s, int(i)) for s, idx in parts for i in idx]
                        assert sum(len(b["label"]) for b in ds.batches(w, workers)) == sizes[-1]
                assert len(seen) == len(set(seen)) == total
                assert set(seen) == {(s, i) for s in range(store.num_shards)
                                     for i in range(*store.shard_split_range(s, split))}
                assert max(sizes) - min(sizes) <= 1


def test_dataloader_workers_and_batch_layout(store_path: str) -> None:
    store = SampleStore(store_path)
    expected = sorted(sample_ids(store.samples("train")))
    ds = StoreDataset(store_path, "train", batch_size=16, shuffle_seed=0)
    got = []
    for batch in DataLoader(ds, batch_size=None, num_workers=2):
        b = batch["label"].numel()
        assert batch["label"].dtype == torch.float32 and batch["user"].shape == (b,)
        assert batch["request_time"].dtype == torch.int64
        h = batch["history"]["clicks"]
        assert h["lengths"].shape == (b,) and h["item"].shape == h["time"].shape == (int(h["lengths"].sum()),)
        assert h["item"].dtype == torch.int64 and set(batch["target"]) == {"item", "category_id"}
        owner = torch.repeat_interleave(torch.arange(b), h["lengths"])
        assert bool((h["time"] < batch["request_time"][owner]).all())
        assert int(h["lengths"].max()) <= 7
        got += sample_ids(batch)
    assert sorted(got) == expected


def test_ranges_index() -> None:
    assert ranges_index(np.array([5, 0, 9]), np.array([2, 0, 3])).tolist() == [5, 6, 9, 10, 11]
    assert ranges_index(np.array([1]), np.array([0])).tolist() == []


# ---------------------------------------------------------------------------------------------
# bad rows


def bad_log(tmp_path, rows: List[tuple], name: str = "events.csv", header: bool = True) -> str:
    return write_log(str(tmp_path / name), ["user", "item", "cat", "type", "ts"], rows, header=header)


GOOD = [(1, 10, 3, "pv", 5), (1, 11, 3, "buy", 6), (2, 10, 3, "pv", 7)]
CUSTOM = dict(user="user", item="item", timestamp="ts", attributes=["cat"], behavior="type",
              behavior_types=["pv", "buy"])


@pytest.mark.parametrize("bad_row, message", [
    ((1, "x7", 3, "pv", 5), "events.csv, row 3, column 'item': not an integer: 'x7'"),
    ((1, 10, 3, "pv", ""), "events.csv, row 3, column 'ts': missing value"),
    ((1, 10, 3, "click", 5), "events.csv, row 3, column 'type': unknown behavior type 'click'"),
    ((1, 10, 3.5, "pv", 5), "events.csv, row 3, column 'cat': not an integer: '3.5'"),
    ((1, 10, 3, "pv"), "events.csv, row 3: expected 5 fields, got 4"),
    ((1, 10, 3, "pv", -100), "events.csv, row 3, column 'ts': timestamp outside [0, 2^62): -100"),
])
def test_bad_rows_named(tmp_path, bad_row: tuple, message: str) -> None:
    path = bad_log(tmp_path, GOOD[:2] + [bad_row] + GOOD[2:])
    with pytest.raises(ValueError) as e:
        prepare(path, tmp_path / "s", mapping=CUSTOM, verbose=False)
    assert message in str(e.value)


def test_bad_rows_parquet_and_taobao(tmp_path) -> None:
    path = str(tmp_path / "events.parquet")
    pq.write_table(pa.table({"user": [1, 2, None], "item": [1, 2, 3], "cat": [1, 1, 1], "type": ["pv"] * 3,
                             "ts": [1, 2, 3]}), path)
    with pytest.raises(ValueError, match=r"events.parquet, row 3, column 'user': missing value"):
        prepare(path, tmp_path / "s", mapping=CUSTOM, verbose=False)
    tb = write_log(str(tmp_path / "UserBehavior.csv"), TAOBAO, [(1, 2, 3, "pv", 4), (1, 2, 3, "pv", "9x")], header=False)
    with pytest.raises(ValueError, match=r"UserBehavior.csv, row 2, column 'timestamp': not an integer: '9x'"):
        prepare(tb, tmp_path / "t", verbose=False)


def test_bad_rows_skipped_and_counted(tmp_path, capsys) -> None:
    rows = GOOD[:1] + [(1, "x", 3, "pv", 5), (1, 10, 3, "click", 5), (1, 10, 3, "pv")] + GOOD[1:] + [(3, 1, 1, "pv", "")]
    path = bad_log(tmp_path, rows)
    meta = prepare(path, tmp_path / "s", mapping=CUSTOM, on_bad_rows="skip")
    report = meta["skipped"]["bad_rows"][path]
    assert report == {"rows": 4, "by_column": {"item": 1, "type": 1, "ts": 1}, "malformed": 1}
    assert meta["skipped"]["bad_rows_total"] == 4
    assert json.load(open(tmp_path / "s" / "meta.json"))["skipped"]["bad_rows"][path]["rows"] == 4
    assert "skipped 4 bad rows" in capsys.readouterr().out
    samples = store_samples(str(tmp_path / "s"))
    assert sorted((s["user"], s["item"], s["time"]) for s in samples) == sorted((u, i, t) for u, i, _, _, t in GOOD)
    # ``event`` numbers the parsed rows: rows skipped for a value count, the malformed one does not
    assert sorted(s["event"] for s in samples) == [0, 3, 4]


# ---------------------------------------------------------------------------------------------
# ids


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_id_mapping_round_trip(tmp_path) -> None:
    rows = [(5, 900, 3, "pv", 1), (-2, 17, 3, "buy", 2), (10**15, 900, 8, "pv", 3)]
    path = write_log(str(tmp_path / "ub.csv"), TAOBAO, rows, header=False)
    prepare(path, tmp_path / "s", hash_buckets={"category_id": 11}, verbose=False)
    users = IdMapping.load(tmp_path / "s", "user")
    assert users.keys.tolist() == [-2, 5, 10**15] and users.size == 4
    assert users.lookup(np.array([5, 10**15, -2, 6, 0])).tolist() == [2, 3, 1, 0, 0]
    assert users.raw(users.lookup(np.array([-2, 5, 10**15]))).tolist() == [-2, 5, 10**15]
    items = SampleStore(tmp_path / "s").id_mapping("item")
    assert items.lookup(np.array([[17, 900], [18, 901]])).tolist() == [[1, 2], [0, 0]]
    cats = SampleStore(tmp_path / "s").id_mapping("category_id")
    assert cats.hashed and cats.size == 11
    assert cats.lookup(np.array([3, 8, -1])).tolist() == [splitmix64(v % 2**64) % 11 for v in (3, 8, -1)]
    with pytest.raises(ValueError):
        cats.raw(np.array([1]))
    assert hash_ids(np.array([2**62, -5]), 1000).tolist() == [splitmix64(2**62) % 1000, splitmix64(2**64 - 5) % 1000]


@pytest.mark.parametrize("label, message", [
    ("0.5", "label not 0 or 1: 0.5"), ("2", "label not 0 or 1: 2"), ("", "missing value")])
def test_labels_must_be_zero_or_one(tmp_path, label: str, message: str) -> None:
    """What the models' loss and check_batch accept; a 0.5 used to go into the store and fail
    only at the first training batch."""
    path = tmp_path / "impressions.csv"
    path.write_text("user,item,ts,clicked\n1,10,5,1\n1,11,6," + label + "\n2,10,7,0\n")
    mapping = dict(user="user", item="item", timestamp="ts", label="clicked")
    with pytest.raises(ValueError, match=re.escape(f"row 2, column 'clicked': {message}")):
        prepare(str(path), tmp_path / "s", mapping=mapping, verbose=False)
