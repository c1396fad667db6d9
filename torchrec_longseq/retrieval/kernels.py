"""Small compiled CPU kernels for the O(L) scans: ETA's Hamming top-k straight from the signature
tables, SIM's hard search, float top-k per segment (SIM soft search), TWIN's search and SDIM's
collisions; and for the ESU's per-behavior work, the jagged target attention with its key and
value projections absorbed (``target_attention``, forward and backward); and for serving, the
distinct history positions a request reads (``distinct_positions``) and the rows of several
tables side by side (``gather_rows``). Each has a torch-ops twin that the tests compare it with
and that GPU tensors use.

ETA's kernel:

``simhash_topk`` in torch ops makes ~15 passes over the N history values (gather the
signatures, expand the targets, xor, popcount, histogram, threshold, select). On CPU each pass
costs 5-30 ns per value, so at L = 10,000 the search dominates a training step. This kernel reads
each behavior's packed signatures from the per-item and per-category tables by id and popcounts
the xor with the candidate's signature (hardware popcount) into one byte per behavior; the
threshold distance (the k-th smallest) is guessed from every 8th distance and confirmed with
counting passes over the bytes, 16 at a time; the k closest are collected scanning from the most
recent behavior backwards (ties go to the more recent one), skipping 16 bytes at a time where
none is close enough. Samples run in parallel (``at::parallel_for``, OpenMP, on torch's thread
count). For one history shared by many candidates (serving) ``hamming_topk_shared`` computes the
distances once per distinct (item, category) behavior and collects positions per behavior.

TWIN's kernel scores 8 behaviors at a time from transposed key blocks (each dot product summed
in the same order on every path, so serving's shared search selects exactly what per-sample
search selects); the float top-k (TWIN, SIM soft) is one pass with a sampled threshold.

Built on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja, both in the
lock file / Debian; about a minute, cached in ``TORCH_EXTENSIONS_DIR``). The torch-ops
``simhash_topk`` stays the reference the tests compare it with, and the path for GPU tensors.
``TORCHREC_LONGSEQ_KERNELS=0`` turns the kernels off (then every device uses the torch ops).
"""

import os
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

// the float loops, compiled twice (x86-64-v3: AVX2 with FMA; and the baseline): the loader picks
// the one the CPU runs (GCC's target_clones), so the built module stays portable. (Each string of
// target_clones is a list of clones: "avx2,fma" would make an AVX2 clone without FMA and an FMA
// clone without AVX2.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SIMD_CLONES
#endif

// the helpers of a SIMD_CLONES function: inlined into each clone, so that they are compiled for
// its instruction set (called, they would be the baseline's)
#define FORCE_INLINE static inline __attribute__((always_inline))

// per-segment selections -> (indices [M], lengths [B])
static std::vector<torch::Tensor> concat_segments(const std::vector<std::vector<int64_t>>& found) {
  const int64_t B = found.size();
  auto lengths = torch::empty({B}, torch::kInt64);
  int64_t* len = lengths.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += (len[b] = found[b].size());
  auto indices = torch::empty({total}, torch::kInt64);
  int64_t* out = indices.data_ptr<int64_t>();
  for (const auto& f : found) out = std::copy(f.begin(), f.end(), out);
  return {indices, lengths};
}

// the kernels' checks of their inputs (what a caller gets wrong raises instead of reading out of
// bounds or truncating): ids of an integer type (widened to int64; a float id would be truncated,
// a bool read as 0 / 1), k >= 0, and segments [starts[b], ends[b]) inside the n values, one per
// target
static torch::Tensor id_tensor(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), what,
              " must be integer ids, got ", t.scalar_type());
  return t.to(torch::kInt64).contiguous();
}

static void check_k(int64_t k) { TORCH_CHECK(k >= 0, "k must be >= 0, got ", k); }

static void check_segments(torch::Tensor& starts, torch::Tensor& ends, int64_t n,
                           int64_t targets) {
  starts = id_tensor(starts, "starts"); ends = id_tensor(ends, "ends");
  const int64_t B = starts.numel();
  TORCH_CHECK(ends.numel() == B && targets == B, B, " segments for ", targets, " targets");
  const int64_t *st = starts.data_ptr<int64_t>(), *en = ends.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= st[b] && st[b] <= en[b] && en[b] <= n, "segment ", b, " = [", st[b], ", ",
                en[b], ") is not inside the ", n, " values");
}

// whether every one of ids[0..n) indexes a table of `rows` rows: the sign bit of id | (rows - 1
// - id) is set exactly when id < 0 or id >= rows, and or-ing them is one vectorised pass
static inline bool ids_inside(const int64_t* ids, int64_t n, int64_t rows) {
  int64_t outside = 0;
  for (int64_t i = 0; i < n; ++i) outside |= ids[i] | (rows - 1 - ids[i]);
  return outside >= 0;
}

// raises "<what> i is <ids[i]>, outside the <of>" for the first of ids[0..n) outside [0, rows)
// (the kernels read by id or index: they check instead of reading out of bounds)
static void check_ids(const int64_t* ids, int64_t n, int64_t rows, const std::string& what,
                      const std::string& of) {
  if (ids_inside(ids, n, rows)) return;
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK((uint64_t)ids[i] < (uint64_t)rows, what, " ", i, " is ", ids[i], ", outside the ",
                of);
}

// ids checked against a table of `rows` rows: "<what> at position i is .., outside the table of
// <rows> rows"
static void check_table_ids(const int64_t* ids, int64_t n, int64_t rows, const char* what) {
  check_ids(ids, n, rows, std::string(what) + " at position", c10::str("table of ", rows, " rows"));
}

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

