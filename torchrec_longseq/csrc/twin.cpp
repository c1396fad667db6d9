#include "common.h"

// 8 behaviors' dot products with q [w], each summed over j in order: the same sums, bit for bit,
// whichever path built the transposed block
SIMD_CLONES static void dot_lanes(const float* q, const float* kt, int64_t w, float* out) {
  KeyLanes acc = {};
  for (int64_t j = 0; j < w; ++j) {
    KeyLanes k;
    std::memcpy(&k, kt + j * KEY_LANES, sizeof k);
    acc += q[j] * k;
  }
  std::memcpy(out, &acc, sizeof acc);
}

// blocks of 8 transposed keys I[items[p], w:2w] + C[cats[p], w:2w] for p in [lo, hi) (the last
// block padded with zeros)
static void transposed_keys(const float* I, const int64_t* it, const float* C, const int64_t* ca,
                            int64_t lo, int64_t hi, int64_t w, std::vector<float>& kt) {
  const int64_t W = 2 * w, blocks = (hi - lo + KEY_LANES - 1) / KEY_LANES;
  kt.assign(blocks * w * KEY_LANES, 0.f);
  for (int64_t p = lo; p < hi; ++p) {
    const float *ki = I + it[p] * W + w, *kc = C + ca[p] * W + w;
    float* block = kt.data() + ((p - lo) / KEY_LANES) * w * KEY_LANES + (p - lo) % KEY_LANES;
    for (int64_t j = 0; j < w; ++j) block[j * KEY_LANES] = ki[j] + kc[j];
  }
}

