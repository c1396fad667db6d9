"""Retrieval alone: cost per candidate against history length, forward only, one process.

Every candidate has its own history of exactly L behaviors (the synthetic generator's, as in
``benchmarks/throughput.py``); at most ``--max-behaviors`` behaviors per call, so long histories
get fewer than ``--batch-size`` candidates (the table says how many). Timed, per call:

* ``hard``: SIM's hard search on category ids (``retrieval.hard.hard_search`` with
  ``--kernel``: on CPU its compiled kernel, on CUDA its Triton kernel); ``hard torch ops``: the
  same with ``kernel="torch"`` (its torch-ops path).
* ``simhash kernel``: ETA's Hamming top-k read from the per-item and per-category signature
  tables by id (``modules.eta.signature_topk`` with ``--kernel``: the compiled one-pass CPU
  kernel, or on CUDA the Triton kernel).
* ``simhash torch ops``: the same top-k in torch ops (the signatures gathered from the tables,
  ``retrieval.simhash.simhash_topk``, what ``signature_topk`` runs with ``kernel="torch"``).
* ``full attention``: no retrieval, what ``din-full`` does instead: the L behaviors' item and
  category embeddings gathered from the tables (``2 d`` wide) and
  ``modules.attention.TargetAttention`` over all of them (with ``--kernel``: the attention
  kernel, compiled on CPU, Triton on CUDA); ``full attention torch ops``: the same with
  ``kernel="torch"``.

The retrievals keep ``k``; the signatures are SimHash of random tables (``m`` bits per block).
Each method runs once untimed, then ``--repeats`` times; the table and the plot give the
fastest call (the CPU is shared: the fastest is the least disturbed), the JSON also the median,
in microseconds per candidate. ``--device cuda`` runs everything on the GPU, each call ending
with ``torch.cuda.synchronize``: the kernel rows are then the Triton kernels against the torch
ops (``--kernel compiled`` makes a missing triton an error instead of timing the torch ops
twice; the kernels' Python wrappers read one size on the host per search, a sync included in
the times). ``same_results``: the kernels select exactly what the torch ops select, and the
attentions agree to float32 rounding. Prints a markdown table, writes
``OUT/retrieval.json`` and
``OUT/retrieval.png`` (log-log). On a CPU shared with other jobs use ``--threads 1`` (see ``fuxictr_anchor.py``)::

    .venv/bin/python benchmarks/retrieval.py --lengths 100 1000 10000 100000 --batch-size 64 \\
        --embedding-dim 64 --hash-bits 64 --k 50 --repeats 5 --threads 1

On a GPU (Triton against the torch ops)::

    .venv/bin/python benchmarks/retrieval.py --device cuda --kernel compiled \\
        --lengths 100 1000 10000 100000 --batch-size 64 --repeats 20 --out runs/retrieval-cuda
"""

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM
from torchrec_longseq.modules.attention import TargetAttention
from torchrec_longseq.modules.eta import signature_topk
from torchrec_longseq.retrieval import simhash
from torchrec_longseq.retrieval.hard import hard_search
from torchrec_longseq.retrieval.kernels import KERNELS, set_kernel
from runinfo import source_commit

METHODS = ["hard", "hard torch ops", "simhash kernel", "simhash torch ops", "full attention",
           "full attention torch ops"]


