"""ETA training cost per sample, ours against FuxiCTR's ETA long-sequence path, in one run.

Ours is ``benchmarks/throughput.py``'s ``eta`` training step (DMP with one rank, fused row-wise
Adagrad on the tables, Adam on dense parameters, refresh of the touched signature rows). The
anchor is a training step of FuxiCTR's ``model_zoo/LongCTR/ETA/ETA.py`` on dense padded tensors:
plain ``nn.Embedding`` item and category tables (the sizes of ours), the padded history and the
candidate looked up as ``[B, L + 1, 2 d]``, FuxiCTR's ``topk_retrieval`` (float SimHash codes of
every behavior under a fixed random projection, ``|code - code_target|`` summed, ``topk``), its
``MultiHeadTargetAttention`` over the top k and over the last 49 behaviors (ETA's short-term
branch), user and hour embeddings, an MLP of our over-arch widths to a logit, BCE, backward,
FuxiCTR's ``clip_grad_norm_(10)`` and Adam on every parameter. Both see the same synthetic
batches (every sample has exactly L behaviors); the anchor's padded tensors are built outside the
timed region. The two run in two fresh processes that take turns in blocks of ``--turn-steps``
training steps (one waits while the other trains; both set up first), so that both see the same
phases of this CPU, whose speed moves by up to 2x over minutes; the first step of each block is
not timed (stepping one at a time would time ours with the caches FuxiCTR's 100+ MB step has
just evicted, which slows ours, many small ops, by 1.3-1.5x). ``--sequential`` runs ours, then
FuxiCTR (as before this option, and always with ``--ours-ranks 2``). The table gives the fastest
timed step (the fastest is the least disturbed), the JSON also the mean and the median. The peak RSS column is
each process's own (batches and the torch/torchrec import included).

``--ours-ranks 2`` trains ours the way ``torchrun`` runs it on this machine: 2 processes of 1
thread (DMP over a 2-rank gloo group, all-to-all lookups and gradient all-reduce included), each
with its own batch of ``--batch-size``; a step's time is the slower rank's, and per sample means
per sample of both batches. FuxiCTR, a single-process trainer, runs in one process with
``--threads`` threads (0: torch's default, both cores), so both use the whole machine.

``MultiHeadTargetAttention`` comes from the installed ``fuxictr`` (``requirements-bench.lock``),
loaded without running ``fuxictr/pytorch/layers/__init__.py``: that file imports
``fuxictr.preprocess``, which needs polars, ray[data], scikit-learn, h5py and PyYAML, none of
which the layer uses. ``topk_retrieval`` and ``lsh_hash`` are methods of FuxiCTR's ``ETA`` model
(importing it needs pandas and FuxiCTR's ``BaseModel``), so they are copied verbatim below and
checked at start against the installed ``model_zoo/LongCTR/ETA/ETA.py``.

FuxiCTR hashes the whole ``2 d``-wide behavior with ``--fuxi-hash-bits`` bits (default
``--hash-bits``); ours hashes the item and the category block with ``--hash-bits`` bits each.
Prints a markdown table and writes ``OUT/anchor.json``. On a CPU shared with other jobs use
``--threads 1``: with 2 intra-op threads on 2 busy cores every parallel op waits for a
descheduled thread, which slows ours (many small ops) far more than the anchor (few big ones)::

    .venv/bin/pip install --no-deps -r requirements-bench.lock
    .venv/bin/python benchmarks/fuxictr_anchor.py --lengths 1000 10000 --batch-size 64 \\
        --embedding-dim 64 --hash-bits 64 --k 50 --steps 20 --warmup 3 --threads 1
"""

import argparse
import ast
import json
import os
import queue
import socket
import statistics
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from runinfo import keep_freed_memory_mapped, source_commit
from throughput import peak_rss_gib, synthetic_batches, time_steps, train_step
from torchrec_longseq.data.batch import (CONTEXT_HOUR, HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY,
                                         TARGET_ITEM, USER_ID, Batch)
from torchrec_longseq.models.longseq_ctr import ModelConfig
from torchrec_longseq.modules.attention import mlp
from torchrec_longseq.train import init_distributed


