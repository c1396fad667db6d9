"""Renders ``benchmarks/RESULTS.md`` from the JSON files the benchmark scripts wrote.

Every table is read from a run's own output (nothing typed by hand), under the command that
produced it and the machine, versions and date of this run::

    .venv/bin/python benchmarks/report.py --quality runs/q-L1k runs/q-L2k runs/q-L10k \\
        --throughput runs/throughput --retrieval runs/retrieval --anchor runs/anchor \\
        --serving runs/serving --out benchmarks/RESULTS.md
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List

from torchrec_longseq.models.longseq_ctr import MODELS


def load(directory: str, name: str):
    path = Path(directory) / name
    return json.loads(path.read_text()) if path.exists() else None


def mean_std(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def quality_table(runs: List[Dict]) -> List[str]:
    by: Dict = {}
    for r in runs:  # runs before the similarity regime have no "regime": the category one
        by.setdefault((r.get("regime", "category"), r["max_seq_len"], r["model"]), []).append(r)
    lines = ["| regime | max L | model | seeds | steps x batch | test AUC | test GAUC | test log loss | "
             "recall@k | GSU overlap | train samples/s (2 ranks) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (regime, length, model), rs in sorted(by.items(), key=lambda kv: kv[0][:2]):
        cells = [mean_std([r[k] for r in rs]) for k in ("auc", "gauc", "logloss")]
        recall = [r["recall"] for r in rs if "recall" in r]
        overlap = [r["gsu_overlap"] for r in rs if "gsu_overlap" in r]
        lines.append(
            f"| {regime} | {length:,} | {model} | {len(rs)} | {rs[0]['steps']} x {rs[0]['batch_size']} | "
            + " | ".join(cells)
            + (f" | {statistics.mean(recall):.3f} |" if recall else " | |")
            + (f" {statistics.mean(overlap):.3f} |" if overlap else " |")
            + f" {statistics.mean(r['samples_per_sec'] for r in rs):.0f} |")
    return lines


def serving_against_length(servings: List[Dict]) -> List[str]:
    """Shared p50 (and batched / shared) per model against L, from the kept-mapped serving runs
    of one candidate count and width, when they cover more than one L."""
    runs = [x for x in servings if x["args"].get("retain_memory")]
    by_length = {x["args"]["length"]: {r["model"]: r for r in x["results"]} for x in runs}
    if len(by_length) < 2 or len({(x["args"]["candidates"], x["args"].get("embedding_dim"))
                                  for x in runs}) > 1:
        return []
    lengths = sorted(by_length)
    models = [m for m in MODELS if all(m in by_length[n] for n in lengths)]
    lines = [f"Serving against L (the kept-mapped runs above, {runs[0]['args']['candidates']} "
             "candidates): shared p50 in ms (batched / shared).", "",
             "| model | " + " | ".join(f"L = {n:,}" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(
            f"{by_length[n][m]['shared_p50_ms']:.1f} ({by_length[n][m]['batched_over_shared']:.1f}x)"
            for n in lengths) + " |")
    return lines + [""]


def on_commit(run: Dict) -> str:
    """`` On <commit>.`` for a run whose JSON records the code it measured (``runinfo``)."""
    return f" On {run['commit']}." if run.get("commit") else ""


def copy_plot(run_dir: str, name: str, report: str) -> None:
    """Put the run's plot next to the report (which links it by name), if the run drew one."""
    source = Path(run_dir) / name
    if source.exists():
        shutil.copyfile(source, Path(report).parent / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quality", nargs="*", default=[])
    p.add_argument("--throughput")
    p.add_argument("--retrieval")
    p.add_argument("--anchor", nargs="*", default=[])
    p.add_argument("--serving", nargs="*", default=[])
    p.add_argument("--out", default="benchmarks/RESULTS.md")
    args = p.parse_args()
    out: List[str] = [
        "# Benchmark results", "",
        f"Rendered by `benchmarks/report.py` on {datetime.date.today()} from the runs' JSON files.",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"no GPU, Linux {platform.release()}, Python {platform.python_version()}; torch "
        f"{version('torch')}, torchrec {version('torchrec')}, fbgemm-gpu-cpu "
        f"{version('fbgemm-gpu-cpu')}.", "",
        "Ratios compare numbers taken in the same run; absolute times on this 2-core machine "
        "move by up to 2x between runs. The speed tables were taken with the machine otherwise "
        "idle; `--threads 0` is torch's default (2 threads here). The quality runs shared the "
        "CPU with other jobs, so their samples/s are indicative only.", ""]
    quality = [r for d in args.quality for r in (load(d, "quality.json") or [])]
    if quality:
        out += ["## Quality against history length", "",
                "`benchmarks/quality.py --max-seq-len L --seeds 0 1 --steps S [--batch-size 64]` "
                "(torchrun, 2 ranks; steps x batch per rank as listed; test = 40 batches per rank "
                "of days 90-100); mean ± "
                "standard deviation over seeds. recall@k: relevant behaviors retrieved / "
                "sum of min(k, relevant); GSU overlap (TWIN): share of the full-attention top-k "
                "that the search returns.", "", *quality_table(quality), "",
                "![AUC against L](auc_vs_length.png)", ""]
    throughput = args.throughput and load(args.throughput, "throughput.json")
    if throughput:
        a = throughput["args"]
        out += ["## Training cost and memory against L", "",
                f"`benchmarks/throughput.py --lengths {' '.join(map(str, a['lengths']))} "
                f"--threads {a['threads']}`: one process per (model, L), the training path of "
                f"train.py with one rank, B = {a['batch_size']}, d = {a['embedding_dim']}, "
                f"m = {a['hash_bits']}, k = {a['k']}, {a['steps']} timed steps after "
                f"{a['warmup']} warm-up; every sample has exactly L behaviors; peak RSS of the "
                "run's process (data included)." + on_commit(throughput), "",
                "| model | L | ms / sample | samples/s | cost vs L = 1,000 | peak RSS (GiB) |",
                "|---|---|---|---|---|---|"]
        for r in throughput["results"]:
            if "error" in r:
                out.append(f"| {r['model']} | {r['L']:,} | {r['error']} | | | |")
                continue
            base = next((x for x in throughput["results"] if x["model"] == r["model"]
                         and x["L"] == 1000 and "error" not in x), None)
            ratio = f"{r['ms_per_sample'] / base['ms_per_sample']:.2f}x" if base else ""
            out.append(f"| {r['model']} | {r['L']:,} | {r['ms_per_sample']:.3f} | "
                       f"{r['samples_per_sec']:.0f} | {ratio} | {r['peak_rss_gib']:.2f} |")
        out += ["", "![samples/s against L](throughput.png)", ""]
        copy_plot(args.throughput, "throughput.png", args.out)
    anchors = [x for x in (load(d, "anchor.json") for d in args.anchor) if x]
    if anchors:
        out += ["## ETA against FuxiCTR's ETA (same harness, same run)", ""]
    for anchor in anchors:
        a = anchor["args"]
        what = ("the long-sequence path only (both without their short-term branch)"
                if a.get("long_path_only") else "whole models (each with its short-term branch)")
        ranks = a.get("ours_ranks", 1)
        if ranks == 1 and "turn_steps" in a and not a.get("sequential"):
            what += (f"; the two take turns in blocks of {a['turn_steps']} steps (the first of "
                     "each not timed)")
        else:
            what += "; ours, then FuxiCTR"
        if ranks > 1:
            what += (f"; ours trained on {ranks} ranks of 1 thread (as `torchrun` runs it), each "
                     f"with its own batch of {a['batch_size']}, per sample of the {ranks} batches;"
                     f" FuxiCTR in one process with {a['threads'] or 'the default'} threads")
        if a.get("retain_memory"):
            what += ("; `--retain-memory`: glibc keeps freed memory mapped in both processes "
                     "(no page faults after warm-up, as with a caching allocator)")
        out += [f"`benchmarks/fuxictr_anchor.py --threads {a['threads']}"
                + " --long-path-only" * bool(a.get("long_path_only"))
                + " --retain-memory" * bool(a.get("retain_memory"))
                + f" --ours-ranks {ranks}" * (ranks > 1) + f"`: {what}; "
                f"B = {a['batch_size']}, d = {a['embedding_dim']}, m = {a['hash_bits']}, "
                f"k = {a['k']}; fastest of {a['steps']} timed training steps, per sample; "
                "mean-step ratio in brackets." + on_commit(anchor), "",
                "| L | ours ms / sample | FuxiCTR ms / sample | FuxiCTR / ours | peak RSS ours | "
                "peak RSS FuxiCTR |", "|---|---|---|---|---|---|"]
        for r in anchor["results"]:
            out.append(f"| {r['L']:,} | {r['ours_ms_per_sample']:.3f} | "
                       f"{r['fuxictr_ms_per_sample']:.3f} | **{r['speedup']:.1f}x** "
                       f"({r['speedup_mean']:.1f}x) | {r['ours_peak_rss_gib']:.2f} GiB | "
                       f"{r['fuxictr_peak_rss_gib']:.2f} GiB |")
        out.append("")
    retrieval = args.retrieval and load(args.retrieval, "retrieval.json")
    if retrieval:
        out += ["## Retrieval alone against L", "",
                "`benchmarks/retrieval.py`: µs per candidate, forward only (see the script's "
                "docstring for the exact operations)." + on_commit(retrieval), ""]
        rows = retrieval["results"]
        keys = [k for k, v in rows[0].items() if isinstance(v, float) and "median" not in k]
        out += ["| L | candidates | " + " | ".join(keys) + " | same results |",
                "|---|---|" + "---|" * (len(keys) + 1)]
        for r in rows:
            out.append(f"| {r['L']:,} | {r['candidates']} | "
                       + " | ".join(f"{r[k]:.2f}" for k in keys) + f" | {r['same_results']} |")
        out += ["", "![retrieval cost against L](retrieval.png)", ""]
        copy_plot(args.retrieval, "retrieval.png", args.out)
    servings = [x for x in (load(d, "serving.json") for d in args.serving) if x]
    if servings:
        out += ["## Serving one user", ""]
    for serving in servings:
        a = serving["args"]
        memory = (" `--retain-memory`: glibc keeps freed memory mapped (no page faults after "
                  "warm-up, as with a caching allocator)." if a.get("retain_memory") else
                  " glibc's default allocation: large temporaries are fresh mappings whose "
                  "pages fault in on first touch.")
        models = [r["model"] for r in serving["results"]]
        out += [f"`benchmarks/serving.py --length {a['length']} --candidates {a['candidates']} "
                f"--reps {a['reps']}" + " --retain-memory" * bool(a.get("retain_memory"))
                + " --breakdown" * bool(a.get("breakdown"))
                + (f" --models {' '.join(models)}" if models != MODELS else "")
                + f" --embedding-dim {a['embedding_dim']}" * (a.get("embedding_dim", 16) != 16)
                + "`: one request, one fresh process per model, the three ways timed in "
                "alternating blocks; ms." + memory + on_commit(serving), "",
                "| model | shared p50 | shared p99 | batched p50 | batched p99 | one by one p50 | "
                "batched / shared | one by one / shared |", "|---|---|---|---|---|---|---|---|"]
        for r in serving["results"]:
            out.append(f"| {r['model']} | {r['shared_p50_ms']:.1f} | {r['shared_p99_ms']:.1f} | "
                       f"{r['batched_p50_ms']:.1f} | {r['batched_p99_ms']:.1f} | "
                       f"{r['one_by_one_p50_ms']:.0f} | {r['batched_over_shared']:.1f}x | "
                       f"{r['one_by_one_over_shared']:.1f}x |")
        out.append("")
        staged = [r for r in serving["results"] if "stages_ms" in r]
        if staged:  # the scopes in score_shared's order, then the whole request ("total")
            names = [key.split(".")[-1] for key in staged[0]["stages_ms"] if key != "total"]
            out += ["The shared path by stage (`--breakdown`: the scopes of `score_shared` timed "
                    "by wall clock, median ms per request; the whole request also checks it):",
                    "",
                    "| model | " + " | ".join(names) + " | whole request |",
                    "|---|" + "---|" * (len(names) + 1)]
            for r in staged:
                out.append(f"| {r['model']} | "
                           + " | ".join(f"{ms:.2f}" for ms in r["stages_ms"].values()) + " |")
            out.append("")
    out += serving_against_length(servings)
    # measurements taken outside this suite (A/B comparisons, data preparation, ...), kept by
    # hand with their commits in benchmarks/results_more.md and carried into every rendering
    more = Path(__file__).with_name("results_more.md")
    if more.exists():
        out += ["", more.read_text().rstrip(), ""]
    Path(args.out).write_text("\n".join(out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
