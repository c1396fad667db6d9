#include "common.h"

// SIM hard search over one history shared by all B candidates (serving): one scan from the most
// recent behavior backwards collects, for each category some candidate asks for, its k most
// recent positions, and stops when every one has k; candidates of a category share them. The
// same (indices, lengths) as hard_topk with every segment the whole history.
std::vector<torch::Tensor> hard_topk_shared(torch::Tensor cats, torch::Tensor targets, int64_t k) {
  cats = id_tensor(cats, "categories"); targets = id_tensor(targets, "target categories");
  check_k(k);
  const int64_t n = cats.numel(), B = targets.numel();
  const int64_t *c = cats.data_ptr<int64_t>(), *t = targets.data_ptr<int64_t>();
  int64_t slots = 16;  // open addressing: category -> its group
  while (slots < 2 * B) slots *= 2;
  std::vector<int64_t> slot_category(slots), slot_group(slots, -1), group(B);
  auto find = [&](int64_t category) {
    const uint64_t h = (uint64_t)category * 0x9E3779B97F4A7C15ULL;
    int64_t i = (h ^ (h >> 29)) & (slots - 1);
    while (slot_group[i] >= 0 && slot_category[i] != category) i = (i + 1) & (slots - 1);
    return i;
  };
  int64_t G = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t i = find(t[b]);
    if (slot_group[i] < 0) slot_category[i] = t[b], slot_group[i] = G++;
    group[b] = slot_group[i];
  }
  std::vector<std::vector<int64_t>> found(G);
  int64_t open = k > 0 ? G : 0;  // categories still short of k
  for (int64_t p = n - 1; p >= 0 && open > 0; --p) {
    const int64_t g = slot_group[find(c[p])];
    if (g < 0 || (int64_t)found[g].size() == k) continue;
    found[g].push_back(p);
    if ((int64_t)found[g].size() == k) --open;
  }
  std::vector<std::vector<int64_t>> per_candidate(B);
  for (auto& f : found) std::reverse(f.begin(), f.end());
  for (int64_t b = 0; b < B; ++b) per_candidate[b] = found[group[b]];
  return concat_segments(per_candidate);
}

// SIM hard search: the k most recent positions whose category equals the target's, returned
// chronological per segment. Scans each segment backwards and stops at the k-th match.
std::vector<torch::Tensor> hard_topk(torch::Tensor cats, torch::Tensor targets,
                                     torch::Tensor starts, torch::Tensor ends, int64_t k) {
  cats = id_tensor(cats, "categories"); targets = id_tensor(targets, "target categories");
  check_k(k);
  check_segments(starts, ends, cats.numel(), targets.numel());
  const int64_t B = starts.numel();
  const int64_t *c = cats.data_ptr<int64_t>(), *t = targets.data_ptr<int64_t>();
  const int64_t *st = starts.data_ptr<int64_t>(), *en = ends.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> found(B);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      auto& f = found[b];
      for (int64_t p = en[b] - 1; p >= st[b] && (int64_t)f.size() < k; --p)
        if (c[p] == t[b]) f.push_back(p);
      std::reverse(f.begin(), f.end());
    }
  });
  return concat_segments(found);
}

TORCH_LIBRARY_IMPL(longseq, CPU, m) {
  m.impl("hard_topk", [](torch::Tensor cats, torch::Tensor targets, torch::Tensor starts,
                         torch::Tensor ends, int64_t k) {
    return two(hard_topk(cats, targets, starts, ends, k));
  });
  m.impl("hard_topk_shared", [](torch::Tensor cats, torch::Tensor targets, int64_t k) {
    return two(hard_topk_shared(cats, targets, k));
  });
}
