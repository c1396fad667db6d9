"""A small compiled CPU kernel for ETA's retrieval: Hamming top-k straight from the signature table.

``simhash_topk`` in torch ops makes ~15 passes over the N history values (gather the
signatures, expand the targets, xor, popcount, histogram, threshold, select). On CPU each pass
costs 5-30 ns per value, so at L = 10,000 the search dominates a training step. This kernel does
it in one pass per sample: it reads each behavior's packed signature from the per-item table by
id, popcounts the xor with the candidate's signature (hardware popcount), keeps a histogram of
the distances (at most m + 1 counters), finds the threshold distance, and collects the k closest
scanning from the most recent behavior backwards (so ties go to the more recent one). Samples
run in parallel (``at::parallel_for``).

Built on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja, both in the
lock file / Debian; about a minute, cached in ``TORCH_EXTENSIONS_DIR``). The torch-ops
``simhash_topk`` stays the reference the tests compare it with, and the path for GPU tensors.
``TORCHREC_LONGSEQ_KERNELS=0`` turns the kernel off (then every device uses the torch ops).
"""

import os
from typing import Optional, Tuple

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

std::vector<torch::Tensor> hamming_topk_by_id(
    torch::Tensor table, torch::Tensor items, torch::Tensor offsets, torch::Tensor targets,
    int64_t k) {
  TORCH_CHECK(table.dtype() == torch::kInt64 && table.dim() == 2, "table must be int64 [I, W]");
  TORCH_CHECK(targets.dtype() == torch::kInt64 && targets.dim() == 2, "targets must be int64 [B, W]");
  table = table.contiguous(); targets = targets.contiguous();
  items = items.to(torch::kInt64).contiguous(); offsets = offsets.to(torch::kInt64).contiguous();
  const int64_t W = table.size(1), B = offsets.numel() - 1, max_d = 64 * W;
  const int64_t* tab = table.data_ptr<int64_t>();
  const int64_t* ids = items.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  auto lengths = torch::empty({B}, torch::kInt64);
  int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) len[b] = std::max<int64_t>(0, std::min(off[b + 1] - off[b], k));
  std::vector<int64_t> out_off(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) out_off[b + 1] = out_off[b] + len[b];
  auto indices = torch::empty({out_off[B]}, torch::kInt64);
  int64_t* out = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> hist(max_d + 1), dist;
    std::vector<std::pair<int64_t, int64_t>> picked;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = off[b], hi = off[b + 1], want = len[b];
      if (want == 0) continue;
      dist.resize(hi - lo);
      std::fill(hist.begin(), hist.end(), 0);
      const int64_t* t = tgt + b * W;
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t* s = tab + ids[p] * W;
        int64_t d = 0;
        for (int64_t w = 0; w < W; ++w) d += __builtin_popcountll((uint64_t)(s[w] ^ t[w]));
        dist[p - lo] = d;
        hist[d] += 1;
      }
      int64_t threshold = 0, below = 0;
      while (below + hist[threshold] < want) below += hist[threshold++];
      int64_t ties = want - below;  // how many at the threshold distance, most recent first
      picked.clear();
      for (int64_t p = hi - 1; p >= lo; --p) {
        const int64_t d = dist[p - lo];
        if (d < threshold || (d == threshold && ties-- > 0)) picked.emplace_back(d, -p);
      }
      std::sort(picked.begin(), picked.end());  // distance asc, position desc
      for (int64_t i = 0; i < want; ++i) out[out_off[b] + i] = -picked[i].second;
    }
  });
  return {indices, lengths};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hamming_topk_by_id", &hamming_topk_by_id, "Hamming top-k per jagged segment");
}
"""

_MODULE = None


def kernels_enabled() -> bool:
    return os.environ.get("TORCHREC_LONGSEQ_KERNELS", "1") != "0"


def _module():
    global _MODULE
    if _MODULE is None:
        from torch.utils.cpp_extension import load_inline

        _MODULE = load_inline(name="torchrec_longseq_kernels_v1", cpp_sources=[_SOURCE],
                              extra_cflags=["-O3", "-march=x86-64-v2"], verbose=False)
    return _MODULE


def hamming_topk_by_id(
    table: torch.Tensor, items: torch.Tensor, offsets: torch.Tensor, targets: torch.Tensor, k: int
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The compiled Hamming top-k, or ``None`` where it does not apply (GPU tensors, disabled).

    Args:
        table (Tensor): ``[I, W]`` int64 packed signatures of every item.
        items (Tensor): ``[N]`` history item ids.
        offsets (Tensor): ``[B + 1]`` history offsets.
        targets (Tensor): ``[B, W]`` int64 candidate signatures.
        k (int): at most this many per sample.

    Returns:
        ``(indices [M], lengths [B])`` exactly as ``simhash_topk`` (smallest distance first, ties
        to the later position).
    """
    if not kernels_enabled() or table.device.type != "cpu":
        return None
    indices, lengths = _module().hamming_topk_by_id(table, items, offsets, targets, int(k))
    return indices, lengths
