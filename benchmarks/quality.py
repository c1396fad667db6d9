"""Quality table: test AUC / GAUC / log loss of every model, launched with torchrun.

Runs ``python -m torchrec_longseq.train`` on 2 ranks for each (model, max_seq_len, seed), reads
each run's ``metrics.json``, and prints a markdown table (mean +- std over seeds), also written
to ``OUT/quality.md`` and ``OUT/quality.json``::

    .venv/bin/python benchmarks/quality.py --max-seq-len 2000 --seeds 0 --steps 800 \
        --out runs/quality

``--models`` defaults to every model (``MODELS``).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from torchrec_longseq.models.longseq_ctr import MODELS


def run(model: str, max_seq_len: int, seed: int, args: argparse.Namespace) -> Dict:
    out = Path(args.out) / f"{model}-L{max_seq_len}-s{seed}"
    metrics = out / "metrics.json"
    if not (args.reuse and metrics.exists()):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", "-m", "torchrec_longseq.train",
               "--model", model, "--max-seq-len", str(max_seq_len), "--seed", str(seed),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--eval-every", "0", "--eval-batches", str(args.eval_batches),
               "--out", str(out), *(["--gsu-overlap"] if model == "twin" else []), *args.extra]
        print(" ".join(cmd), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.txt", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(metrics.read_text())


def summary(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--max-seq-len", type=int, nargs="+", default=[2000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs' metrics.json")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more train flags")
    args = p.parse_args()
    args.extra = [a for a in args.extra if a != "--"]

    rows, raw = [], []
    for max_seq_len in args.max_seq_len:
        for model in args.models:
            results = [run(model, max_seq_len, seed, args) for seed in args.seeds]
            raw += results
            recall = [r["recall"] for r in results if "recall" in r]
            rows.append(
                f"| {model} | {max_seq_len} | {len(results)} | "
                + " | ".join(summary([r[k] for r in results]) for k in ("auc", "gauc", "logloss"))
                + (f" | {statistics.mean(recall):.3f}" if recall else " |")
                + f" | {statistics.mean(r['samples_per_sec'] for r in results):.0f} |"
            )
    table = "\n".join(
        ["| model | max L | seeds | test AUC | test GAUC | test log loss | recall@k | "
         "train samples/s (2 ranks) |", "|---|---|---|---|---|---|---|---|", *rows]
    )
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(table + "\n")
    (out / "quality.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
