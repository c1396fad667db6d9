"""Test AUC against history length: reads ``quality.json`` files written by ``quality.py``.

One line per model (mean over seeds, error bars = standard deviation), x = max L on a log axis::

    .venv/bin/python benchmarks/plot_quality.py runs/q-L1k/quality.json runs/q-L2k/quality.json \\
        runs/q-L10k/quality.json --out benchmarks/auc_vs_length.png
"""

import argparse
import json
import statistics
from collections import defaultdict
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="quality.json files")
    p.add_argument("--metric", default="auc")
    p.add_argument("--out", default="benchmarks/auc_vs_length.png")
    args = p.parse_args()
    values: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    for path in args.inputs:
        for run in json.loads(open(path).read()):
            values[run["model"]][run["max_seq_len"]].append(run[args.metric])
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, by_length in values.items():
        points: List[Tuple[int, float, float]] = [
            (length, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
            for length, v in sorted(by_length.items())]
        ax.errorbar([x for x, _, _ in points], [m for _, m, _ in points],
                    yerr=[s for _, _, s in points], marker="o", capsize=3, label=model)
    ax.set_xscale("log")
    ax.set_xlabel("max history length L")
    ax.set_ylabel(f"test {args.metric.upper()}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
