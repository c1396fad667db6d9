"""Is training from a prepared store data-bound? ETA at L <= 1,000, fed three ways, one run.

A made-up log in the Taobao UserBehavior layout (users with up to ``--events-per-user`` events,
so histories reach ``--max-seq-len``) is prepared into a store (``data.prepare``); then ETA is
trained on the training path of ``torchrec_longseq.train`` with one rank (DMP, fused row-wise
Adagrad, Adam, derived-table refresh), timing every step from asking for the batch to the end
of the update:

* ``store``: the batches read from the store as ``train.py --data`` reads them (``StoreBatches``
  through a DataLoader with ``--num-workers`` workers, ``check_batch`` on each);
* ``preloaded``: the same batches gathered before the timing (the model's time alone);
* ``synthetic``: the synthetic stream of ``train.py`` (generated in DataLoader workers) at the
  same maximum length, with its own (one-sequence) ETA model, for reference.

``store`` within 10% of ``preloaded`` samples/s means the data path keeps up. Prints a table
and writes ``OUT/store_training.json``::

    .venv/bin/python benchmarks/store_training.py --out runs/store-training
"""

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import torch
from torch.utils.data import DataLoader

from runinfo import source_commit
from torchrec_longseq.data import SyntheticConfig, SyntheticLifelongSequences
from torchrec_longseq.data.prepare import prepare
from torchrec_longseq.data.store import SampleStore, StoreBatches, StoreDataset
from torchrec_longseq.data.validation import check_batch
from torchrec_longseq.models.longseq_ctr import (LongSeqCTR, LongSeqCTRTrain, ModelConfig,
                                                 build_model, build_store_model)
from torchrec_longseq.train import dense_optimizer, init_distributed, shard


def write_log(path: Path, users: int, events_per_user: int, items: int, seed: int = 0) -> None:
    """Taobao-layout rows: every user ``events_per_user`` events over 9 days, 90% pv."""
    rng = np.random.default_rng(seed)
    n = users * events_per_user
    user = np.repeat(np.arange(1, users + 1), events_per_user)
    item = rng.integers(1, items + 1, n)
    behavior = rng.choice(np.array(["pv", "cart", "fav", "buy"]), n, p=[0.9, 0.04, 0.03, 0.03])
    time_ = rng.integers(1511539200, 1512316800, n)
    lines = (f"{u},{i},{i % 100 + 1},{b},{t}" for u, i, b, t in zip(user, item, behavior, time_))
    path.write_text("\n".join(lines) + "\n")


def trainer(model: LongSeqCTR):
    train = shard(LongSeqCTRTrain(model), torch.device("cpu"), "auto", sparse_lr=0.05)
    dense = dense_optimizer(train, lr=1e-3)
    schemas = [m.schema for m in model.sequence_arch.sequences.values()]

    def step(batch) -> None:
        check_batch(batch, model.table_rows, schemas)
        loss, _ = train(batch)
        loss.backward()
        dense.step()
        dense.zero_grad()
    return step


def timed(step, stream: Iterator, steps: int, warmup: int, batch_size: int) -> Dict[str, float]:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(next(stream))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"samples_per_sec": steps * batch_size / sum(times),
            "ms_per_step_median": 1000 * float(np.median(times))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--events-per-user", type=int, default=1500)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--max-seq-len", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--out", default="runs/store-training")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, store_dir = out / "events.csv", out / "store"
    if not (store_dir / "meta.json").exists():
        write_log(log, args.users, args.events_per_user, args.items)
        prepare(str(log), str(store_dir), mapping="taobao", target_behaviors=["pv"],
                sequences={"clicks": ["pv"]}, max_seq_len=args.max_seq_len,
                negatives_per_positive=1,
                num_shards=4, overwrite=True)
    store = SampleStore(store_dir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    init_distributed()
    config = ModelConfig(embedding_dim=16, k=50)

    def store_stream() -> Iterator:
        dataset = StoreBatches(StoreDataset(store, "train", args.batch_size, shuffle_seed=0))
        while True:
            yield from DataLoader(dataset, batch_size=None, num_workers=args.num_workers)

    rows: List[Dict] = []
    torch.manual_seed(0)
    step = trainer(build_store_model({"clicks": "eta"}, config, store))
    stream = store_stream()
    rows.append({"feed": "store", **timed(step, stream, args.steps, args.warmup,
                                           args.batch_size)})
    preloaded = iter([next(stream) for _ in range(args.warmup + args.steps)])
    rows.append({"feed": "preloaded", **timed(step, preloaded, args.steps, args.warmup,
                                               args.batch_size)})
    data = SyntheticConfig(max_seq_len=args.max_seq_len)
    torch.manual_seed(0)
    step = trainer(build_model("eta", config, data.table_sizes))
    synthetic = iter(DataLoader(SyntheticLifelongSequences(data, "train", args.batch_size),
                                batch_size=None, num_workers=args.num_workers))
    rows.append({"feed": "synthetic", **timed(step, synthetic, args.steps, args.warmup,
                                               args.batch_size)})
    behaviors = store.sequence("clicks")["item"].shape[0]
    lengths = np.concatenate([
        store.shard(s)["history/clicks/end"][:] - store.shard(s)["history/clicks/start"][:]
        for s in range(store.num_shards)])
    print(f"store: {store.num_samples('train')} train samples, {behaviors} behaviors, history "
          f"length mean {lengths.mean():.0f}, max {lengths.max()}; batch {args.batch_size}, "
          f"{args.num_workers} worker(s), {torch.get_num_threads()} threads")
    print("| feed | samples/s | ms per step (median) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['feed']} | {row['samples_per_sec']:.0f} | {row['ms_per_step_median']:.1f} |")
    ratio = rows[0]["samples_per_sec"] / rows[1]["samples_per_sec"]
    print(f"store / preloaded: {ratio:.3f}")
    (out / "store_training.json").write_text(json.dumps(
        {"commit": source_commit(), "args": vars(args), "rows": rows,
         "store_over_preloaded": ratio, "mean_length": float(lengths.mean())}, indent=2))


if __name__ == "__main__":
    main()
