"""Serving latency: one user with L behaviors and C candidates, history searched once vs per candidate.

For every model, in a fresh process, one request (a synthetic user's history of exactly L
behaviors, C candidates) is scored repeatedly three ways, in alternating blocks (each way's calls
back to back, so that no call pays for the caches another way's 100 MB batch just flushed; the
blocks alternate so that drift of the machine hits all ways):

* ``shared``: ``torchrec_longseq.serving.score_request`` (the history searched and looked up once
  for all candidates);
* ``batched``: the C candidates as C independent samples in one batch, each with its own copy of
  the history (``request_batch``: the training layout);
* ``one by one``: C separate one-sample calls (only ``--one-by-one-reps`` times: it is slow);
* with ``--exported``, ``exported``: the model exported (``serving.export``: torch.export and
  AOTInductor) into a temporary directory and loaded back (``serving.load``), scoring the
  request (checked as ``score_request`` checks it) through the compiled graph.

All three run under ``torch.no_grad()``, and each time includes building the model
input from the request (for ``batched``: C copies of the history, made with ``repeat``). Prints
p50 / p99 in ms and the speed-up of ``shared`` over the others; writes ``OUT/serving.json``::

    .venv/bin/python benchmarks/serving.py --length 10000 --candidates 200 --reps 30

``--breakdown`` also times ``score_shared``'s four stages by wall clock (``serving.STAGES``:
``search``, the search and the distinct positions; ``lookup``, the rows of the candidates and
those positions (``serving.request_rows``); ``attend``, the sequence module's attention;
``head``, the pooled features and the MLP), median over ``--reps`` requests.

``--retain-memory`` runs each model's process with glibc told to keep freed memory mapped
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``), as a server with a
caching allocator would: with glibc's defaults every large temporary is a fresh mapping whose
pages fault in on first touch (about 1.7 µs per 4 KiB page on this VM), which costs the batched
path, with its 100+ MB of temporaries per call, about half of its time.
"""

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import torch

