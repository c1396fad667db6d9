#include "common.h"

// the inputs of ETA's Hamming searches: int64 signature tables and targets [rows, W], and one
// item and one category id per behavior and per target, k >= 0
static void check_hamming_inputs(torch::Tensor& a_table, torch::Tensor& a_ids,
                                 torch::Tensor& a_targets, torch::Tensor& c_table,
                                 torch::Tensor& c_ids, torch::Tensor& c_targets, int64_t k) {
  for (auto* t : {&a_table, &a_targets, &c_table, &c_targets}) {
    TORCH_CHECK(t->dtype() == torch::kInt64 && t->dim() == 2, "signatures must be int64 [rows, W]");
    *t = t->contiguous();
  }
  a_ids = id_tensor(a_ids, "item ids"); c_ids = id_tensor(c_ids, "category ids");
  TORCH_CHECK(a_ids.numel() == c_ids.numel(), a_ids.numel(), " item ids but ", c_ids.numel(),
              " category ids");
  TORCH_CHECK(a_targets.size(0) == c_targets.size(0), "one item and one category target each");
  check_k(k);
}

// 16 bytes of distances as one vector (GCC/clang vector extensions: one SSE register)
template <typename D> struct VecOf;
template <> struct VecOf<uint8_t> { typedef uint8_t type __attribute__((vector_size(16))); };
template <> struct VecOf<uint16_t> { typedef uint16_t type __attribute__((vector_size(16))); };
template <typename D> using Vec = typename VecOf<D>::type;

template <typename D>
static inline Vec<D> load_vec(const D* d) {
  Vec<D> v;
  std::memcpy(&v, d, sizeof v);
  return v;
}

// how many of d[0..n) are <= t, a vector of distances at a time
template <typename D>
static int64_t count_at_most(const D* d, int64_t n, D t) {
  constexpr int64_t LANES = sizeof(Vec<D>) / sizeof(D), BLOCK = 255 * LANES;  // lanes count <= 255
  const Vec<D> tv = Vec<D>{} + t;
  int64_t total = 0, i = 0;
  for (int64_t s = 0; s < n; s += BLOCK) {
    const int64_t e = std::min(n, s + BLOCK);
    Vec<D> acc = {};
    for (i = s; i + LANES <= e; i += LANES) acc -= (Vec<D>)(load_vec(d + i) <= tv);  // true = -1
    for (int64_t j = 0; j < LANES; ++j) total += acc[j];
    for (; i < e; ++i) total += d[i] <= t;
  }
  return total;
}

// Positions lo + i of the `want` smallest d[0..n) (0 < want <= n), ties to the larger position,
// written to out smallest first (then larger position first). The threshold (the want-th
// smallest value) is guessed from every 8th value's histogram and confirmed or moved with
// counting passes; the chosen ones are collected scanning backwards, skipping whole blocks
// that hold nothing <= the threshold.
template <typename D>
static void nearest(const D* d, int64_t n, int64_t want, int64_t max_d, int64_t lo,
                    int64_t* out, std::vector<int64_t>& hist,
                    std::vector<std::pair<int64_t, int64_t>>& picked) {
  std::fill(hist.begin(), hist.end(), 0);
  int64_t sampled = 0;
  for (int64_t i = 0; i < n; i += 8, ++sampled) hist[d[i]] += 1;
  int64_t t = 0, below = 0;  // sample quantile want / n
  while (t < max_d && (below + hist[t]) * n < want * sampled) below += hist[t++];
  auto at_most = [&](int64_t v) { return count_at_most<D>(d, n, (D)v); };
  if (at_most(t) >= want) {
    while (t > 0 && at_most(t - 1) >= want) --t;
  } else {
    while (at_most(++t) < want) {}
  }
  int64_t ties = want - (t > 0 ? at_most(t - 1) : 0);  // taken at distance t
  picked.clear();
  constexpr int64_t LANES = sizeof(Vec<D>) / sizeof(D);
  const Vec<D> tv = Vec<D>{} + (D)t;
  for (int64_t end = n; end > 0; end -= LANES) {
    const int64_t begin = std::max<int64_t>(0, end - LANES);
    if (end - begin == LANES) {  // skip a whole vector with nothing <= t
      const Vec<D> hit = (Vec<D>)(load_vec(d + begin) <= tv);
      uint64_t words[sizeof hit / 8];
      std::memcpy(words, &hit, sizeof hit);
      uint64_t any = 0;
      for (uint64_t w : words) any |= w;
      if (!any) continue;
    }
    for (int64_t i = end - 1; i >= begin; --i)
      if (d[i] < t || (d[i] == t && ties-- > 0)) picked.emplace_back(d[i], -i);
  }
  std::sort(picked.begin(), picked.end());  // distance asc, position desc
  for (int64_t i = 0; i < want; ++i) out[i] = lo - picked[i].second;
}