// The distinct (a, c) id pairs of one history, in order of first occurrence: pair u is
// (pair_a[u], pair_c[u]) and behavior[p] the pair at position p (an open-addressing hash).
static void group_pairs(const int64_t* a, const int64_t* c, int64_t n,
                        std::vector<int64_t>& pair_a, std::vector<int64_t>& pair_c,
                        std::vector<int64_t>& behavior) {
  int64_t slots = 16;
  while (slots < 2 * n) slots *= 2;
  std::vector<int64_t> slot(slots, -1);
  pair_a.clear();
  pair_c.clear();
  behavior.resize(n);
  for (int64_t p = 0; p < n; ++p) {
    const uint64_t h = ((uint64_t)a[p] * 0x9E3779B97F4A7C15ULL) ^
                       ((uint64_t)c[p] * 0xC2B2AE3D27D4EB4FULL);
    int64_t i = (h ^ (h >> 29)) & (slots - 1);
    while (slot[i] >= 0 && !(pair_a[slot[i]] == a[p] && pair_c[slot[i]] == c[p]))
      i = (i + 1) & (slots - 1);
    if (slot[i] < 0) {
      slot[i] = pair_a.size();
      pair_a.push_back(a[p]);
      pair_c.push_back(c[p]);
    }
    behavior[p] = slot[i];
  }
}

