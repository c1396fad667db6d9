"""Speed and peak memory of ``torchrec_longseq.data.prepare`` on a Taobao-layout log.

Generates (vectorised numpy, seeded) a UserBehavior-style CSV - ``user_id, item_id, category_id,
behavior_type, timestamp``, no header - with ``--events`` rows (default 10,000,000) in a temp
dir: per-user lengths long-tailed (lognormal, clipped to ``[1, --max-user-len]`` = 20,000),
items head-heavy (a power law) over ``events / 3`` ids with a fixed category each, behavior types ``pv / cart /
fav / buy`` at 89 / 5.5 / 3.5 / 2 %, timestamps over 9 days, rows in global time order (users
interleaved, as a log is written). Then runs ``prepare`` in a fresh process per configuration
and reports wall time (events/s, import excluded) and the process's peak resident memory
(``VmHWM``, the high-water mark of its resident set, read at the end - like
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` but without the parent's peak, which Linux carries
across ``exec``; it includes the interpreter and the package's imports (``torchrec_longseq.data``
imports torch and torchrec), whose RSS is printed too)::

    .venv/bin/python benchmarks/prepare.py                  # 10M events
    .venv/bin/python benchmarks/prepare.py --events 1000000 # a quick run

Configurations: ``buy-neg1`` (targets: cart/fav/buy events, 1 sampled negative each, sequences
``clicks = pv`` and ``carts = cart, fav, buy``) and ``all-targets`` (every event a positive
target, one sequence of all events, no negatives); both with ``max_seq_len`` 10,000, 8 shards,
7 / 1 / 1 days of train / val / test. The machine's load shows in the wall time: the table also
gives the CPU seconds (user, system) of the run.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

CONFIGS: Dict[str, Dict[str, object]] = {
    "buy-neg1": dict(
        target_behaviors=["cart", "fav", "buy"], negatives_per_positive=1,
        sequences={"clicks": ["pv"], "carts": ["cart", "fav", "buy"]},
        max_seq_len=10_000, num_shards=8,
    ),
    "all-targets": dict(sequences={"history": None}, max_seq_len=10_000, num_shards=8),
}
T0 = 1_511_539_200  # 2017-11-25, the Taobao file's first day
DAYS = 9


def generate(path: str, events: int, max_user_len: int, seed: int = 0) -> Dict[str, int]:
    """Write the synthetic log to ``path``; returns its sizes."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(60), 1.4, size=events // 20 + 1), 1, max_user_len).astype(np.int64)
    cum = np.cumsum(lengths)
    users = int(np.searchsorted(cum, events)) + 1
    lengths = lengths[:users]
    lengths[-1] -= int(cum[users - 1]) - events
    user = np.repeat(rng.permutation(np.arange(1, 3 * users, 3))[:users], lengths)
    num_items = max(events // 3, 10)
    item = (num_items * rng.power(0.35, size=events)).astype(np.int64) * 7 + 1  # head-heavy, sparse ids
    category = (item * 2654435761 % 9_439) + 1
    behavior = rng.choice(np.array(["pv", "cart", "fav", "buy"]), size=events, p=[0.89, 0.055, 0.035, 0.02])
    timestamp = T0 + rng.integers(0, DAYS * 86_400, size=events)
    order = np.argsort(timestamp, kind="stable")
    table = pa.table({
        "user_id": user[order], "item_id": item[order], "category_id": category[order],
        "behavior_type": behavior[order], "timestamp": timestamp[order],
    })
    pacsv.write_csv(table, path, write_options=pacsv.WriteOptions(include_header=False))
    return {"events": events, "users": users, "max_user_len": int(lengths.max()),
            "distinct_items": int(np.unique(item).size), "bytes": os.path.getsize(path)}


def peak_rss_kb() -> int:
    """This process's peak resident set (KiB): ``VmHWM`` of ``/proc/self/status`` (the address
    space's own high-water mark; ``ru_maxrss`` on Linux also keeps the parent's peak across
    ``fork`` + ``exec``), ``ru_maxrss`` where there is no ``/proc``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(path: str, out: str, config: str) -> None:
    """Run in a fresh process: import, prepare, print one JSON line."""
    from torchrec_longseq.data.prepare import prepare

    rss_import = peak_rss_kb()
    opts = dict(CONFIGS[config])
    cpu0 = os.times()
    start = time.perf_counter()
    meta = prepare(path, out, mapping="taobao", train_end=T0 + 7 * 86_400, val_end=T0 + 8 * 86_400,
                   verbose=False, overwrite=True, **opts)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    cpu1 = os.times()
    peak = peak_rss_kb()
    counts = meta["counts"]
    print(json.dumps({
        "config": config, "seconds": seconds, "events": counts["events"],
        "samples": sum(counts["samples"].values()), "peak_kb": peak, "import_kb": rss_import,
        "user_s": cpu1.user - cpu0.user, "sys_s": cpu1.system - cpu0.system,
        "timings": meta["timings_s"], "cpu": meta["cpu_s"],
    }))


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--max-user-len", type=int, default=20_000)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--keep", help="directory to generate into and keep (default: a temp dir)")
    p.add_argument("--child", nargs=3, metavar=("CSV", "OUT", "CONFIG"), help=argparse.SUPPRESS)
    p.add_argument("--generate", nargs=3, metavar=("CSV", "EVENTS", "MAXLEN"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.generate:  # in its own process, so that its memory is not in the parent's
        print(json.dumps(generate(a.generate[0], int(a.generate[1]), int(a.generate[2]))))
        return
    if a.child:
        child(*a.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = a.keep or tmp
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, "UserBehavior.csv")
        start = time.perf_counter()
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--generate", path, str(a.events),
                              str(a.max_user_len)], check=True, capture_output=True, text=True)
        info = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"generated {info['events']:,} events, {info['users']:,} users (longest {info['max_user_len']:,}), "
              f"{info['distinct_items']:,} items, {info['bytes'] / 2**20:.0f} MiB CSV in {time.perf_counter() - start:.1f}s")
        rows = []
        for config in a.configs:
            out = os.path.join(root, f"store-{config}")
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, out, config],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print()
        print(f"{'config':<12} {'events':>11} {'samples':>11} {'wall s':>7} {'events/s':>11} {'user s':>7} "
              f"{'sys s':>6} {'peak RSS':>9} {'after import':>12}")
        for r in rows:
            print(f"{r['config']:<12} {r['events']:>11,} {r['samples']:>11,} {r['seconds']:>7.2f} "
                  f"{r['events'] / r['seconds']:>11,.0f} {r['user_s']:>7.2f} {r['sys_s']:>6.2f} "
                  f"{r['peak_kb'] / 2**20:>7.2f}GB {r['import_kb'] / 2**20:>10.2f}GB")
        for r in rows:
            print(f"  {r['config']} wall s per stage: {r['timings']}")
            print(f"  {r['config']} (user, sys) s per stage: {r['cpu']}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"data": info, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