// d[p] = popcount(A[a[p]] ^ ta) + popcount(C[c[p]] ^ tc) for p < n: the Hamming distance of
// the concatenated signature (rows of WA and WC words, read by id) to the target's.
template <typename D>
static void hamming_distances(const int64_t* A, const int64_t* a, int64_t WA, const int64_t* C,
                              const int64_t* c, int64_t WC, int64_t n, const int64_t* ta,
                              const int64_t* tc, D* d) {
  if (WA == 1 && WC == 1) {  // m <= 64 bits per block: one word each
    const uint64_t ta0 = ta[0], tc0 = tc[0];
    for (int64_t p = 0; p < n; ++p)
      d[p] = __builtin_popcountll((uint64_t)A[a[p]] ^ ta0) +
             __builtin_popcountll((uint64_t)C[c[p]] ^ tc0);
    return;
  }
  for (int64_t p = 0; p < n; ++p) {
    const int64_t *sa = A + a[p] * WA, *sc = C + c[p] * WC;
    int32_t x = 0;
    for (int64_t w = 0; w < WA; ++w) x += __builtin_popcountll((uint64_t)(sa[w] ^ ta[w]));
    for (int64_t w = 0; w < WC; ++w) x += __builtin_popcountll((uint64_t)(sc[w] ^ tc[w]));
    d[p] = x;
  }
}

// Per segment, the k behaviors nearest the candidate in Hamming distance (hamming_distances).
// The ids are not checked against the tables here: a check costs 30-65% of this scan (measured
// at L = 10k and 100k), so it is the caller's (check_batch in training, check_request in
// serving; documented on the modules).
std::vector<torch::Tensor> hamming_topk_by_id(
    torch::Tensor a_table, torch::Tensor a_ids, torch::Tensor a_targets,
    torch::Tensor c_table, torch::Tensor c_ids, torch::Tensor c_targets,
    torch::Tensor starts, torch::Tensor ends, int64_t k) {
  check_hamming_inputs(a_table, a_ids, a_targets, c_table, c_ids, c_targets, k);
  check_segments(starts, ends, a_ids.numel(), a_targets.size(0));
  const int64_t WA = a_table.size(1), WC = c_table.size(1), B = starts.numel();
  const int64_t max_d = 64 * (WA + WC);
  const int64_t *A = a_table.data_ptr<int64_t>(), *C = c_table.data_ptr<int64_t>();
  const int64_t *ai = a_ids.data_ptr<int64_t>(), *ci = c_ids.data_ptr<int64_t>();
  const int64_t a_rows = a_table.size(0), c_rows = c_table.size(0);
  const int64_t *at = a_targets.data_ptr<int64_t>(), *ct = c_targets.data_ptr<int64_t>();
  const int64_t *st = starts.data_ptr<int64_t>(), *en = ends.data_ptr<int64_t>();
  auto lengths = torch::empty({B}, torch::kInt64);
  int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) len[b] = std::max<int64_t>(0, std::min(en[b] - st[b], k));
  std::vector<int64_t> out_off(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) out_off[b + 1] = out_off[b] + len[b];
  auto indices = torch::empty({out_off[B]}, torch::kInt64);
  int64_t* out = indices.data_ptr<int64_t>();
  // distances in bytes when they fit (one word per block, m <= 64), else in 16 bits
  auto scan = [&](auto zero) {
    using D = decltype(zero);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<D> dist;
      std::vector<int64_t> hist(max_d + 1);
      std::vector<std::pair<int64_t, int64_t>> picked;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t lo = st[b], n = en[b] - lo;
        if (len[b] == 0) continue;
        // the scan reads the tables by id: each sample's ids are checked just before, in the
        // parallel loop and while they are in cache (an id of 2^31 used to segfault the scan)
        if (!ids_inside(ai + lo, n, a_rows) || !ids_inside(ci + lo, n, c_rows)) {
          check_ids(ai + lo, n, a_rows, c10::str("sample ", b, ": item ids at position"),
                    c10::str("table of ", a_rows, " rows (positions within the sample)"));
          check_ids(ci + lo, n, c_rows, c10::str("sample ", b, ": category ids at position"),
                    c10::str("table of ", c_rows, " rows (positions within the sample)"));
        }
        dist.resize(n);
        hamming_distances(A, ai + lo, WA, C, ci + lo, WC, n, at + b * WA, ct + b * WC,
                          dist.data());
        nearest(dist.data(), n, len[b], max_d, lo, out + out_off[b], hist, picked);
      }
    });
  };
  if (max_d <= 255) scan(uint8_t(0)); else scan(uint16_t(0));
  return {indices, lengths};
}