// The positions of each group (a counting sort): group g's positions, ascending and offset by
// lo, are pos[off[g]..off[g + 1]), for group[p] in [0, G) the group of position p < n.
static void positions_by_group(const std::vector<int64_t>& group, int64_t G, int64_t lo,
                               std::vector<int64_t>& off, std::vector<int64_t>& pos) {
  const int64_t n = group.size();
  off.assign(G + 1, 0);
  pos.resize(n);
  for (int64_t p = 0; p < n; ++p) off[group[p] + 1] += 1;
  for (int64_t g = 0; g < G; ++g) off[g + 1] += off[g];
  std::vector<int64_t> fill(off.begin(), off.end() - 1);
  for (int64_t p = 0; p < n; ++p) pos[fill[group[p]]++] = lo + p;
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

// indices of the k largest values of s[0..n) (ties: larger position first), best first. One pass
// from the most recent value back: values go to a buffer while they beat the k-th best of the
// last compaction (strictly: an earlier position loses a tie); a full buffer is cut back to its
// best k (nth_element), so the pass is O(n) and most values cost one comparison.
static void select_largest(const float* s, int64_t n, int64_t k, std::vector<int64_t>& idx) {
  const int64_t want = std::min(n, k), cap = std::max<int64_t>(4 * want, 64);
  idx.clear();
  if (want == 0) return;
  std::vector<std::pair<float, int64_t>> buf;  // (score, position): a larger pair is better
  auto better = std::greater<std::pair<float, int64_t>>();
  auto cut = [&]() {
    std::nth_element(buf.begin(), buf.begin() + (want - 1), buf.end(), better);
    buf.resize(want);
  };
  bool cut_once = false;
  float worst = 0.f;  // the k-th best at the last cut
  if (n >= 64 * want) {
    // a guess from every 16th value, ranked like the (2 k + 64)-th of all: when at least k
    // values reach it, it is at most the k-th best, and the k best are among them
    std::vector<float> sample;
    for (int64_t i = 0; i < n; i += 16) sample.push_back(s[i]);
    const int64_t rank = std::min<int64_t>(sample.size() - 1, (2 * want + 64) / 16);
    std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
    const float guess = sample[rank];
    for (int64_t i = n - 1; i >= 0; --i)
      if (s[i] >= guess) buf.emplace_back(s[i], i);
    if ((int64_t)buf.size() >= want) n = 0;  // the scan below is not needed
    else buf.clear();
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    if (cut_once && !(s[i] > worst)) continue;
    buf.emplace_back(s[i], i);
    if ((int64_t)buf.size() == cap) {
      cut();
      worst = buf[want - 1].first;
      cut_once = true;
    }
  }
  if ((int64_t)buf.size() > want) cut();
  std::sort(buf.begin(), buf.end(), better);
  for (const auto& e : buf) idx.push_back(e.second);
}

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

// TWIN's keys of 8 behaviors, transposed: kt[j * 8 + lane] = key j of behavior `lane`
constexpr int64_t KEY_LANES = 8;
typedef float KeyLanes __attribute__((vector_size(KEY_LANES * sizeof(float))));

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

// ---- jagged multi-head target attention, projections absorbed ----
// logit[n,h] = qa[b,h,:] . z[r,:] (+ bias[r,h]) for the positions n of segment b, with r = index[n]
// when indexed (serving: each distinct behavior's row once, read by every candidate that
// retrieved it) and r = n otherwise; w = softmax over the segment per head; agg[b,h,:] = sum_n
// w[n,h] z[r,:]. qa = W_k,h^T q_h / sqrt(Dh) and out = W_v,h agg are done by the caller, so the
// per-behavior work is 2 H K multiply-adds instead of the 2 H Dh K of projecting every key and
// value. Heads go four at a time: one read of z[r] feeds four independent sums (one head at a
// time, each sum waits on its own previous add); the weighted sums over a segment stay in
// registers until its end (weighted_rows). Segments must not overlap (backward writes dz[n]
// per position).
template <typename T>
FORCE_INLINE T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
FORCE_INLINE void axpy(T a, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// out[h] = q[h K : (h + 1) K] . z for the H heads
template <typename T>
FORCE_INLINE void head_dots(const T* q, const T* z, int64_t H, int64_t K, T* out) {
  int64_t h = 0;
  for (; h + 4 <= H; h += 4) {
    const T *q0 = q + h * K, *q1 = q0 + K, *q2 = q1 + K, *q3 = q2 + K;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < K; ++k) {
      const T zk = z[k];
      s0 += q0[k] * zk; s1 += q1[k] * zk; s2 += q2[k] * zk; s3 += q3[k] * zk;
    }
    out[h] = s0; out[h + 1] = s1; out[h + 2] = s2; out[h + 3] = s3;
  }
  for (; h < H; ++h) out[h] = dot(q + h * K, z, K);
}

// out0[h], out1[h] = q[h K : (h + 1) K] . z0, . z1 for the H heads: two behaviors at a time,
// so each head row read feeds two sums, and eight sums (four heads) run side by side
template <typename T>
FORCE_INLINE void head_dots2(const T* q, const T* z0, const T* z1, int64_t H, int64_t K,
                              T* out0, T* out1) {
  head_dots(q, z0, H, K, out0);
  head_dots(q, z1, H, K, out1);
}

// float: spelled out in 8-lane vectors (GCC leaves eight `omp simd` reductions scalar)
FORCE_INLINE KeyLanes load_lanes(const float* p) {
  KeyLanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FORCE_INLINE void store_lanes(float* p, KeyLanes v) { std::memcpy(p, &v, sizeof v); }

// the lane sums of eight vectors, [sum a0, .., sum a3, sum b0, .., sum b3]: pairs of vectors
// are shuffled and added (a transposing reduction: 14 shuffles and 7 adds) instead of summing
// each vector's lanes on its own (a chain of shuffles and adds per vector)
FORCE_INLINE KeyLanes lane_sums8(KeyLanes a0, KeyLanes a1, KeyLanes a2, KeyLanes a3, KeyLanes b0,
                                 KeyLanes b1, KeyLanes b2, KeyLanes b3) {
  typedef int32_t Mask __attribute__((vector_size(KEY_LANES * sizeof(int32_t))));
  const Mask pairs_lo = {0, 1, 8, 9, 4, 5, 12, 13}, pairs_hi = {2, 3, 10, 11, 6, 7, 14, 15};
  const Mask quads_lo = {0, 2, 8, 10, 4, 6, 12, 14}, quads_hi = {1, 3, 9, 11, 5, 7, 13, 15};
  const Mask halves_lo = {0, 1, 2, 3, 8, 9, 10, 11}, halves_hi = {4, 5, 6, 7, 12, 13, 14, 15};
  auto pair = [&](KeyLanes x, KeyLanes y) {  // [x0+x2, x1+x3, y0+y2, y1+y3, x4+x6, ..]
    return __builtin_shuffle(x, y, pairs_lo) + __builtin_shuffle(x, y, pairs_hi);
  };
  auto quad = [&](KeyLanes x, KeyLanes y) {  // of two pairs: [sum x 0..3 per vector, 4..7]
    return __builtin_shuffle(x, y, quads_lo) + __builtin_shuffle(x, y, quads_hi);
  };
  const KeyLanes a = quad(pair(a0, a1), pair(a2, a3)), b = quad(pair(b0, b1), pair(b2, b3));
  return __builtin_shuffle(a, b, halves_lo) + __builtin_shuffle(a, b, halves_hi);
}
FORCE_INLINE void head_dots2(const float* q, const float* z0, const float* z1, int64_t H,
                             int64_t K, float* out0, float* out1) {
  int64_t h = 0;
  for (; h + 4 <= H; h += 4) {
    const float *q0 = q + h * K, *q1 = q0 + K, *q2 = q1 + K, *q3 = q2 + K;
    // eight named accumulators (an array of them is zeroed through memory, not in registers)
    KeyLanes a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    int64_t k = 0;
    for (; k + KEY_LANES <= K; k += KEY_LANES) {
      const KeyLanes x = load_lanes(z0 + k), y = load_lanes(z1 + k);
      const KeyLanes r0 = load_lanes(q0 + k), r1 = load_lanes(q1 + k);
      const KeyLanes r2 = load_lanes(q2 + k), r3 = load_lanes(q3 + k);
      a0 += r0 * x; a1 += r1 * x; a2 += r2 * x; a3 += r3 * x;
      b0 += r0 * y; b1 += r1 * y; b2 += r2 * y; b3 += r3 * y;
    }
    const KeyLanes sums = lane_sums8(a0, a1, a2, a3, b0, b1, b2, b3);
    float sa[4], sb[4];
    for (int j = 0; j < 4; ++j) sa[j] = sums[j], sb[j] = sums[4 + j];
    for (int j = 0; j < 4; ++j) {
      const float* qj = q + (h + j) * K;
      for (int64_t t = k; t < K; ++t) sa[j] += qj[t] * z0[t], sb[j] += qj[t] * z1[t];
      out0[h + j] = sa[j], out1[h + j] = sb[j];
    }
  }
  for (; h < H; ++h) out0[h] = dot(q + h * K, z0, K), out1[h] = dot(q + h * K, z1, K);
}

// the key row position n reads
FORCE_INLINE int64_t row(const int64_t* idx, int64_t n) { return idx ? idx[n] : n; }

// a[h K : (h + 1) K] = sum_n w[n H + h] z[row n] over the positions lo..hi, for the heads h
// from `first` on: the forward's weighted sum of the keys, the backward's dqa
template <typename T>
FORCE_INLINE void weighted_rows(const T* w, const T* z, const int64_t* idx, int64_t lo,
                                int64_t hi, int64_t H, int64_t K, T* a, int64_t first = 0) {
  for (int64_t h = first; h < H; ++h) {
    T* ah = a + h * K;
    std::fill(ah, ah + K, T(0));
    for (int64_t n = lo; n < hi; ++n) axpy(w[n * H + h], z + row(idx, n) * K, ah, K);
  }
}
// float: four heads x 16 key columns summed in eight registers over the whole segment, `a`
// written once (added to in memory behavior by behavior, each add waits on the last store;
// 8 columns at a time were 5-15% slower: twice the weight broadcasts and row reads per add)
FORCE_INLINE void weighted_rows(const float* w, const float* z, const int64_t* idx, int64_t lo,
                                int64_t hi, int64_t H, int64_t K, float* a) {
  int64_t h = 0;
  for (; h + 4 <= H; h += 4) {
    float *a0 = a + h * K, *a1 = a0 + K, *a2 = a1 + K, *a3 = a2 + K;
    int64_t k = 0;
    for (; k + 2 * KEY_LANES <= K; k += 2 * KEY_LANES) {
      KeyLanes c0 = {}, c1 = {}, c2 = {}, c3 = {}, d0 = {}, d1 = {}, d2 = {}, d3 = {};
      for (int64_t n = lo; n < hi; ++n) {
        const float *zn = z + row(idx, n) * K + k, *wn = w + n * H + h;
        const KeyLanes x = load_lanes(zn), y = load_lanes(zn + KEY_LANES);
        c0 += wn[0] * x; c1 += wn[1] * x; c2 += wn[2] * x; c3 += wn[3] * x;
        d0 += wn[0] * y; d1 += wn[1] * y; d2 += wn[2] * y; d3 += wn[3] * y;
      }
      store_lanes(a0 + k, c0); store_lanes(a1 + k, c1);
      store_lanes(a2 + k, c2); store_lanes(a3 + k, c3);
      store_lanes(a0 + k + KEY_LANES, d0); store_lanes(a1 + k + KEY_LANES, d1);
      store_lanes(a2 + k + KEY_LANES, d2); store_lanes(a3 + k + KEY_LANES, d3);
    }
    for (; k + KEY_LANES <= K; k += KEY_LANES) {
      KeyLanes c0 = {}, c1 = {}, c2 = {}, c3 = {};
      for (int64_t n = lo; n < hi; ++n) {
        const float *wn = w + n * H + h;
        const KeyLanes x = load_lanes(z + row(idx, n) * K + k);
        c0 += wn[0] * x; c1 += wn[1] * x; c2 += wn[2] * x; c3 += wn[3] * x;
      }
      store_lanes(a0 + k, c0); store_lanes(a1 + k, c1);
      store_lanes(a2 + k, c2); store_lanes(a3 + k, c3);
    }
    for (; k < K; ++k) {
      float c[4] = {0, 0, 0, 0};
      for (int64_t n = lo; n < hi; ++n)
        for (int j = 0; j < 4; ++j) c[j] += w[n * H + h + j] * z[row(idx, n) * K + k];
      a0[k] = c[0], a1[k] = c[1], a2[k] = c[2], a3[k] = c[3];
    }
  }
  weighted_rows<float>(w, z, idx, lo, hi, H, K, a, h);  // the heads left over
}

// x[i] = exp(x[i]) for x[i] <= 0 (softmax logits less their maximum). float: a loop the
// compiler vectorizes (libm's expf is a call per value, most of the attention's time at small K):
// x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' expf polynomial (about 1 ulp), 2^n from the
// exponent bits; below -87 (e^x < 2^-125) it returns e^-87, which no softmax weight notices.
FORCE_INLINE void exp_in_place(float* x, int64_t m) {
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) {
    const float v = x[i] < -87.0f ? -87.0f : x[i];
    const float n = std::floor(v * 1.44269504088896341f + 0.5f);
    const float r = v - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    x[i] = e * __builtin_bit_cast(float, bits);
  }
}
FORCE_INLINE void exp_in_place(double* x, int64_t m) {
  for (int64_t i = 0; i < m; ++i) x[i] = std::exp(x[i]);
}

// out += sum_h a[h] x[h K : (h + 1) K] + b[h] y[h K : (h + 1) K], two heads per pass over out
template <typename T>
FORCE_INLINE void head_combine(const T* a, const T* x, const T* b, const T* y, int64_t H,
                               int64_t K, T* out) {
  int64_t h = 0;
  for (; h + 4 <= H; h += 4) {
    const T *x0 = x + h * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
    const T *y0 = y + h * K, *y1 = y0 + K, *y2 = y1 + K, *y3 = y2 + K;
    const T a0 = a[h], a1 = a[h + 1], a2 = a[h + 2], a3 = a[h + 3];
    const T b0 = b[h], b1 = b[h + 1], b2 = b[h + 2], b3 = b[h + 3];
#pragma omp simd
    for (int64_t k = 0; k < K; ++k)
      out[k] += ((a0 * x0[k] + b0 * y0[k]) + (a1 * x1[k] + b1 * y1[k])) +
                ((a2 * x2[k] + b2 * y2[k]) + (a3 * x3[k] + b3 * y3[k]));
  }
  for (; h + 2 <= H; h += 2) {
    const T *x0 = x + h * K, *x1 = x0 + K, *y0 = y + h * K, *y1 = y0 + K;
    const T a0 = a[h], a1 = a[h + 1], b0 = b[h], b1 = b[h + 1];
#pragma omp simd
    for (int64_t k = 0; k < K; ++k)
      out[k] += (a0 * x0[k] + b0 * y0[k]) + (a1 * x1[k] + b1 * y1[k]);
  }
  for (; h < H; ++h) {
    axpy(a[h], x + h * K, out, K);
    axpy(b[h], y + h * K, out, K);
  }
}

template <typename T>
FORCE_INLINE void forward_sample(const T* q, const T* z, const int64_t* idx, const T* bias,
                                  int64_t lo, int64_t hi, int64_t H, int64_t K, T* a, T* w,
                                  T* top, T* sum) {
  for (int64_t h = 0; h < H; ++h) top[h] = -std::numeric_limits<T>::infinity(), sum[h] = 0;
  int64_t n = lo;
  for (; n + 2 <= hi; n += 2)
    head_dots2(q, z + row(idx, n) * K, z + row(idx, n + 1) * K, H, K, w + n * H,
               w + (n + 1) * H);
  if (n < hi) head_dots(q, z + row(idx, n) * K, H, K, w + n * H);
  for (n = lo; n < hi; ++n)
    for (int64_t h = 0; h < H; ++h) {
      if (bias) w[n * H + h] += bias[row(idx, n) * H + h];
      top[h] = std::max(top[h], w[n * H + h]);
    }
  for (n = lo; n < hi; ++n)
    for (int64_t h = 0; h < H; ++h) w[n * H + h] -= top[h];
  exp_in_place(w + lo * H, (hi - lo) * H);
  for (n = lo; n < hi; ++n)
    for (int64_t h = 0; h < H; ++h) sum[h] += w[n * H + h];
  for (int64_t h = 0; h < H; ++h) sum[h] = T(1) / sum[h];
  for (n = lo; n < hi; ++n)
    for (int64_t h = 0; h < H; ++h) w[n * H + h] *= sum[h];
  weighted_rows(w, z, idx, lo, hi, H, K, a);
}

template <typename T>
FORCE_INLINE void backward_sample(const T* g, const T* q, const T* z, const int64_t* idx,
                                   const T* w, int64_t lo, int64_t hi, int64_t H, int64_t K,
                                   T* dq, T* dz, T* dlogit, T* s) {
  for (int64_t h = 0; h < H; ++h) s[h] = 0;
  int64_t n = lo;  // dlogit holds dL/dw first
  for (; n + 2 <= hi; n += 2)
    head_dots2(g, z + row(idx, n) * K, z + row(idx, n + 1) * K, H, K, dlogit + n * H,
               dlogit + (n + 1) * H);
  if (n < hi) head_dots(g, z + row(idx, n) * K, H, K, dlogit + n * H);
  for (n = lo; n < hi; ++n)
    for (int64_t h = 0; h < H; ++h) s[h] += w[n * H + h] * dlogit[n * H + h];
  for (n = lo; n < hi; ++n) {
    T* dl = dlogit + n * H;
    for (int64_t h = 0; h < H; ++h) dl[h] = w[n * H + h] * (dl[h] - s[h]);
    head_combine(w + n * H, g, dl, q, H, K, dz + n * K);
  }
  weighted_rows(dlogit, z, idx, lo, hi, H, K, dq);
}

SIMD_CLONES static void forward_sample_f(const float* q, const float* z, const int64_t* idx,
                                         const float* bias, int64_t lo, int64_t hi, int64_t H,
                                         int64_t K, float* a, float* w, float* top, float* sum) {
  forward_sample(q, z, idx, bias, lo, hi, H, K, a, w, top, sum);
}
SIMD_CLONES static void backward_sample_f(const float* g, const float* q, const float* z,
                                          const int64_t* idx, const float* w, int64_t lo,
                                          int64_t hi, int64_t H, int64_t K, float* dq, float* dz,
                                          float* dlogit, float* s) {
  backward_sample(g, q, z, idx, w, lo, hi, H, K, dq, dz, dlogit, s);
}
static void forward_sample_any(const float* q, const float* z, const int64_t* idx,
                               const float* bias, int64_t lo, int64_t hi, int64_t H, int64_t K,
                               float* a, float* w, float* top, float* sum) {
  forward_sample_f(q, z, idx, bias, lo, hi, H, K, a, w, top, sum);
}
static void forward_sample_any(const double* q, const double* z, const int64_t* idx,
                               const double* bias, int64_t lo, int64_t hi, int64_t H, int64_t K,
                               double* a, double* w, double* top, double* sum) {
  forward_sample(q, z, idx, bias, lo, hi, H, K, a, w, top, sum);
}
static void backward_sample_any(const float* g, const float* q, const float* z,
                                const int64_t* idx, const float* w, int64_t lo, int64_t hi,
                                int64_t H, int64_t K, float* dq, float* dz, float* dlogit,
                                float* s) {
  backward_sample_f(g, q, z, idx, w, lo, hi, H, K, dq, dz, dlogit, s);
}
static void backward_sample_any(const double* g, const double* q, const double* z,
                                const int64_t* idx, const double* w, int64_t lo, int64_t hi,
                                int64_t H, int64_t K, double* dq, double* dz, double* dlogit,
                                double* s) {
  backward_sample(g, q, z, idx, w, lo, hi, H, K, dq, dz, dlogit, s);
}

// checks the shapes, the offsets and the index; returns the index pointer (nullptr unindexed)
static const int64_t* check_attention(const torch::Tensor& qa, const torch::Tensor& z,
                                      const torch::Tensor& offsets, const torch::Tensor& index,
                                      bool indexed) {
  TORCH_CHECK(qa.dim() == 3 && z.dim() == 2 && qa.size(2) == z.size(1),
              "attention: qa [B, H, K] and keys [N, K]");
  TORCH_CHECK(offsets.numel() == qa.size(0) + 1, "attention: offsets must be [B + 1]");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t B = qa.size(0), rows = indexed ? index.numel() : z.size(0);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= off[b] && off[b] <= off[b + 1] && off[b + 1] <= rows,
                "attention: offsets must be non-decreasing within the ", rows, " positions");
  if (!indexed) return nullptr;
  const int64_t* idx = index.data_ptr<int64_t>();
  check_ids(idx, rows, z.size(0), "attention: index", c10::str(z.size(0), " keys"));
  return idx;
}

