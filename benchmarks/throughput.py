"""Training cost per sample and peak memory against history length, every model.

Batches are pre-generated (fixed length L for every sample) so only the model's work is timed,
on the training path of ``torchrec_longseq.train`` with one rank: DistributedModelParallel
tables with the fused row-wise Adagrad in backward, Adam on dense parameters, and the refresh of
the derived per-item tables (ETA, SDIM, TWIN). Every (model, L) runs in a fresh process with an
address-space limit (``--memory-gib``), so its peak RSS is its own and a run that does not fit
says so. Prints a markdown table of ms per sample, samples/s, the cost ratio of each length to
L = 1,000 and the peak RSS, and writes ``OUT/throughput.json`` and ``OUT/throughput.png``
(samples/s against L, log axes)::

    .venv/bin/python benchmarks/throughput.py --lengths 100 1000 10000 100000 --threads 1
"""

import argparse
import json
import os
import resource
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.batch import Batch

from torchrec_longseq.models.longseq_ctr import (
    MODELS,
    LongSeqCTR,
    LongSeqCTRTrain,
    ModelConfig,
    build_model,
)
from torchrec_longseq.train import dense_optimizer, init_distributed, shard
from runinfo import source_commit


def synthetic_batches(length: int, batch_size: int, count: int,
                      cache: str = "") -> Tuple[SyntheticConfig, List[Batch]]:
    """``count`` training batches in which every sample has exactly ``length`` behaviors, kept in
    ``cache`` (a directory; "" for none) so that every model's run reads the same ones."""
    data = SyntheticConfig(seed=0, max_seq_len=length, min_seq_len=length)
    path = Path(cache) / f"batches-L{length}-B{batch_size}-n{count}.pt" if cache else None
    if path is not None and path.exists():
        return data, torch.load(path, weights_only=False)
    generator = SyntheticGenerator(data)
    batches = [generator.batch("train", i, batch_size) for i in range(count)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(batches, path)
    return data, batches


def time_steps(step: Callable[[int, Batch], None], batches: List[Batch], warmup: int) -> List[float]:
    """Seconds of each ``step(i, batch)`` (i from 1) after the first ``warmup`` batches."""
    times = []
    for i, batch in enumerate(batches, start=1):
        start = time.perf_counter()
        step(i, batch)
        if i > warmup:
            times.append(time.perf_counter() - start)
    return times


def train_step(model_name: str, data: SyntheticConfig,
               args: argparse.Namespace) -> Callable[[int, Batch], None]:
    """One training step of ``model_name`` on the path of train.py with one rank: DMP, fused
    sparse row-wise Adagrad in backward, Adam on dense parameters, refresh of derived tables
    (needs ``init_distributed()`` first)."""
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=args.embedding_dim, k=args.k, hash_bits=args.hash_bits,
                         short_window=0 if getattr(args, "long_path_only", False) else 50)
    model = LongSeqCTRTrain(build_model(model_name, config, data.table_sizes))
    model = shard(model, torch.device("cpu"), "auto", sparse_lr=0.05)
    dense = dense_optimizer(model, lr=1e-3)
    ctr = next(m for m in model.modules() if isinstance(m, LongSeqCTR))
    ctr.refresh_derived_tables()

    def step(i: int, batch: Batch) -> None:
        loss, _ = model(batch)
        loss.backward()
        dense.step()
        dense.zero_grad()
        if ctr.sequence_arch is not None:  # the refresh the next forward would do, in this step
            ctr.sequence_arch.refresh_pending()

    return step


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(model_name: str, length: int, args: argparse.Namespace) -> Dict[str, float]:
    """Train ``model_name`` at ``length`` in this process (meant to be a fresh one, see ``main``)
    under an address-space limit of ``--memory-gib``: a run that needs more reports it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    limit = int(args.memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    row: Dict[str, float] = {"model": model_name, "L": length}
    try:
        with socket.socket() as sock:  # a free port for this process's one-rank gloo group
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        init_distributed()
        data, batches = synthetic_batches(length, args.batch_size, args.warmup + args.steps,
                                          cache=str(Path(args.out) / "batches"))
        times = time_steps(train_step(model_name, data, args), batches, args.warmup)
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        row["error"] = f"out of memory (> {args.memory_gib:g} GiB address space)"
        return row
    samples = args.steps * args.batch_size
    elapsed = sum(times)
    row.update({"ms_per_sample": 1000 * elapsed / samples, "samples_per_sec": samples / elapsed,
                "ms_per_sample_fastest_step": 1000 * min(times) / args.batch_size,
                "peak_rss_gib": peak_rss_gib()})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--hash-bits", type=int, default=64)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--memory-gib", type=float, default=20.0, help="address-space limit per run")
    p.add_argument("--out", default="runs/throughput")
    args = p.parse_args()

    results: List[Dict[str, float]] = []
    print("| model | L | ms / sample | samples/s | cost vs L = 1,000 | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|")
    for model_name in args.models:
        for length in args.lengths:
            # a fresh process per run: its own peak RSS and memory limit, nothing shared
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                r = pool.submit(measure, model_name, length, args).result()
            results.append(r)
            if "error" in r:
                print(f"| {model_name} | {length:,} | {r['error']} | | | |", flush=True)
                continue
            base = next((x for x in results if x["model"] == model_name and x["L"] == 1000
                         and "error" not in x), None)
            r["cost_vs_1000"] = r["ms_per_sample"] / base["ms_per_sample"] if base else None
            ratio = f"{r['cost_vs_1000']:.2f}x" if base else ""
            print(f"| {model_name} | {length:,} | {r['ms_per_sample']:.3f} | "
                  f"{r['samples_per_sec']:.0f} | {ratio} | {r['peak_rss_gib']:.2f} |", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(
        {"args": vars(args), "commit": source_commit(), "results": results}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for model_name in args.models:
            rows = [r for r in results if r["model"] == model_name and "error" not in r]
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