def fuxictr_target_attention() -> type:
    """FuxiCTR's ``MultiHeadTargetAttention`` from the installed package, importing only its own
    module chain (torch, numpy): the two package ``__init__`` files on the way are replaced by
    empty packages over the same directories."""
    import fuxictr.pytorch

    layers = Path(fuxictr.pytorch.__file__).parent / "layers"
    for name, path in (("fuxictr.pytorch.layers", layers), ("fuxictr.pytorch.layers.blocks",
                                                            layers / "blocks")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    from fuxictr.pytorch.layers.attentions.target_attention import MultiHeadTargetAttention

    return MultiHeadTargetAttention


class FuxiRetrieval:
    """The two methods of FuxiCTR's ETA that retrieve the top k, copied verbatim (docstrings
    left out) from fuxictr 2.3.10, ``model_zoo/LongCTR/ETA/ETA.py`` (class ``ETA``),
    https://github.com/reczoo/FuxiCTR/blob/main/model_zoo/LongCTR/ETA/ETA.py,
    Copyright (C) 2025 The FuxiCTR Library, (C) 2022 Huawei Technologies Co., Ltd.,
    Apache License 2.0 (http://www.apache.org/licenses/LICENSE-2.0)."""

    reuse_hash: bool
    hash_bits: int

    # ---- verbatim from FuxiCTR (Apache-2.0) ----
    def topk_retrieval(self, random_rotations, target_item, history_sequence, mask, topk=5):
        if self.reuse_hash:
            random_rotations = random_rotations.repeat(target_item.size(0), 1, 1)
        else:
            random_rotations = torch.randn(
                target_item.size(0), target_item.size(1), self.hash_bits,
                device=target_item.device
            )
        sequence_hash = self.lsh_hash(history_sequence, random_rotations)
        target_hash = self.lsh_hash(target_item.unsqueeze(1), random_rotations)
        hash_dis = torch.abs(sequence_hash - target_hash).sum(dim=-1)
        hash_dis = hash_dis.masked_fill_(mask.float() == 0, 1 + self.hash_bits)
        topk = min(topk, hash_dis.shape[1]) # make sure input seq_len >= topk
        topk_index = hash_dis.topk(topk, dim=1, largest=False, sorted=True)[1]
        topk_emb = torch.gather(history_sequence, 1,
                                topk_index.unsqueeze(-1).expand(-1, -1, history_sequence.shape[-1]))
        topk_mask = torch.gather(mask, 1, topk_index)
        return topk_emb, topk_mask

    def lsh_hash(self, vecs, random_rotations):
        rotated_vecs = torch.einsum("bld,bdh->blh", vecs, random_rotations).unsqueeze(-1)
        rotated_vecs = torch.cat([-rotated_vecs, rotated_vecs], dim=-1)
        hash_code = torch.argmax(rotated_vecs, dim=-1).float()
        return hash_code
    # ---- end of the verbatim copy ----


def check_verbatim() -> str:
    """Compare the copy above with the installed ``model_zoo/LongCTR/ETA/ETA.py`` (ASTs without
    docstrings); returns a line saying whether they match."""
    import importlib.util

    def methods(source: str, cls: str) -> List[str]:
        tree = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls)
        found = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in ("topk_retrieval", "lsh_hash"):
                if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                    node.body = node.body[1:]
                found.append(ast.dump(node))
        return found

    spec = importlib.util.find_spec("model_zoo")
    if spec is None or not spec.submodule_search_locations:
        return "installed fuxictr has no model_zoo: verbatim copy not checked"
    installed = Path(list(spec.submodule_search_locations)[0]) / "LongCTR" / "ETA" / "ETA.py"
    same = methods(installed.read_text(), "ETA") == methods(Path(__file__).read_text(), "FuxiRetrieval")
    return f"topk_retrieval/lsh_hash {'match' if same else 'DIFFER FROM'} {installed}"