// (qa [B, H, K], keys [N, K], offsets [B + 1], bias [N, H] or empty, index [M] if indexed)
// -> (agg [B, H, K], w [M or N, H])
std::vector<torch::Tensor> attention_forward(torch::Tensor qa, torch::Tensor z,
                                             torch::Tensor offsets, torch::Tensor bias,
                                             torch::Tensor index, bool indexed) {
  qa = qa.contiguous(); z = z.contiguous().to(qa.dtype());
  offsets = offsets.to(torch::kInt64).contiguous(); index = index.to(torch::kInt64).contiguous();
  const int64_t* idx = check_attention(qa, z, offsets, index, indexed);
  const bool has_bias = bias.numel() > 0;
  if (has_bias) bias = bias.contiguous().to(qa.dtype());
  const int64_t B = qa.size(0), H = qa.size(1), K = qa.size(2);
  TORCH_CHECK(!has_bias || (bias.dim() == 2 && bias.size(0) == z.size(0) && bias.size(1) == H),
              "attention: bias must be [", z.size(0), " keys, ", H, " heads], got ", bias.sizes());
  auto agg = torch::empty({B, H, K}, qa.options());
  auto w = torch::empty({indexed ? index.numel() : z.size(0), H}, qa.options());
  AT_DISPATCH_FLOATING_TYPES(qa.scalar_type(), "attention_forward", [&] {
    const scalar_t *q = qa.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? bias.data_ptr<scalar_t>() : nullptr;
    const int64_t* off = offsets.data_ptr<int64_t>();
    scalar_t *a = agg.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> top(H), sum(H);
      for (int64_t b = begin; b < end; ++b)
        forward_sample_any(q + b * H * K, zp, idx, bp, off[b], off[b + 1], H, K, a + b * H * K,
                           wp, top.data(), sum.data());
    });
  });
  return {agg, w};
}

