"""Train on the public Taobao UserBehavior log: prepare a sample store, then torchrun.

The data: Alibaba's "User Behavior Data from Taobao for Recommendation" (Tianchi data set 649,
``UserBehavior.csv``: about 100 million rows ``user_id,item_id,category_id,behavior_type,
timestamp`` for 2017-11-25 to 2017-12-03, no header, behavior_type in pv / cart / fav / buy).
Download it from the Tianchi page of the data set (an account is needed), unzip it, then::

    .venv/bin/python examples/taobao_user_behavior.py --file UserBehavior.csv --out runs/taobao
    .venv/bin/torchrun --standalone --nproc_per_node=2 -m torchrec_longseq.train \
        --config examples/taobao.yaml --data runs/taobao --out runs/taobao-eta

Without the file, ``--demo N`` writes a made-up log of N rows in the same layout first, to
``OUT-demo.csv`` (to try the commands; what it learns means nothing).

What the store holds (``prepare``'s arguments below): the targets are the purchases, each with
one negative item the user had not interacted with before it (seeded sampling); every sample's
history is the user's clicks (``pv``) and, as a second sequence, the user's cart / fav / buy
events, each strictly before the target and at most ``--max-seq-len`` long; ids are remapped to
dense rows (the mapping is saved in the store for serving); samples before 2017-12-02 (Beijing
time) train, 2017-12-02 validates, 2017-12-03 tests.
"""

import argparse
import os
from typing import List, Optional

import numpy as np

from torchrec_longseq.data.prepare import prepare

TRAIN_END = 1512144000  # 2017-12-02 00:00 UTC+8
VAL_END = 1512230400  # 2017-12-03 00:00 UTC+8
SEQUENCES = {"clicks": ["pv"], "buys": ["cart", "fav", "buy"]}


def write_demo_log(path: str, rows: int, users: int = 200, items: int = 2000,
                   categories: int = 50, seed: int = 0) -> str:
    """A made-up log in the UserBehavior layout (no header): ``rows`` events of ``users`` users
    over the data set's 9 days, 85% pv, items in fixed categories."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    user = rng.integers(1, users + 1, rows)
    item = rng.integers(1, items + 1, rows)
    category = item % categories + 1
    behavior = rng.choice(np.array(["pv", "cart", "fav", "buy"]), rows, p=[0.85, 0.06, 0.04, 0.05])
    time = rng.integers(1511539200, 1512316800, rows)  # 2017-11-25 .. 2017-12-03 (UTC+8)
    with open(path, "w") as f:
        f.write("\n".join(f"{u},{i},{c},{b},{t}" for u, i, c, b, t in
                          zip(user, item, category, behavior, time)) + "\n")
    return path


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--file", help="UserBehavior.csv")
    p.add_argument("--demo", type=int, default=0, help="write a made-up log of N rows and use it")
    p.add_argument("--out", required=True, help="the sample store to write")
    p.add_argument("--max-seq-len", type=int, default=1000)
    p.add_argument("--num-shards", type=int, default=16)
    args = p.parse_args(argv)
    if bool(args.file) == bool(args.demo):
        p.error("give --file UserBehavior.csv or --demo N")
    path = args.file or write_demo_log(args.out.rstrip("/") + "-demo.csv", args.demo)
    prepare(path, args.out, mapping="taobao", target_behaviors=["buy"], sequences=SEQUENCES,
            max_seq_len=args.max_seq_len, negatives_per_positive=1, train_end=TRAIN_END,
            val_end=VAL_END, num_shards=args.num_shards, overwrite=True)


if __name__ == "__main__":
    main()