def seconds(fn: Callable[[], object], repeats: int, device: str = "cpu") -> List[float]:
    """Wall time of ``repeats`` calls of ``fn`` after one untimed call (the kernels' first load);
    on CUDA each call waits for the GPU."""
    def call() -> None:
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def measure(length: int, args: argparse.Namespace) -> Dict[str, object]:
    batch_size = max(1, min(args.batch_size, args.max_behaviors // length))
    data = SyntheticConfig(seed=0, max_seq_len=length, min_seq_len=length)
    f = SyntheticGenerator(data).batch("train", 0, batch_size).features
    items, categories = f[HIST_ITEM].values(), f[HIST_CATEGORY].values()
    offsets = f[HIST_ITEM].offsets()
    target_items, target_categories = f[TARGET_ITEM].values(), f[TARGET_CATEGORY].values()

    torch.manual_seed(0)
    d, k = args.embedding_dim, args.k
    item_emb = torch.randn(data.table_sizes[HIST_ITEM], d)
    category_emb = torch.randn(data.table_sizes[HIST_CATEGORY], d)
    item_sig = simhash.SimHash(d, args.hash_bits, seed=0)(item_emb)  # [items, W] int64
    category_sig = simhash.SimHash(d, args.hash_bits, seed=1)(category_emb)
    attention = TargetAttention(2 * d, 2 * d, args.heads, args.head_dim).to(args.device)
    items, categories, offsets, target_items, target_categories = (t.to(args.device) for t in (
        items, categories, offsets, target_items, target_categories))
    item_emb, category_emb, item_sig, category_sig = (t.to(args.device) for t in (
        item_emb, category_emb, item_sig, category_sig))

    def kernel() -> Tuple[torch.Tensor, torch.Tensor]:
        return signature_topk([item_sig, category_sig], [items, categories],
                              [target_items, target_categories], offsets, k, args.kernel)

    def torch_ops() -> Tuple[torch.Tensor, torch.Tensor]:
        history = torch.cat([item_sig[items], category_sig[categories]], dim=1)
        targets = torch.cat([item_sig[target_items], category_sig[target_categories]], dim=1)
        return simhash.simhash_topk(history, offsets, targets, k)

    def hard() -> Tuple[torch.Tensor, torch.Tensor]:
        return hard_search(categories, offsets, target_categories, k, kernel=args.kernel)

    def hard_torch_ops() -> Tuple[torch.Tensor, torch.Tensor]:
        return hard_search(categories, offsets, target_categories, k, kernel="torch")

    def full_attention(kernel: str = args.kernel) -> torch.Tensor:
        query = torch.cat([item_emb[target_items], category_emb[target_categories]], dim=1)
        keys = torch.cat([item_emb[items], category_emb[categories]], dim=1)  # [B L, 2 d]
        return set_kernel(attention, kernel)(query, keys, offsets)

    def full_attention_torch_ops() -> torch.Tensor:
        return full_attention("torch")

    fns = {"hard": hard, "hard torch ops": hard_torch_ops, "simhash kernel": kernel,
           "simhash torch ops": torch_ops, "full attention": full_attention,
           "full attention torch ops": full_attention_torch_ops}
    row: Dict[str, object] = {"L": length, "candidates": batch_size}
    for name, fn in fns.items():
        times = [1e6 * t / batch_size  # us per candidate
                 for t in seconds(fn, args.repeats, args.device)]
        row[name], row[f"{name} median"] = min(times), statistics.median(times)
    # the kernels return what the torch ops return (the attention to float32 rounding)
    pairs = ((kernel, torch_ops), (hard, hard_torch_ops))
    row["same_results"] = all(torch.equal(a, b) for fast, slow in pairs
                              for a, b in zip(fast(), slow())) and torch.allclose(
        full_attention(), full_attention_torch_ops(), atol=1e-5, rtol=1e-4)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-behaviors", type=int, default=3_200_000,
                   help="at most this many behaviors per call (fewer candidates at long L)")
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--hash-bits", type=int, default=64)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: every method on the GPU")
    p.add_argument("--kernel", default="auto", choices=KERNELS,
                   help="the kernel rows' kernel (retrieval.kernels.KERNELS): auto, compiled "
                        "(an error where none runs: no C++ build on CPU, no triton on CUDA), "
                        "or torch")
    p.add_argument("--out", default="runs/retrieval")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print("microseconds per candidate (fastest of --repeats calls, forward, no grad)\n")
    print(f"| L | candidates | {' | '.join(METHODS)} | full attention / kernel |")
    print("|---|---|" + "---|" * (len(METHODS) + 1))
    results: List[Dict[str, object]] = []
    for length in args.lengths:
        r = measure(length, args)
        results.append(r)
        cells = " | ".join(f"{r[m]:.2f}" for m in METHODS)
        print(f"| {length:,} | {r['candidates']} | {cells} | "
              f"{r['full attention'] / r['simhash kernel']:.0f}x |", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(
        {"args": vars(args), "commit": source_commit(), "unit": "microseconds per candidate",
         "results": results}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        ax.plot([r["L"] for r in results], [r[m] for r in results], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("history length L")
    ax.set_ylabel("µs per candidate (forward, no grad)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=120)


if __name__ == "__main__":
    main()