// gradients of attention_forward's agg: (dqa [B, H, K], dz [M or N, K], dlogits [M or N, H]),
// per position: indexed, the caller adds them up per key row
std::vector<torch::Tensor> attention_backward(torch::Tensor dagg, torch::Tensor qa,
                                              torch::Tensor z, torch::Tensor offsets,
                                              torch::Tensor w, torch::Tensor index, bool indexed) {
  dagg = dagg.contiguous().to(qa.dtype()); qa = qa.contiguous(); z = z.contiguous();
  w = w.contiguous(); offsets = offsets.to(torch::kInt64).contiguous();
  index = index.to(torch::kInt64).contiguous();
  const int64_t* idx = check_attention(qa, z, offsets, index, indexed);
  const int64_t B = qa.size(0), H = qa.size(1), K = qa.size(2);
  auto dqa = torch::zeros_like(qa);
  auto dz = torch::zeros({w.size(0), K}, z.options());
  auto dlogit = torch::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(qa.scalar_type(), "attention_backward", [&] {
    const scalar_t *g = dagg.data_ptr<scalar_t>(), *q = qa.data_ptr<scalar_t>();
    const scalar_t *zp = z.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    scalar_t *dq = dqa.data_ptr<scalar_t>(), *dzp = dz.data_ptr<scalar_t>();
    scalar_t* dl = dlogit.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> s(H);
      for (int64_t b = begin; b < end; ++b)
        backward_sample_any(g + b * H * K, q + b * H * K, zp, idx, wp, off[b], off[b + 1], H, K,
                            dq + b * H * K, dzp, dl, s.data());
    });
  });
  return {dqa, dz, dlogit};
}

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

