#include "common.h"

// SimHash bits of projections [N, m] (float): bit i = (proj[:, i] > 0), packed 64 per int64
// word (bit i is bit i % 64 of word i / 64; m < 64 leaves the high bits 0)
torch::Tensor pack_signs(torch::Tensor proj) {
  TORCH_CHECK(proj.dim() == 2 && proj.scalar_type() == torch::kFloat, "pack_signs: float [N, m]");
  proj = proj.contiguous();
  const int64_t n = proj.size(0), m = proj.size(1), W = (m + 63) / 64;
  auto out = torch::empty({n, W}, torch::kInt64);
  const float* p = proj.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* row = p + r * m;
      for (int64_t w = 0; w < W; ++w) {
        uint64_t word = 0;
        const int64_t end = std::min<int64_t>(64, m - 64 * w);
        for (int64_t b = 0; b < end; ++b) word |= uint64_t(row[64 * w + b] > 0.f) << b;
        o[r * W + w] = static_cast<int64_t>(word);
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(longseq, CPU, m) { m.impl("pack_signs", &pack_signs); }
