#include "common.h"

// top-k of float scores per segment, best first, ties to the more recent position
std::vector<torch::Tensor> float_topk(torch::Tensor scores, torch::Tensor starts, torch::Tensor ends,
                                      int64_t k) {
  TORCH_CHECK(scores.scalar_type() == torch::kFloat32, "float_topk: float32 scores, got ",
              scores.scalar_type());
  scores = scores.contiguous();
  check_k(k);
  check_segments(starts, ends, scores.numel(), starts.numel());
  const int64_t B = starts.numel();
  const float* s = scores.data_ptr<float>();
  const int64_t *st = starts.data_ptr<int64_t>(), *en = ends.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> found(B);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx;
    for (int64_t b = begin; b < end; ++b) {
      select_largest(s + st[b], en[b] - st[b], k, idx);
      for (int64_t i : idx) found[b].push_back(st[b] + i);
    }
  });
  return concat_segments(found);
}

TORCH_LIBRARY_IMPL(longseq, CPU, m) {
  m.impl("float_topk", [](torch::Tensor scores, torch::Tensor starts, torch::Tensor ends,
                          int64_t k) { return two(float_topk(scores, starts, ends, k)); });
}
