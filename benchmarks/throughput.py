"""Training cost per sample against history length, every model, one process, one run.

Batches are pre-generated (fixed length L for every sample) so only the model's work is timed,
on the training path of ``torchrec_longseq.train`` with one rank: DistributedModelParallel
tables with the fused row-wise Adagrad in backward, Adam on dense parameters, and for ETA the
refresh of the touched signature rows. Prints a markdown table of ms per sample and samples/s,
and the cost ratio of each length to the first, and writes ``OUT/throughput.json`` and
``OUT/throughput.png`` (samples/s against L, log axes)::

    .venv/bin/python benchmarks/throughput.py --models eta sim-hard --lengths 1000 10000 \
        --batch-size 64 --embedding-dim 64 --hash-bits 64 --k 50
"""

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Dict, List

import torch

from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_longseq.models.longseq_ctr import LongSeqCTR, LongSeqCTRTrain, ModelConfig, build_model
from torchrec_longseq.train import init_distributed, shard


def measure(model_name: str, length: int, args: argparse.Namespace) -> Dict[str, float]:
    data = SyntheticConfig(seed=0, max_seq_len=length, min_seq_len=length)
    generator = SyntheticGenerator(data)
    batches = [generator.batch("train", i, args.batch_size) for i in range(args.warmup + args.steps)]
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=args.embedding_dim, k=args.k, hash_bits=args.hash_bits)
    model = LongSeqCTRTrain(build_model(model_name, config, data.table_sizes))
    # the training path of train.py: DMP (one rank), fused sparse row-wise Adagrad, Adam
    model = shard(model, torch.device("cpu"), "auto", sparse_lr=0.05)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=1e-3))
    ctr = next(m for m in model.modules() if isinstance(m, LongSeqCTR))
    ctr.refresh_derived_tables()
    elapsed = 0.0
    for step, batch in enumerate(batches, start=1):
        start = time.perf_counter()
        loss, _ = model(batch)
        loss.backward()
        dense.step()
        dense.zero_grad()
        ctr.refresh_derived_tables(step)
        if step > args.warmup:
            elapsed += time.perf_counter() - start
    samples = args.steps * args.batch_size
    return {"model": model_name, "L": length, "ms_per_sample": 1000 * elapsed / samples,
            "samples_per_sec": samples / elapsed,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["avgpool", "din", "din-full", "sim-hard",
                                                    "sim-soft", "eta"])
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--hash-bits", type=int, default=64)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="runs/throughput")
    args = p.parse_args()
    init_distributed()  # a one-rank gloo group, as `python -m torchrec_longseq.train` makes

    results: List[Dict[str, float]] = []
    print("| model | L | ms / sample | samples/s | cost vs first L |")
    print("|---|---|---|---|---|")
    for model_name in args.models:
        first = None
        for length in args.lengths:
            r = measure(model_name, length, args)
            first = first or r["ms_per_sample"]
            r["ratio_to_first"] = r["ms_per_sample"] / first
            results.append(r)
            print(f"| {model_name} | {length} | {r['ms_per_sample']:.3f} | {r['samples_per_sec']:.0f} "
                  f"| {r['ratio_to_first']:.2f}x |", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for model_name in args.models:
            rows = [r for r in results if r["model"] == model_name]
            ax.plot([r["L"] for r in rows], [r["samples_per_sec"] for r in rows], marker="o",
                    label=model_name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("history length L")
        ax.set_ylabel("training samples / s (1 process)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