from torchrec_longseq import serving
from torchrec_longseq.data import SyntheticConfig
from torchrec_longseq.models.longseq_ctr import MODELS, ModelConfig, build_model
from runinfo import keep_freed_memory_mapped, source_commit


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timed(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def measure(name: str, args: argparse.Namespace) -> Dict:
    """Time the three ways for model ``name`` (in this process, meant to be a fresh one)."""
    torch.set_grad_enabled(False)
    data = SyntheticConfig(max_seq_len=args.length, min_seq_len=args.length)
    request = serving.synthetic_request(data, args.length, args.candidates)
    torch.manual_seed(0)
    model = build_model(name, ModelConfig(embedding_dim=args.embedding_dim), data.table_sizes)
    model.eval()
    model.refresh_derived_tables()

    def shared() -> torch.Tensor:
        return serving.score_request(model, request)

    @torch.no_grad()  # as score_request runs
    def batched() -> torch.Tensor:
        batch = serving.request_batch(request, model)
        return model(batch.features, batch.history_time, batch.request_time)[0]

    @torch.no_grad()
    def one_by_one() -> torch.Tensor:
        out = []
        for c in range(request.num_candidates):
            single = serving.Request(**{**request.__dict__, "candidates": {
                key: ids[c:c + 1] for key, ids in request.candidates.items()}})
            batch = serving.request_batch(single, model)
            out.append(model(batch.features, batch.history_time, batch.request_time)[0])
        return torch.cat(out)

    torch.testing.assert_close(shared(), batched(), rtol=1e-4, atol=1e-5)  # and warm-up
    ways = {"shared": shared, "batched": batched, "one_by_one": one_by_one}
    if args.exported:
        with tempfile.TemporaryDirectory() as tmp:
            example = serving.synthetic_request(data, min(args.length, 257), 37, seed=1)
            scorer = serving.load(serving.export(model, Path(tmp) / name, example))
        torch.testing.assert_close(scorer(request), shared(), rtol=1e-5, atol=1e-5)
        ways["exported"] = lambda: scorer(request)
    times: Dict[str, List[float]] = {way: [] for way in ways}
    blocks = 3
    for block in range(blocks):
        for way, fn in ways.items():
            reps = args.one_by_one_reps if way == "one_by_one" else args.reps
            count = reps // blocks + (block < reps % blocks)
            if count:
                fn()  # the first call after another way's block is not timed
            times[way] += [timed(fn) for _ in range(count)]
    row: Dict = {"model": name, "L": args.length, "C": args.candidates}
    for way, values in times.items():
        row[f"{way}_p50_ms"] = statistics.median(values)
        row[f"{way}_p99_ms"] = percentile(values, 0.99)
    row["batched_over_shared"] = row["batched_p50_ms"] / row["shared_p50_ms"]
    row["one_by_one_over_shared"] = row["one_by_one_p50_ms"] / row["shared_p50_ms"]
    if args.exported:
        row["shared_over_exported"] = row["shared_p50_ms"] / row["exported_p50_ms"]
        row["batched_over_exported"] = row["batched_p50_ms"] / row["exported_p50_ms"]
    if args.breakdown:
        row["stages_ms"] = stages(shared, args.reps)
    return row


def stages(fn: Callable[[], torch.Tensor], reps: int) -> Dict[str, float]:
    """Median wall-clock ms per request of each of ``score_shared``'s stages (``serving.STAGES``,
    in order; 0 for one a model does not run) and of the whole request (``total``: the rest is
    the request check and the glue between stages) over ``reps`` requests. The stage scopes are
    timed with ``perf_counter`` (``serving.record_function`` replaced for the duration), not
    under the profiler, whose own cost per op inflates a path of ~100 small ops."""
    current: Dict[str, float] = {}

    @contextmanager
    def clock(name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            current[name] = current.get(name, 0.0) + 1000 * (time.perf_counter() - start)

    per_request: Dict[str, List[float]] = {key: [] for key in (*serving.STAGES, "total")}
    original = serving.record_function
    serving.record_function = clock
    try:
        fn()
        for _ in range(reps):
            current.clear()
            current["total"] = timed(fn)
            for key, values in per_request.items():
                values.append(current.get(key, 0.0))
    finally:
        serving.record_function = original
    return {key: statistics.median(values) for key, values in per_request.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--length", type=int, default=10_000)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--one-by-one-reps", type=int, default=2)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--retain-memory", action="store_true",
                   help="glibc keeps freed memory mapped (no page faults after warm-up)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the shared path's stages (serving.search, .lookup, "
                        ".attend, .head)")
    p.add_argument("--exported", action="store_true",
                   help="also time the exported artefact (serving.export, then serving.load)")
    p.add_argument("--out", default="runs/serving")
    args = p.parse_args()
    if args.retain_memory:  # read by glibc when each model's (spawned) process starts
        keep_freed_memory_mapped()
    rows: List[Dict] = []
    print(f"one user, L = {args.length}, C = {args.candidates} candidates, {args.reps} requests; ms"
          + ("; freed memory kept mapped" if args.retain_memory else ""))
    print("| model | shared p50 | shared p99 | batched p50 | batched p99 | one by one p50 | "
          "batched / shared | one by one / shared |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            row = pool.submit(measure, name, args).result()
        rows.append(row)
        print(f"| {name} | {row['shared_p50_ms']:.1f} | {row['shared_p99_ms']:.1f} | "
              f"{row['batched_p50_ms']:.1f} | {row['batched_p99_ms']:.1f} | "
              f"{row['one_by_one_p50_ms']:.0f} | {row['batched_over_shared']:.1f}x | "
              f"{row['one_by_one_over_shared']:.1f}x |", flush=True)
    if args.exported:
        print("\nexported (torch.export + AOTInductor, loaded back), ms")
        print("| model | exported p50 | exported p99 | shared / exported | batched / exported |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['model']} | {row['exported_p50_ms']:.1f} | "
                  f"{row['exported_p99_ms']:.1f} | {row['shared_over_exported']:.2f}x | "
                  f"{row['batched_over_exported']:.1f}x |")
    if args.breakdown:
        print("\nshared path by stage, wall clock, median ms per request (the whole request also "
              "checks it)")
        print("| model | " + " | ".join(s.split(".")[1] for s in serving.STAGES)
              + " | whole request |")
        print("|---|" + "---|" * (len(serving.STAGES) + 1))
        for row in rows:
            print(f"| {row['model']} | "
                  + " | ".join(f"{ms:.2f}" for ms in row["stages_ms"].values()) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(
        {"args": vars(args), "commit": source_commit(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
