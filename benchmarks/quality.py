"""Quality table: test AUC / GAUC / log loss of every model next to the oracle's, per regime.

Runs ``python -m torchrec_longseq.train`` on ``--nproc`` ranks for each (regime, model,
max_seq_len, seed), reads each run's ``metrics.json``, and prints a markdown table (mean +- std
over seeds), also written to ``OUT/quality.md`` and ``OUT/quality.json``::

    .venv/bin/python benchmarks/quality.py --max-seq-len 2000 --seeds 0 --steps 800 \\
        --out runs/quality

``--regime`` picks the synthetic data's label rule (``data.synthetic``): ``category`` (relevance
is old behaviors of the candidate's category), ``similarity`` (item similarity to old behaviors,
coarse categories), or both (the default). Every row also shows the oracle: the generator's true
logit scored on the same test samples (the ``--eval-batches`` x ``--nproc`` test batches the runs
are tested on), the best AUC and GAUC any model can reach there; ``OUT/oracle.json`` keeps it.
``--models`` defaults to every model (``MODELS``); ``-- FLAGS`` passes more flags to every
training run (e.g. ``-- --eval-every 100 --early-stop 3``). One (L = 1,000, 600 steps, one rank)
sweep of both regimes took 17 minutes on 2 shared cores (docs/fidelity.md).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch

from torchrec_longseq.data.synthetic import REGIMES, SyntheticConfig, SyntheticGenerator
from torchrec_longseq.metrics import grouped_auc
from torchrec_longseq.models.longseq_ctr import MODELS


def run(regime: str, model: str, max_seq_len: int, seed: int, args: argparse.Namespace) -> Dict:
    out = Path(args.out) / regime / f"{model}-L{max_seq_len}-s{seed}"
    metrics = out / "metrics.json"
    if not (args.reuse and metrics.exists()):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", "-m", "torchrec_longseq.train",
               "--model", model, "--regime", regime, "--max-seq-len", str(max_seq_len),
               "--seed", str(seed), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--eval-every", "0", "--eval-batches", str(args.eval_batches),
               "--out", str(out), *(["--gsu-overlap"] if model == "twin" else []), *args.extra]
        print(" ".join(cmd), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.txt", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(metrics.read_text())


def oracle(regime: str, max_seq_len: int, seed: int, args: argparse.Namespace) -> Dict:
    """AUC, GAUC (by user) and log loss of the generator's true logit on the test batches the
    runs are tested on: global batches ``0 .. eval_batches * nproc - 1`` of ``batch_size``
    (rank ``r`` of ``n`` reads ``i * n + r``)."""
    generator = SyntheticGenerator(SyntheticConfig(seed=seed, max_seq_len=max_seq_len,
                                                   regime=regime))
    users, logits, labels = [], [], []
    for index in range(args.eval_batches * args.nproc):
        batch, logit = generator.batch_with_oracle("test", index, args.batch_size)
        users.append(batch.user_ids)
        logits.append(logit)
        labels.append(batch.labels)
    u, x, y = torch.cat(users), torch.cat(logits), torch.cat(labels).double()
    everyone = torch.zeros_like(u)  # one group: the plain AUC, ties one half
    logloss = torch.nn.functional.binary_cross_entropy_with_logits(x, y)
    return {"regime": regime, "model": "oracle", "max_seq_len": max_seq_len, "seed": seed,
            "auc": float(grouped_auc(everyone, x, y)), "gauc": float(grouped_auc(u, x, y)),
            "logloss": float(logloss)}


def summary(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--regime", nargs="+", choices=list(REGIMES), default=list(REGIMES))
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

    rows, raw, oracles = [], [], []
    for regime in args.regime:
        for max_seq_len in args.max_seq_len:
            best = [oracle(regime, max_seq_len, seed, args) for seed in args.seeds]
            oracles += best
            o_auc, o_gauc = summary([o["auc"] for o in best]), summary([o["gauc"] for o in best])
            rows.append(f"| {regime} | oracle | {max_seq_len} | {len(best)} | {o_auc} | {o_gauc} | "
                        f"{summary([o['logloss'] for o in best])} | | | | |")
            for model in args.models:
                results = [run(regime, model, max_seq_len, seed, args) for seed in args.seeds]
                raw += results
                recall = [r["recall"] for r in results if "recall" in r]
                rows.append(
                    f"| {regime} | {model} | {max_seq_len} | {len(results)} | "
                    + " | ".join(summary([r[k] for r in results]) for k in ("auc", "gauc", "logloss"))
                    + f" | {o_auc} | {o_gauc}"
                    + (f" | {statistics.mean(recall):.3f}" if recall else " |")
                    + f" | {statistics.mean(r['samples_per_sec'] for r in results):.0f} |"
                )
    table = "\n".join(
        ["| regime | model | max L | seeds | test AUC | test GAUC | test log loss | oracle AUC | "
         f"oracle GAUC | recall@k | train samples/s ({args.nproc} ranks) |",
         "|---|---|---|---|---|---|---|---|---|---|---|", *rows]
    )
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(table + "\n")
    (out / "quality.json").write_text(json.dumps(raw, indent=2))
    (out / "oracle.json").write_text(json.dumps(oracles, indent=2))


if __name__ == "__main__":
    main()
