"""A small compiled CPU kernel for ETA's retrieval: Hamming top-k straight from the signature table.

``simhash_topk`` in torch ops makes ~15 passes over the N history values (gather the
signatures, expand the targets, xor, popcount, histogram, threshold, select). On CPU each pass
costs 5-30 ns per value, so at L = 10,000 the search dominates a training step. This kernel does
it in one pass per sample: it reads each behavior's packed signatures from the per-item and
per-category tables by id, popcounts the xor with the candidate's signature (hardware popcount), keeps a histogram of
the distances (at most m + 1 counters), finds the threshold distance, and collects the k closest
scanning from the most recent behavior backwards (so ties go to the more recent one). Samples
run in parallel (``at::parallel_for``).

Built on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja, both in the
lock file / Debian; about a minute, cached in ``TORCH_EXTENSIONS_DIR``). The torch-ops
``simhash_topk`` stays the reference the tests compare it with, and the path for GPU tensors.
``TORCHREC_LONGSEQ_KERNELS=0`` turns the kernel off (then every device uses the torch ops).
"""

import os
import sys
from typing import Optional, Tuple

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

// distance of behavior p = popcount(A[a_ids[p]] ^ a_target) + popcount(C[c_ids[p]] ^ c_target):
// the Hamming distance of the concatenated signature, read from two per-id tables.
std::vector<torch::Tensor> hamming_topk_by_id(
    torch::Tensor a_table, torch::Tensor a_ids, torch::Tensor a_targets,
    torch::Tensor c_table, torch::Tensor c_ids, torch::Tensor c_targets,
    torch::Tensor offsets, int64_t k) {
  for (auto* t : {&a_table, &a_targets, &c_table, &c_targets}) {
    TORCH_CHECK(t->dtype() == torch::kInt64 && t->dim() == 2, "signatures must be int64 [rows, W]");
    *t = t->contiguous();
  }
  a_ids = a_ids.to(torch::kInt64).contiguous(); c_ids = c_ids.to(torch::kInt64).contiguous();
  offsets = offsets.to(torch::kInt64).contiguous();
  const int64_t WA = a_table.size(1), WC = c_table.size(1), B = offsets.numel() - 1;
  const int64_t max_d = 64 * (WA + WC);
  const int64_t *A = a_table.data_ptr<int64_t>(), *C = c_table.data_ptr<int64_t>();
  const int64_t *ai = a_ids.data_ptr<int64_t>(), *ci = c_ids.data_ptr<int64_t>();
  const int64_t *at = a_targets.data_ptr<int64_t>(), *ct = c_targets.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
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
      const int64_t *ta = at + b * WA, *tc = ct + b * WC;
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t *sa = A + ai[p] * WA, *sc = C + ci[p] * WC;
        int64_t d = 0;
        for (int64_t w = 0; w < WA; ++w) d += __builtin_popcountll((uint64_t)(sa[w] ^ ta[w]));
        for (int64_t w = 0; w < WC; ++w) d += __builtin_popcountll((uint64_t)(sc[w] ^ tc[w]));
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

        # the build runs `ninja` from PATH: make the one installed next to this Python (the
        # lock file's) findable when the virtualenv is not activated
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")

        _MODULE = load_inline(name="torchrec_longseq_kernels_v2", cpp_sources=[_SOURCE],
                              extra_cflags=["-O3", "-march=x86-64-v2"], verbose=False)
    return _MODULE


def hamming_topk_by_id(
    item_table: torch.Tensor, item_ids: torch.Tensor, item_targets: torch.Tensor,
    category_table: torch.Tensor, category_ids: torch.Tensor, category_targets: torch.Tensor,
    offsets: torch.Tensor, k: int,
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The compiled Hamming top-k, or ``None`` where it does not apply (GPU tensors, disabled).

    The signature of behavior ``j`` is the concatenation ``[item_table[item_ids[j]],
    category_table[category_ids[j]]]``, the candidate's ``[item_targets[b],
    category_targets[b]]``; neither is materialised.

    Args:
        item_table (Tensor): ``[I, Wi]`` int64 packed signatures per item.
        item_ids (Tensor): ``[N]`` history item ids.
        item_targets (Tensor): ``[B, Wi]`` candidate item signatures.
        category_table (Tensor): ``[C, Wc]`` int64 packed signatures per category.
        category_ids (Tensor): ``[N]`` history category ids.
        category_targets (Tensor): ``[B, Wc]`` candidate category signatures.
        offsets (Tensor): ``[B + 1]`` history offsets.
        k (int): at most this many per sample.

    Returns:
        ``(indices [M], lengths [B])`` exactly as ``simhash_topk`` on the concatenated
        signatures (smallest distance first, ties to the later position).
    """
    if not kernels_enabled() or item_table.device.type != "cpu":
        return None
    indices, lengths = _module().hamming_topk_by_id(item_table, item_ids, item_targets,
                                                    category_table, category_ids,
                                                    category_targets, offsets, int(k))
    return indices, lengths
