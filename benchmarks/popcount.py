"""Popcount of int64 words in PyTorch: compare the options for Hamming distance.

torch has no popcount op. Candidates:
  swar       ``popcount64_swar``: elementwise bit tricks (what ``popcount64`` runs off CPU)
  lut16      a 65536-entry table gathered on the four 16-bit chunks of every word
  lut8       a 256-entry table gathered on the 8 bytes of every word (a uint8 view)
  numpy      ``numpy.bitwise_count`` on a uint64 view (numpy >= 2, hardware popcount, CPU only):
             what ``popcount64`` runs on CPU. Beware: on *signed* ints numpy counts the bits of
             the absolute value, hence the uint64 view.

Prints milliseconds per 10M words on CPU (and CUDA when available)::

    python benchmarks/popcount.py [--words 10000000] [--repeats 3]
"""

import argparse
import time

import numpy as np
import torch

from torchrec_longseq.retrieval.simhash import popcount64_swar

_LUT16 = {}


def popcount_lut16(x: torch.Tensor) -> torch.Tensor:
    table = _LUT16.get(x.device)
    if table is None:
        t = torch.arange(1 << 16, dtype=torch.int32)
        count = torch.zeros_like(t)
        for i in range(16):
            count += (t >> i) & 1
        table = _LUT16[x.device] = count.to(torch.uint8).to(x.device)
    out = table[x & 0xFFFF].to(torch.int64)
    for shift in (16, 32, 48):  # mask after the (arithmetic) shift
        out += table[(x >> shift) & 0xFFFF]
    return out


def popcount_lut8(x: torch.Tensor) -> torch.Tensor:
    # byte order does not matter for a count, so the uint8 view is endian-independent
    table = _LUT16.get((x.device, 8))
    if table is None:
        table = _LUT16[(x.device, 8)] = popcount_lut16(torch.arange(256, device=x.device)).to(
            torch.uint8
        )
    return table[x.contiguous().view(torch.uint8).long()].view(*x.shape, 8).sum(-1)


def popcount_numpy(x: torch.Tensor) -> torch.Tensor:
    # view as uint64: on signed ints numpy counts the bits of the ABSOLUTE value
    # (np.bitwise_count(np.int64(-1)) == 1), which is wrong for words with bit 63 set
    return torch.from_numpy(np.bitwise_count(x.numpy().view(np.uint64)))


def bench(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up (table build, allocator)
    if x.is_cuda:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randint(-(2**63), 2**63 - 1, (args.words,), dtype=torch.int64, generator=g)
    reference = sum(((x_cpu >> i) & 1) for i in range(64))  # bit by bit, independent
    scale = 10_000_000 / args.words * 1e3

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.words} words")
    print(f"{'method':<8} {'device':<6} {'ms / 10M words':>15}")
    for device in devices:
        x = x_cpu.to(device)
        methods = {"swar": popcount64_swar, "lut16": popcount_lut16, "lut8": popcount_lut8}
        if device == "cpu":
            methods["numpy"] = popcount_numpy
        for name, fn in methods.items():
            assert torch.equal(fn(x).cpu().to(torch.int64), reference), name
            print(f"{name:<8} {device:<6} {bench(fn, x, args.repeats) * scale:>15.1f}")


if __name__ == "__main__":
    main()