// ETA's search over one history shared by all B candidates, read as its U distinct (item,
// category) behaviors, each with its positions (group_pairs, then a counting sort). Per
// candidate the distances are computed once per distinct behavior, the threshold comes from
// their histogram weighted by occurrences, and positions are collected per behavior: all of
// those below the threshold, the most recent of those at it.
// The same (indices [B k], lengths [B]) as hamming_topk_by_id with every segment the whole
// history, in O(U + selected) per candidate instead of O(L); with U > L / 2 it is that scan.
std::vector<torch::Tensor> hamming_topk_shared(
    torch::Tensor a_table, torch::Tensor a_ids, torch::Tensor a_targets,
    torch::Tensor c_table, torch::Tensor c_ids, torch::Tensor c_targets, int64_t k) {
  check_hamming_inputs(a_table, a_ids, a_targets, c_table, c_ids, c_targets, k);
  const int64_t WA = a_table.size(1), WC = c_table.size(1), B = a_targets.size(0);
  const int64_t n = a_ids.numel(), max_d = 64 * (WA + WC);
  const int64_t want = std::max<int64_t>(0, std::min(n, k));
  const int64_t *A = a_table.data_ptr<int64_t>(), *C = c_table.data_ptr<int64_t>();
  const int64_t *ai = a_ids.data_ptr<int64_t>(), *ci = c_ids.data_ptr<int64_t>();
  check_table_ids(ai, n, a_table.size(0), "item ids");  // one history: checked up front
  check_table_ids(ci, n, c_table.size(0), "category ids");
  const int64_t *at = a_targets.data_ptr<int64_t>(), *ct = c_targets.data_ptr<int64_t>();
  auto lengths = torch::full({B}, want, torch::kInt64);
  auto indices = torch::empty({B * want}, torch::kInt64);
  int64_t* out = indices.data_ptr<int64_t>();
  if (want == 0) return {indices, lengths};
  std::vector<int64_t> pair_a, pair_c, behavior;
  group_pairs(ai, ci, n, pair_a, pair_c, behavior);
  const int64_t U = pair_a.size();
  if (2 * U > n) {  // few repeats: scanning the positions (their signatures read once) is cheaper
    auto positions = torch::arange(n, torch::kInt64);
    return hamming_topk_by_id(a_table.index_select(0, a_ids), positions, a_targets,
                              c_table.index_select(0, c_ids), positions, c_targets,
                              torch::zeros({B}, torch::kInt64), torch::full({B}, n, torch::kInt64),
                              k);
  }
  std::vector<int64_t> off, pos;  // positions of u: pos[off[u]..off[u+1]), ascending
  positions_by_group(behavior, U, 0, off, pos);
  // the distinct behaviors' signatures side by side (read in order, not by id) and their counts
  std::vector<int64_t> sa(U * WA), sc(U * WC), cnt(U), row(U);
  for (int64_t u = 0; u < U; ++u) {
    std::copy(A + pair_a[u] * WA, A + (pair_a[u] + 1) * WA, sa.begin() + u * WA);
    std::copy(C + pair_c[u] * WC, C + (pair_c[u] + 1) * WC, sc.begin() + u * WC);
    cnt[u] = off[u + 1] - off[u];
    row[u] = u;
  }
  auto scan = [&](auto zero) {  // distances in bytes when they fit, else in 16 bits
    using D = decltype(zero);
    constexpr int64_t LANES = sizeof(Vec<D>) / sizeof(D);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<D> du(U);
      std::vector<int64_t> hist(4 * (max_d + 1)), tied;
      std::vector<std::pair<int64_t, int64_t>> picked;
      for (int64_t b = begin; b < end; ++b) {
        hamming_distances(sa.data(), row.data(), WA, sc.data(), row.data(), WC, U, at + b * WA,
                          ct + b * WC, du.data());
        // occurrences per distance, in 4 interleaved histograms: distances cluster, and one
        // histogram would make each add wait for the previous add to the same count
        std::fill(hist.begin(), hist.end(), 0);
        int64_t u = 0;
        for (; u + 4 <= U; u += 4)
          for (int64_t j = 0; j < 4; ++j) hist[4 * du[u + j] + j] += cnt[u + j];
        for (; u < U; ++u) hist[4 * du[u]] += cnt[u];
        for (int64_t d = 0; d <= max_d; ++d)
          hist[d] = hist[4 * d] + hist[4 * d + 1] + hist[4 * d + 2] + hist[4 * d + 3];
        int64_t t = 0, below = 0;
        while (below + hist[t] < want) below += hist[t++];
        picked.clear();
        tied.clear();
        const Vec<D> tv = Vec<D>{} + (D)t;
        for (int64_t s = 0; s < U; s += LANES) {
          const int64_t e = std::min(U, s + LANES);
          if (e - s == LANES) {  // skip a whole vector of behaviors farther than t
            const Vec<D> hit = (Vec<D>)(load_vec(du.data() + s) <= tv);
            uint64_t words[sizeof hit / 8];
            std::memcpy(words, &hit, sizeof hit);
            uint64_t any = 0;
            for (uint64_t w : words) any |= w;
            if (!any) continue;
          }
          for (int64_t u = s; u < e; ++u) {
            if (du[u] < t) {
              for (int64_t i = off[u]; i < off[u + 1]; ++i) picked.emplace_back(du[u], -pos[i]);
            } else if (du[u] == t) {
              tied.insert(tied.end(), pos.begin() + off[u], pos.begin() + off[u + 1]);
            }
          }
        }
        const int64_t ties = want - below;  // the most recent of those at the threshold
        std::nth_element(tied.begin(), tied.begin() + (ties - 1), tied.end(),
                         std::greater<int64_t>());
        for (int64_t i = 0; i < ties; ++i) picked.emplace_back(t, -tied[i]);
        std::sort(picked.begin(), picked.end());  // distance asc, position desc
        for (int64_t i = 0; i < want; ++i) out[b * want + i] = -picked[i].second;
      }
    });
  };
  if (max_d <= 255) scan(uint8_t(0)); else scan(uint16_t(0));
  return {indices, lengths};
}

TORCH_LIBRARY_IMPL(longseq, CPU, m) {
  m.impl("hamming_topk_by_id",
         [](torch::Tensor a_table, torch::Tensor a_ids, torch::Tensor a_targets,
            torch::Tensor c_table, torch::Tensor c_ids, torch::Tensor c_targets,
            torch::Tensor starts, torch::Tensor ends, int64_t k) {
           return two(hamming_topk_by_id(a_table, a_ids, a_targets, c_table, c_ids, c_targets,
                                         starts, ends, k));
         });
  m.impl("hamming_topk_shared",
         [](torch::Tensor a_table, torch::Tensor a_ids, torch::Tensor a_targets,
            torch::Tensor c_table, torch::Tensor c_ids, torch::Tensor c_targets, int64_t k) {
           return two(hamming_topk_shared(a_table, a_ids, a_targets, c_table, c_ids, c_targets,
                                          k));
         });
}