// Serving's distinct history positions: (used [U], inverse [M]), the positions of one history
// of n behaviors that `indices` [M] or its last `window` behaviors read, ascending, and each
// index's row among them (used[inverse[i]] = indices[i]; the window is used's last rows). A
// mark per position, instead of torch's fill, nonzero, cumsum and gather over the history.
std::vector<torch::Tensor> distinct_positions(torch::Tensor indices, int64_t n, int64_t window) {
  TORCH_CHECK(0 <= window && window <= n, "distinct_positions: window ", window, " outside [0, ",
              n, "]");
  indices = indices.to(torch::kInt64).contiguous();
  const int64_t m = indices.numel();
  const int64_t* idx = indices.data_ptr<int64_t>();
  check_ids(idx, m, n, "distinct_positions: index", c10::str("history of ", n));
  std::vector<int64_t> rank(n, -1);  // -1: not read; then the position's row among the used
  for (int64_t i = 0; i < m; ++i) rank[idx[i]] = 0;
  std::fill(rank.begin() + (n - window), rank.end(), 0);
  std::vector<int64_t> used;
  for (int64_t p = 0; p < n; ++p)
    if (rank[p] == 0) rank[p] = used.size(), used.push_back(p);
  auto inverse = torch::empty({m}, torch::kInt64);
  int64_t* inv = inverse.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) inv[i] = rank[idx[i]];
  auto out = torch::empty({(int64_t)used.size()}, torch::kInt64);
  std::copy(used.begin(), used.end(), out.data_ptr<int64_t>());
  return {out, inverse};
}