class FuxiETA(nn.Module, FuxiRetrieval):
    """FuxiCTR ETA's forward (``ETA.forward``) on ``(user, hour, items [B, L + 1],
    categories [B, L + 1], mask [B, L])``, the candidate in the last column, as its
    LongCTR data loader builds them."""

    def __init__(self, table_sizes: Dict[str, int], config: ModelConfig, hash_bits: int,
                 short_seq_len: int = 50) -> None:
        super().__init__()
        attention = fuxictr_target_attention()
        d, width = config.embedding_dim, 2 * config.embedding_dim  # item_info_dim
        self.item = nn.Embedding(table_sizes[HIST_ITEM], d)
        self.category = nn.Embedding(table_sizes[HIST_CATEGORY], d)
        self.user = nn.Embedding(table_sizes[USER_ID], d)
        self.hour = nn.Embedding(table_sizes[CONTEXT_HOUR], d)
        heads = config.num_heads
        self.short_attention = attention(width, heads * config.head_dim, heads)
        self.long_attention = attention(width, heads * config.head_dim, heads)
        self.reuse_hash, self.hash_bits, self.topk = True, hash_bits, config.k
        self.short_seq_len = short_seq_len
        self.random_rotations = nn.Parameter(torch.randn(1, width, hash_bits), requires_grad=False)
        branches = 3 if short_seq_len else 2  # target, (short-term,) long-term
        self.dnn = nn.Sequential(mlp(2 * d + branches * width, config.over_arch_layers),
                                 nn.Linear(config.over_arch_layers[-1], 1))

    def forward(self, user: torch.Tensor, hour: torch.Tensor, items: torch.Tensor,
                categories: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        item_feat_emb = torch.cat([self.item(items), self.category(categories)], dim=-1)
        target_emb = item_feat_emb[:, -1, :]
        interests = [target_emb]
        if self.short_seq_len:  # --long-path-only: no short-term branch
            short_seq_emb = item_feat_emb[:, -self.short_seq_len:-1, :]
            short_mask = mask[:, -self.short_seq_len:-1]
            interests.append(self.short_attention(target_emb, short_seq_emb, short_mask))
        long_seq_emb = item_feat_emb[:, 0:-1, :]
        topk_emb, topk_mask = self.topk_retrieval(self.random_rotations, target_emb, long_seq_emb,
                                                  mask, self.topk)
        long_interest_emb = self.long_attention(target_emb, topk_emb, topk_mask)
        feature_emb = torch.cat([self.user(user), self.hour(hour), *interests,
                                 long_interest_emb], dim=-1)
        return self.dnn(feature_emb).squeeze(-1)


def padded(values: torch.Tensor, lengths: torch.Tensor, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Jagged ``values`` -> ``([B, length] ids pre-padded with 0, [B, length] float mask)``, as
    FuxiCTR's ``BatchCollator`` (``padding="pre"``)."""
    mask = torch.arange(length) >= (length - lengths).unsqueeze(1)
    out = values.new_zeros(mask.shape)
    out[mask] = values  # row-major: each sample's behaviors, oldest first, right-aligned
    return out, mask.float()


def fuxi_inputs(batch: Batch, length: int) -> Tuple[torch.Tensor, ...]:
    """The anchor's dense inputs of one batch: user, hour, items and categories ``[B, L + 1]``
    (history then candidate), mask ``[B, L]``, labels."""
    f = batch.features
    items, mask = padded(f[HIST_ITEM].values(), f[HIST_ITEM].lengths(), length)
    categories, _ = padded(f[HIST_CATEGORY].values(), f[HIST_CATEGORY].lengths(), length)
    items = torch.cat([items, f[TARGET_ITEM].values().unsqueeze(1)], dim=1)
    categories = torch.cat([categories, f[TARGET_CATEGORY].values().unsqueeze(1)], dim=1)
    return f[USER_ID].values(), f[CONTEXT_HOUR].values(), items, categories, mask, batch.labels


def fuxi_step(model: FuxiETA, inputs: List[Tuple[torch.Tensor, ...]]) -> Callable[[int, Batch], None]:
    """FuxiCTR's ``train_step``: BCE, backward, ``clip_grad_norm_(10)``, Adam (lr 1e-3)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(i: int, batch: Batch) -> None:
        *x, labels = inputs[i - 1]
        loss = nn.functional.binary_cross_entropy_with_logits(model(*x), labels)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10)
        optimizer.step()
        optimizer.zero_grad()

    return step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours_rank(rank: int, world: int, port: int, length: int,
              args: argparse.Namespace) -> Tuple[List[float], float]:
    """One of ``world`` ranks of our training (1 thread, as torchrun runs each rank), each with
    its own batches of ``--batch-size``: its step times and peak RSS."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    data, batches = synthetic_batches(length, args.batch_size, world * (args.warmup + args.steps))
    init_distributed()
    step = train_step("eta", data, args)
    return time_steps(step, batches[rank::world], args.warmup), peak_rss_gib()


def summary(ms: List[float], steps: int, rss: float) -> Dict[str, float]:
    return {"ms_per_sample": min(ms), "ms_per_sample_mean": statistics.mean(ms),
            "ms_per_sample_median": statistics.median(ms), "steps": steps, "peak_rss_gib": rss}


def setup(system: str, length: int, args: argparse.Namespace
          ) -> Tuple[Callable[[int, Batch], None], List[Batch]]:
    """``system``'s training step ("ours": one rank; "fuxictr") and its batches, in this process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.fuxi_steps if system == "fuxictr" and args.fuxi_steps else args.steps
    count = args.warmup + steps
    if args.ours_ranks == 1 and not args.sequential:  # taking turns: the first step of a turn
        while sum(i > args.warmup and (i - 1) % args.turn_steps != 0  # is not timed either
                  for i in range(1, count + 1)) < steps:
            count += 1
    data, batches = synthetic_batches(length, args.batch_size, count)
    if system == "ours":
        os.environ["MASTER_PORT"] = str(free_port())  # for the one-rank gloo group
        init_distributed()
        return train_step("eta", data, args), batches
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=args.embedding_dim, k=args.k, hash_bits=args.hash_bits)
    model = FuxiETA(data.table_sizes, config, args.fuxi_hash_bits or args.hash_bits,
                    short_seq_len=0 if args.long_path_only else 50)
    return fuxi_step(model, [fuxi_inputs(b, length) for b in batches]), batches


def run_one(system: str, length: int, args: argparse.Namespace) -> Dict[str, float]:
    """Time ``system`` ("ours" or "fuxictr") at history length ``length``, in this process (with
    ``--ours-ranks 2``, ours in 2 processes: a step ends when the slower rank's does, and a step
    trains 2 batches)."""
    if system == "ours" and args.ours_ranks > 1:
        if args.threads:
            torch.set_num_threads(args.threads)
        world, port = args.ours_ranks, free_port()
        with ProcessPoolExecutor(world, mp_context=get_context("spawn")) as pool:
            runs = [f.result() for f in [pool.submit(ours_rank, r, world, port, length, args)
                                         for r in range(world)]]
        step_times = [max(t) for t in zip(*(times for times, _ in runs))]
        ms = [1000 * t / (world * args.batch_size) for t in step_times]
        return summary(ms, args.steps, max(rss for _, rss in runs))
    step, batches = setup(system, length, args)
    ms = [1000 * t / args.batch_size for t in time_steps(step, batches, args.warmup)]  # per sample
    return summary(ms, len(batches) - args.warmup, peak_rss_gib())


def take_turns(system: str, length: int, args: argparse.Namespace, mine, theirs, ready,
               results) -> None:
    """``run_one`` for one system of an interleaved pair: after setup, the two systems take turns
    in blocks of ``--turn-steps`` training steps (waiting for ``mine``, handing over with
    ``theirs``), so that both see the same phases of the machine; the first step of each block
    is not timed (it pays for the caches the other system's block evicted)."""
    step, batches = setup(system, length, args)
    ready.release()
    ms = []
    for i, batch in enumerate(batches, start=1):
        first = (i - 1) % args.turn_steps == 0
        if first:
            mine.acquire()
        start = time.perf_counter()
        step(i, batch)
        elapsed = time.perf_counter() - start
        if i > args.warmup and not first:
            ms.append(1000 * elapsed / args.batch_size)
        if i % args.turn_steps == 0 or i == len(batches):
            theirs.release()
    results.put((system, summary(ms, len(ms), peak_rss_gib())))


def run_interleaved(length: int, args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """Ours and FuxiCTR in two processes that take turns (``take_turns``; ours first), after both
    have set up: ``{system: run_one's dict}``."""
    ctx = get_context("spawn")
    turns, ready, results = [ctx.Semaphore(0), ctx.Semaphore(0)], ctx.Semaphore(0), ctx.Queue()
    systems = ("ours", "fuxictr")
    procs = [ctx.Process(target=take_turns, args=(system, length, args, turns[i], turns[1 - i],
                                                  ready, results))
             for i, system in enumerate(systems)]
    for proc in procs:
        proc.start()
    out: Dict[str, Dict[str, float]] = {}
    try:
        for _ in systems:
            while not ready.acquire(timeout=5):
                check_alive(procs)
        turns[0].release()
        while len(out) < len(systems):
            try:
                system, row = results.get(timeout=5)
                out[system] = row
            except queue.Empty:
                check_alive(procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return out


def check_alive(procs) -> None:
    dead = [p for p in procs if p.exitcode not in (None, 0)]
    if dead:
        raise RuntimeError(f"an interleaved run failed (exit code {dead[0].exitcode})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--hash-bits", type=int, default=64, help="m: ours per block, FuxiCTR in all")
    p.add_argument("--fuxi-hash-bits", type=int, default=0, help="FuxiCTR's bits (0: --hash-bits)")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--steps", type=int, default=20,
                   help="timed steps; the table gives the fastest (on a noisy CPU more steps give "
                        "a steadier minimum)")
    p.add_argument("--fuxi-steps", type=int, default=0,
                   help="timed FuxiCTR steps (0: --steps; with --sequential only)")
    p.add_argument("--sequential", action="store_true",
                   help="ours, then FuxiCTR (default with one rank: the two take turns)")
    p.add_argument("--turn-steps", type=int, default=6,
                   help="steps per turn when taking turns (the first of each is not timed)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ours-ranks", type=int, default=1,
                   help="our training in this many 1-thread processes (torchrun's layout: 2 on "
                        "2 cores), each with --batch-size samples per step")
    p.add_argument("--long-path-only", action="store_true",
                   help="both without their short-term branch (ours: --short-window 0)")
    p.add_argument("--retain-memory", action="store_true",
                   help="glibc keeps freed memory mapped in both processes (no page faults after "
                        "warm-up, as with a caching allocator)")
    p.add_argument("--out", default="runs/anchor")
    args = p.parse_args()
    if args.retain_memory:  # read by glibc when each (spawned) process starts
        keep_freed_memory_mapped()
    if args.fuxi_steps and args.ours_ranks == 1 and not args.sequential:
        p.error("--fuxi-steps needs --sequential (taking turns, both run --steps steps)")
    print(check_verbatim(), flush=True)

    results = []
    print("| L | ours ms / sample | FuxiCTR ms / sample | FuxiCTR / ours | peak RSS ours | "
          "peak RSS FuxiCTR |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        row: Dict[str, float] = {"L": length}
        if args.ours_ranks == 1 and not args.sequential:
            runs = run_interleaved(length, args)
        else:  # a fresh process per run, one after the other
            runs = {}
            for system in ("ours", "fuxictr"):
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                    runs[system] = pool.submit(run_one, system, length, args).result()
        for system, r in runs.items():
            row.update({f"{system}_{key}": value for key, value in r.items()})
        row["speedup"] = row["fuxictr_ms_per_sample"] / row["ours_ms_per_sample"]
        row["speedup_mean"] = row["fuxictr_ms_per_sample_mean"] / row["ours_ms_per_sample_mean"]
        results.append(row)
        print(f"| {length:,} | {row['ours_ms_per_sample']:.3f} | {row['fuxictr_ms_per_sample']:.3f} "
              f"| **{row['speedup']:.1f}x** | {row['ours_peak_rss_gib']:.2f} GiB "
              f"| {row['fuxictr_peak_rss_gib']:.2f} GiB |", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "anchor.json").write_text(json.dumps(
        {"args": vars(args), "commit": source_commit(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
