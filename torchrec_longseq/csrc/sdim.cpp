#include "common.h"

// SDIM: per segment, the distinct (item, category) pairs whose codes collide with the target's
// in at least one tau-bit group; first position, and per group count-if-collides.
std::vector<torch::Tensor> sdim_collisions(
    torch::Tensor item_codes, torch::Tensor items, torch::Tensor cat_codes, torch::Tensor cats,
    torch::Tensor target_items, torch::Tensor target_cats, torch::Tensor starts, torch::Tensor ends,
    int64_t tau, int64_t groups_per_word) {
  item_codes = item_codes.to(torch::kInt64).contiguous();
  cat_codes = cat_codes.to(torch::kInt64).contiguous();
  items = id_tensor(items, "item ids"); cats = id_tensor(cats, "category ids");
  target_items = id_tensor(target_items, "target items");
  target_cats = id_tensor(target_cats, "target categories");
  TORCH_CHECK(items.numel() == cats.numel() && target_items.numel() == target_cats.numel(),
              "one item and one category id each");
  check_segments(starts, ends, items.numel(), target_items.numel());
  TORCH_CHECK(item_codes.size(1) == 1 && cat_codes.size(1) == 1, "one code word per id");
  TORCH_CHECK(groups_per_word >= 1 && groups_per_word <= 32, "at most 64 signatures");
  const int64_t B = starts.numel(), G = 2 * groups_per_word;
  const int64_t *IC = item_codes.data_ptr<int64_t>(), *CC = cat_codes.data_ptr<int64_t>();
  const int64_t *it = items.data_ptr<int64_t>(), *ca = cats.data_ptr<int64_t>();
  const int64_t *ti = target_items.data_ptr<int64_t>(), *tc = target_cats.data_ptr<int64_t>();
  const int64_t *st = starts.data_ptr<int64_t>(), *en = ends.data_ptr<int64_t>();
  // one pass over the ids next to a hash-map update per behavior
  check_table_ids(it, items.numel(), item_codes.size(0), "item ids");
  check_table_ids(ca, cats.numel(), cat_codes.size(0), "category ids");
  check_table_ids(ti, B, item_codes.size(0), "target items");
  check_table_ids(tc, B, cat_codes.size(0), "target categories");
  const uint64_t group_mask = (tau >= 64) ? ~0ULL : ((1ULL << tau) - 1);
  std::vector<std::vector<int64_t>> found(B);
  std::vector<std::vector<float>> weights(B);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::unordered_map<int64_t, int64_t> slot;  // item * C + category -> index in found[b]
    std::vector<int64_t> count, mask;
    for (int64_t b = begin; b < end; ++b) {
      slot.clear(); count.clear(); mask.clear();
      const uint64_t target_i = IC[ti[b]], target_c = CC[tc[b]];
      for (int64_t p = st[b]; p < en[b]; ++p) {
        const uint64_t di = (uint64_t)IC[it[p]] ^ target_i, dc = (uint64_t)CC[ca[p]] ^ target_c;
        int64_t m = 0;
        for (int64_t g = 0; g < groups_per_word; ++g) {
          if (((di >> (g * tau)) & group_mask) == 0) m |= 1LL << g;
          if (((dc >> (g * tau)) & group_mask) == 0) m |= 1LL << (groups_per_word + g);
        }
        if (m == 0) continue;
        auto ins = slot.emplace(it[p] * (int64_t)(1LL << 31) + ca[p], (int64_t)count.size());
        if (ins.second) { found[b].push_back(p); count.push_back(0); mask.push_back(m); }
        count[ins.first->second] += 1;
      }
      auto& wb = weights[b];
      wb.assign(count.size() * G, 0.f);
      for (size_t u = 0; u < count.size(); ++u)
        for (int64_t g = 0; g < G; ++g)
          if ((mask[u] >> g) & 1) wb[u * G + g] = (float)count[u];
    }
  });
  auto out = concat_segments(found);
  auto w = torch::empty({out[0].numel(), G}, torch::kFloat32);
  float* wp = w.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    std::copy(weights[b].begin(), weights[b].end(), wp);
    wp += weights[b].size();
  }
  out.push_back(w);
  return out;
}

TORCH_LIBRARY_IMPL(longseq, CPU, m) {
  m.impl("sdim_collisions",
         [](torch::Tensor item_codes, torch::Tensor items, torch::Tensor cat_codes,
            torch::Tensor cats, torch::Tensor target_items, torch::Tensor target_cats,
            torch::Tensor starts, torch::Tensor ends, int64_t tau, int64_t groups_per_word) {
           return three(sdim_collisions(item_codes, items, cat_codes, cats, target_items,
                                        target_cats, starts, ends, tau, groups_per_word));
         });
}