// rows [U, D_0 + D_1 + ..]: row u is [tables[0][ids[0][p]], tables[1][ids[1][p]], ..] with
// p = positions[u] (or u without positions): the rows of several tables, each read through its
// own id list, side by side, copied once (any one dtype; no autograd).
torch::Tensor gather_rows(std::vector<torch::Tensor> tables, std::vector<torch::Tensor> ids,
                          torch::Tensor positions, bool has_positions) {
  TORCH_CHECK(!tables.empty() && tables.size() == ids.size(),
              "gather_rows: a list of ids per table");
  const int64_t n = ids[0].numel();
  int64_t width = 0;
  for (size_t i = 0; i < tables.size(); ++i) {
    TORCH_CHECK(tables[i].dim() == 2 && tables[i].dtype() == tables[0].dtype(),
                "gather_rows: tables must be 2-D of one dtype");
    TORCH_CHECK(ids[i].dim() == 1 && ids[i].numel() == n, "gather_rows: id lists of one length");
    tables[i] = tables[i].contiguous();
    ids[i] = ids[i].to(torch::kInt64).contiguous();
    width += tables[i].size(1);
  }
  positions = positions.to(torch::kInt64).contiguous();
  const int64_t U = has_positions ? positions.numel() : n;
  const int64_t* pos = has_positions ? positions.data_ptr<int64_t>() : nullptr;
  if (pos) check_ids(pos, U, n, "gather_rows: position", c10::str(n, " ids"));
  const int64_t elem = tables[0].element_size();
  auto out = torch::empty({U, width}, tables[0].options());
  char* o = static_cast<char*>(out.data_ptr());
  int64_t column = 0;
  for (size_t i = 0; i < tables.size(); ++i) {
    const char* t = static_cast<const char*>(tables[i].data_ptr());
    const int64_t* id = ids[i].data_ptr<int64_t>();
    const int64_t rows = tables[i].size(0), bytes = tables[i].size(1) * elem;
    for (int64_t u = 0; u < U; ++u) {
      const int64_t r = id[pos ? pos[u] : u];
      TORCH_CHECK(0 <= r && r < rows, "gather_rows: id ", r, " outside the table of ", rows,
                  " rows");
      std::memcpy(o + (u * width + column) * elem, t + r * bytes, bytes);
    }
    column += tables[i].size(1);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("distinct_positions", &distinct_positions, "serving's distinct history positions");
  m.def("gather_rows", &gather_rows, "rows of several tables side by side, read through ids");
  m.def("hamming_topk_by_id", &hamming_topk_by_id, "Hamming top-k per jagged segment");
  m.def("hamming_topk_shared", &hamming_topk_shared, "Hamming top-k over one shared history");
  m.def("hard_topk", &hard_topk, "SIM hard search per jagged segment");
  m.def("hard_topk_shared", &hard_topk_shared, "SIM hard search over one shared history");
  m.def("float_topk", &float_topk, "float top-k per jagged segment");
  m.def("twin_topk_by_id", &twin_topk_by_id, "TWIN search per jagged segment");
  m.def("sdim_collisions", &sdim_collisions, "SDIM collisions per jagged segment");
  m.def("pack_signs", &pack_signs, "SimHash sign bits packed into int64 words");
  m.def("attention_forward", &attention_forward, "jagged target attention, absorbed projections");
  m.def("attention_backward", &attention_backward, "its gradients");
}
"""

_MODULE = None


def kernels_enabled() -> bool:
    return os.environ.get("TORCHREC_LONGSEQ_KERNELS", "1") != "0"


@contextmanager
def disabled() -> Iterator[None]:
    """Inside the block every device runs the torch ops, as with ``TORCHREC_LONGSEQ_KERNELS=0``
    (the variable is read at every call), e.g. to compare the two paths."""
    old = os.environ.get("TORCHREC_LONGSEQ_KERNELS")
    os.environ["TORCHREC_LONGSEQ_KERNELS"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCHREC_LONGSEQ_KERNELS"]
        else:
            os.environ["TORCHREC_LONGSEQ_KERNELS"] = old


def _module():
    global _MODULE
    if _MODULE is None:
        from torch.utils.cpp_extension import load_inline

        # the build runs `ninja` from PATH: make the one installed next to this Python (the
        # lock file's) findable when the virtualenv is not activated
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")

        # -fopenmp: at::parallel_for is an OpenMP loop in the headers (serial without it); the
        # module then needs libgomp.so.1, which resolves to the copy torch has already loaded;
        # -fno-trapping-math: nothing reads floating-point exception flags, and without it GCC
        # will not vectorize loops with a conditional (exp_in_place's clamp)
        _MODULE = load_inline(name="torchrec_longseq_kernels_v39", cpp_sources=[_SOURCE],
                              extra_cflags=["-O3", "-march=x86-64-v2", "-fopenmp",
                                            "-fno-trapping-math"],
                              extra_ldflags=["-fopenmp"], verbose=False)
    return _MODULE


def hamming_topk_by_id(
    item_table: torch.Tensor, item_ids: torch.Tensor, item_targets: torch.Tensor,
    category_table: torch.Tensor, category_ids: torch.Tensor, category_targets: torch.Tensor,
    offsets: Optional[torch.Tensor], k: int,
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
        offsets (Optional[Tensor]): ``[B + 1]`` history offsets, or ``None``: one history shared
            by all B candidates (serving).
        k (int): at most this many per sample.

    Returns:
        ``(indices [M], lengths [B])`` exactly as ``simhash_topk`` on the concatenated
        signatures (smallest distance first, ties to the later position).
    """
    if not _applies(item_table):
        return None
    if offsets is None:  # one history: each distinct (item, category) behavior hashed once
        indices, lengths = _module().hamming_topk_shared(item_table, item_ids, item_targets,
                                                         category_table, category_ids,
                                                         category_targets, int(k))
        return indices, lengths
    starts, ends = segments(offsets, item_ids.numel(), item_targets.size(0))
    indices, lengths = _module().hamming_topk_by_id(item_table, item_ids, item_targets,
                                                    category_table, category_ids,
                                                    category_targets, starts, ends, int(k))
    return indices, lengths


def pack_signs(projections: torch.Tensor) -> Optional[torch.Tensor]:
    """``retrieval.simhash.simhash_signatures``'s packing compiled (or ``None``): ``[N, m]``
    float32 projections -> ``[N, ceil(m / 64)]`` int64, bit ``i`` set where
    ``projections[:, i] > 0``."""
    if not _applies(projections) or projections.dtype != torch.float32:
        return None
    return _module().pack_signs(projections)


def segments(offsets: Optional[torch.Tensor], num_values: int,
             batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(starts [B], ends [B])`` of the jagged segments: from ``offsets [B + 1]``, or, for
    ``offsets=None``, every one of the ``batch`` candidates reading all ``num_values`` values (one
    user's history shared by its candidates, as in serving)."""
    if offsets is None:
        return (torch.zeros(batch, dtype=torch.long),
                torch.full((batch,), num_values, dtype=torch.long))
    return offsets[:-1], offsets[1:]


def _applies(t: torch.Tensor) -> bool:
    return kernels_enabled() and t.device.type == "cpu"


def hard_topk(history_category: torch.Tensor, offsets: Optional[torch.Tensor],
              target_category: torch.Tensor, k: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``retrieval.hard.hard_search`` compiled (or ``None``): each segment is scanned from its
    most recent behavior backwards and the scan stops at the ``k``-th match, so the cost is the
    distance back to the ``k``-th match, not L. ``offsets=None`` (one history, serving): one
    backward scan serves every candidate, stopping when each asked-for category has ``k``."""
    if not _applies(history_category):
        return None
    if offsets is None:  # one history: one scan collects every asked-for category's k
        indices, lengths = _module().hard_topk_shared(history_category, target_category, int(k))
        return indices, lengths
    starts, ends = segments(offsets, history_category.numel(), target_category.numel())
    indices, lengths = _module().hard_topk(history_category, target_category, starts, ends, int(k))
    return indices, lengths


def float_topk(scores: torch.Tensor, offsets: torch.Tensor,
               k: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``retrieval.topk.jagged_topk(scores, offsets, k)`` (largest first, ties to the later
    position) compiled: a partial sort per segment, O(L log k). ``None`` where it does not apply;
    scores must not be NaN."""
    if not _applies(scores) or scores.dtype != torch.float32:  # float64: the torch ops
        return None
    indices, lengths = _module().float_topk(scores.detach(), offsets[:-1], offsets[1:], int(k))
    return indices, lengths


def twin_topk_by_id(item_rows: torch.Tensor, items: torch.Tensor, category_rows: torch.Tensor,
                    categories: torch.Tensor, queries: torch.Tensor, bias: torch.Tensor,
                    offsets: Optional[torch.Tensor], k: int,
                    scale: float) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """TWIN's search in one pass per sample: score ``scale * q_b . (item_rows[i, w:] +
    category_rows[c, w:]) + bias`` for every behavior, read by id (``queries [B, w]``, rows
    ``[*, 2 w]``, ``bias [N]``), then the top ``k`` as ``float_topk``. ``None`` where it does not
    apply."""
    if not _applies(item_rows):
        return None
    starts, ends = segments(offsets, items.numel(), queries.size(0))
    # offsets None: one history, whose keys the kernel reads and transposes once
    indices, lengths = _module().twin_topk_by_id(item_rows, items, category_rows, categories,
                                                 queries.detach(), bias.detach(), starts, ends,
                                                 int(k), float(scale), offsets is None)
    return indices, lengths


def sdim_collisions(item_codes: torch.Tensor, items: torch.Tensor, category_codes: torch.Tensor,
                    categories: torch.Tensor, target_items: torch.Tensor,
                    target_categories: torch.Tensor, offsets: Optional[torch.Tensor], tau: int,
                    groups_per_word: int
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """SDIM's ``collision_weights`` read from the code tables (``[rows, 1]`` int64) by id, with a
    hash map per sample instead of a sort: ``(positions [U], lengths [B], weights [U, G])``, the
    distinct pairs in order of first occurrence. Ids must be below 2^31. ``None`` where it does
    not apply."""
    if not _applies(item_codes):
        return None
    positions, lengths, weights = _module().sdim_collisions(
        item_codes, items, category_codes, categories, target_items, target_categories,
        *segments(offsets, items.numel(), target_items.numel()), int(tau), int(groups_per_word))
    return positions, lengths, weights


def distinct_positions(indices: torch.Tensor, n: int,
                       window: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(used [U], inverse [M])``: the positions of a history of ``n`` behaviors that
    ``indices [M]`` or its last ``window`` behaviors read, ascending, and each index's row among
    them (``used[inverse] == indices``; the window is ``used``'s last ``window`` rows); ``None``
    where the kernel does not apply (``serving.distinct_positions`` has the torch ops)."""
    if not _applies(indices):
        return None
    used, inverse = _module().distinct_positions(indices, int(n), int(window))
    return used, inverse


def gather_rows(tables: List[torch.Tensor], ids: List[torch.Tensor],
                positions: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``[U, sum of widths]``: row ``u`` is ``[tables[0][ids[0][p]], tables[1][ids[1][p]], ...]``
    with ``p = positions[u]`` (``u`` for ``positions=None``), one copy instead of a gather per
    table and per id list and a concatenation; ``None`` where it does not apply (GPU, kernels
    off, or autograd recording: the copy has no gradient). Ids out of range raise an error."""
    if not all(_applies(t) for t in tables) or (
            torch.is_grad_enabled() and any(t.requires_grad for t in tables)):
        return None
    empty = torch.zeros(0, dtype=torch.long)
    return _module().gather_rows(tables, ids, empty if positions is None else positions,
                                 positions is not None)


class _TargetAttention(torch.autograd.Function):
    """``attention_forward`` / ``attention_backward`` as an autograd function."""

    @staticmethod
    def forward(ctx, qa: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
                bias: Optional[torch.Tensor], index: Optional[torch.Tensor]) -> torch.Tensor:
        empty = qa.new_zeros(0)
        rows = offsets.new_zeros(0) if index is None else index
        agg, weights = _module().attention_forward(qa, keys, offsets,
                                                   empty if bias is None else bias, rows,
                                                   index is not None)
        ctx.save_for_backward(qa, keys, offsets, weights, rows)
        ctx.has_bias, ctx.indexed = bias is not None, index is not None
        return agg

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        qa, keys, offsets, weights, rows = ctx.saved_tensors
        dqa, dkeys, dlogits = _module().attention_backward(grad, qa, keys, offsets, weights, rows,
                                                           ctx.indexed)
        if ctx.indexed:  # per position: added up per key row
            dkeys = keys.new_zeros(keys.shape).index_add_(0, rows, dkeys)
            dlogits = dlogits.new_zeros(keys.size(0), dlogits.size(1)).index_add_(0, rows, dlogits)
        return dqa, dkeys.to(keys.dtype), None, dlogits if ctx.has_bias else None, None


def target_attention(qa: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
                     bias: Optional[torch.Tensor],
                     index: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Softmax attention per jagged segment with the key projection absorbed into the query, or
    ``None`` where it does not apply (GPU, kernels off, not float32 / float64).

    ``logits[n, h] = qa[b, h] . keys[r] + bias[r, h]`` for the positions ``n`` of sample ``b``,
    with ``r = index[n]`` (or ``n`` without an index), softmax per sample and head, ``-> [B, H,
    K]`` the weighted sums of the keys (zeros for an empty sample). Differentiable in ``qa``,
    ``keys`` and ``bias``.

    Args:
        qa (Tensor): ``[B, H, K]`` queries in key space (``W_k,h^T q_h``, scaled).
        keys (Tensor): ``[N, K]`` behaviors, jagged by ``offsets [B + 1]`` (non-overlapping).
        bias (Optional[Tensor]): ``[N, H]`` logit biases.
        index (Optional[Tensor]): ``[M]`` rows of ``keys`` (and ``bias``) that the positions
            read, jagged by ``offsets``: serving's distinct behaviors, each keyed once and read by
            every candidate that retrieved it (as attending over ``keys[index]``, without the
            gather).
    """
    if (not _applies(qa) or qa.dtype not in (torch.float32, torch.float64)
            or keys.dtype != qa.dtype or (bias is not None and bias.dtype != qa.dtype)):
        return None
    return _TargetAttention.apply(qa, keys, offsets, bias, index)