// TWIN's search: score of p = scale * q_b . (I[items[p], w:2w] + C[cats[p], w:2w]) + bias[p],
// top k per segment (best first, ties to the more recent position). With `shared`, every
// segment is the same one history: the dot products are taken once per distinct (item,
// category) key (read and transposed once for all candidates), and the positions are grouped
// once into cells of one key within a run of one bias value (the bias is a time bucket's: a
// long history has a few cells per key), whose positions score alike. With at most half as
// many cells as positions, per candidate the k best cells give a bar that the k-th best
// position's score reaches, and only the positions of the cells at or above it are ranked.
std::vector<torch::Tensor> twin_topk_by_id(
    torch::Tensor item_rows, torch::Tensor items, torch::Tensor cat_rows, torch::Tensor cats,
    torch::Tensor queries, torch::Tensor bias, torch::Tensor starts, torch::Tensor ends, int64_t k,
    double scale, bool shared) {
  item_rows = item_rows.to(torch::kFloat32).contiguous();
  cat_rows = cat_rows.to(torch::kFloat32).contiguous();
  queries = queries.to(torch::kFloat32).contiguous(); bias = bias.to(torch::kFloat32).contiguous();
  items = id_tensor(items, "item ids"); cats = id_tensor(cats, "category ids");
  TORCH_CHECK(items.numel() == cats.numel() && bias.numel() == items.numel(),
              "one item id, category id and bias per behavior: got ", items.numel(), ", ",
              cats.numel(), " and ", bias.numel());
  check_k(k);
  check_segments(starts, ends, items.numel(), queries.size(0));
  const int64_t B = starts.numel(), w = queries.size(1), W = item_rows.size(1);
  TORCH_CHECK(W == 2 * w && cat_rows.size(1) == W, "rows must be [*, 2 w] for queries [B, w]");
  const float *I = item_rows.data_ptr<float>(), *C = cat_rows.data_ptr<float>();
  const float *q = queries.data_ptr<float>(), *bi = bias.data_ptr<float>();
  const int64_t *it = items.data_ptr<int64_t>(), *ca = cats.data_ptr<int64_t>();
  const int64_t *st = starts.data_ptr<int64_t>(), *en = ends.data_ptr<int64_t>();
  // one pass over the ids next to a dot product per behavior
  check_table_ids(it, items.numel(), item_rows.size(0), "item ids");
  check_table_ids(ca, cats.numel(), cat_rows.size(0), "category ids");
  // shared: the history's distinct (item, category) keys, transposed once; behavior[p] = key of
  // p; cell c = (key cell_key[c], bias cell_bias[c]) holds positions cpos[coff[c]..coff[c+1])
  std::vector<float> shared_kt, cell_bias;
  std::vector<int64_t> pair_i, pair_c, behavior, cell_key, cell, coff, cpos;
  int64_t U = 0, P = 0;
  bool by_cell = false;
  if (shared && B > 0) {
    const int64_t lo = st[0], n = en[0] - lo;
    group_pairs(it + lo, ca + lo, n, pair_i, pair_c, behavior);
    U = pair_i.size();
    transposed_keys(I, pair_i.data(), C, pair_c.data(), 0, U, w, shared_kt);
    // cells within runs of positions with one bias value (the bias is the time bucket's and the
    // history is in time order: a few dozen runs), a key's cell of the current run by array
    std::vector<int64_t> run_of_key(U, -1), cell_of_key(U);
    cell.resize(n);
    int64_t run = -1;
    for (int64_t p = 0; p < n; ++p) {
      if (p == 0 || std::memcmp(bi + lo + p, bi + lo + p - 1, sizeof(float)) != 0) ++run;
      const int64_t u = behavior[p];
      if (run_of_key[u] != run) {
        run_of_key[u] = run;
        cell_of_key[u] = cell_key.size();
        cell_key.push_back(u);
        cell_bias.push_back(bi[lo + p]);
      }
      cell[p] = cell_of_key[u];
    }
    P = cell_key.size();
    by_cell = 2 * P <= n;  // else ranking the positions is as cheap
    if (by_cell) positions_by_group(cell, P, lo, coff, cpos);
  }
  std::vector<std::vector<int64_t>> found(B);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dot, score, own_kt;
    std::vector<int64_t> idx;
    std::vector<std::pair<float, int64_t>> picked;
    const auto better = std::greater<std::pair<float, int64_t>>();
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = st[b], n = en[b] - lo;
      const int64_t keys = shared ? U : n, blocks = (keys + KEY_LANES - 1) / KEY_LANES;
      if (!shared) transposed_keys(I, it, C, ca, lo, lo + n, w, own_kt);
      const float* kt = shared ? shared_kt.data() : own_kt.data();
      dot.resize(blocks * KEY_LANES);
      for (int64_t blk = 0; blk < blocks; ++blk)
        dot_lanes(q + b * w, kt + blk * w * KEY_LANES, w, dot.data() + blk * KEY_LANES);
      const int64_t want = std::min(n, k);
      if (by_cell && want > 0) {
        score.resize(P);  // per cell: the score of each of its positions
        for (int64_t c = 0; c < P; ++c)
          score[c] = (float)(scale * dot[cell_key[c]]) + cell_bias[c];
        select_largest(score.data(), P, want, idx);  // the best cells; the last sets the bar
        const float bar = score[idx.back()];
        picked.clear();
        for (int64_t c = 0; c < P; ++c)
          if (score[c] >= bar)
            for (int64_t i = coff[c]; i < coff[c + 1]; ++i) picked.emplace_back(score[c], cpos[i]);
        if ((int64_t)picked.size() >= want) {  // always, unless a score is NaN
          std::nth_element(picked.begin(), picked.begin() + (want - 1), picked.end(), better);
          std::sort(picked.begin(), picked.begin() + want, better);
          for (int64_t i = 0; i < want; ++i) found[b].push_back(picked[i].second);
          continue;
        }
      }
      score.resize(n);
      if (shared) {
        for (int64_t p = 0; p < n; ++p) score[p] = (float)(scale * dot[behavior[p]]) + bi[lo + p];
      } else {
        for (int64_t p = 0; p < n; ++p) score[p] = (float)(scale * dot[p]) + bi[lo + p];
      }
      select_largest(score.data(), n, k, idx);
      for (int64_t i : idx) found[b].push_back(lo + i);
    }
  });
  return concat_segments(found);
}

TORCH_LIBRARY_IMPL(longseq, CPU, m) {
  m.impl("twin_topk_by_id",
         [](torch::Tensor item_rows, torch::Tensor items, torch::Tensor cat_rows,
            torch::Tensor cats, torch::Tensor queries, torch::Tensor bias, torch::Tensor starts,
            torch::Tensor ends, int64_t k, double scale, bool shared) {
           return two(twin_topk_by_id(item_rows, items, cat_rows, cats, queries, bias, starts,
                                      ends, k, scale, shared));
         });
}
