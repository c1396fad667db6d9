"""Time of one co-occurrence pretraining step: the training forward's losses (what
``train.py --cooccurrence-pretrain`` stepped on before c662433) against
``SequenceArch.cooccurrence_losses`` (the windows only), on the same model and batches.

Eager, unsharded, one process; the batches are generated first (not timed), one untimed step
of each way warms up. Each way runs the batches ``--reps`` times, alternating; the table shows
the fastest pass per step.

    .venv/bin/python benchmarks/pretrain_step.py [--models eta sim-soft twin] [--length 1000]
"""

import argparse
import time

import torch

from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.models.longseq_ctr import LongSeqCTRTrain, ModelConfig, build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["eta", "sim-soft", "twin"])
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    data = SyntheticConfig(regime="similarity", max_seq_len=args.length)
    generator = SyntheticGenerator(data)
    batches = [generator.batch("train", i, args.batch_size) for i in range(args.batches)]
    config = ModelConfig(cooccurrence=1.0, esu_similarity="item", esu_evidence=True)
    print("| model | training forward, ms/step | windows only, ms/step | ratio |")
    print("|---|---|---|---|")
    for name in args.models:
        ctr = build_model(name, config, data.table_sizes)
        model = LongSeqCTRTrain(ctr).train()
        arch = ctr.sequence_arch

        def full(batch):
            model(batch)
            return sum(arch.losses)

        def windows(batch):
            return sum(arch.cooccurrence_losses(batch.features, batch.history_time,
                                                batch.request_time))

        best = {"full": float("inf"), "windows": float("inf")}
        for losses in (full, windows):  # warm-up: the operators' first calls, the allocator
            losses(batches[0]).backward()
            model.zero_grad()
        for _ in range(args.reps):
            for kind, losses in (("full", full), ("windows", windows)):
                start = time.perf_counter()
                for batch in batches:
                    losses(batch).backward()
                    model.zero_grad()
                best[kind] = min(best[kind], (time.perf_counter() - start) / len(batches))
        print(f"| {name} | {best['full'] * 1e3:.0f} | {best['windows'] * 1e3:.0f} | "
              f"{best['full'] / best['windows']:.1f}x |")


if __name__ == "__main__":
    main()
