// Shared by the kernel families of torchrec_longseq (one .cpp per family, each registering its
// CPU kernels under the `longseq` namespace; the schemas are in registration.cpp): the includes,
// the SIMD clone macros, the checks of the inputs and the helpers that several families use
// (segment concatenation, distinct (a, c) pairs and counting sort, float top-k selection, TWIN's
// and the attention's 8-lane float vectors).
#pragma once
// torch/types.h: torch::Tensor and the factories, without torch/extension.h's Python headers
#include <torch/types.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
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
inline std::vector<torch::Tensor> concat_segments(const std::vector<std::vector<int64_t>>& found) {
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
inline torch::Tensor id_tensor(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), what,
              " must be integer ids, got ", t.scalar_type());
  return t.to(torch::kInt64).contiguous();
}

inline void check_k(int64_t k) { TORCH_CHECK(k >= 0, "k must be >= 0, got ", k); }

inline void check_segments(torch::Tensor& starts, torch::Tensor& ends, int64_t n,
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
inline void check_ids(const int64_t* ids, int64_t n, int64_t rows, const std::string& what,
                      const std::string& of) {
  if (ids_inside(ids, n, rows)) return;
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK((uint64_t)ids[i] < (uint64_t)rows, what, " ", i, " is ", ids[i], ", outside the ",
                of);
}

// ids checked against a table of `rows` rows: "<what> at position i is .., outside the table of
// <rows> rows"
inline void check_table_ids(const int64_t* ids, int64_t n, int64_t rows, const char* what) {
  check_ids(ids, n, rows, std::string(what) + " at position", c10::str("table of ", rows, " rows"));
}

// The distinct (a, c) id pairs of one history, in order of first occurrence: pair u is
// (pair_a[u], pair_c[u]) and behavior[p] the pair at position p (an open-addressing hash).
inline void group_pairs(const int64_t* a, const int64_t* c, int64_t n,
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
inline void positions_by_group(const std::vector<int64_t>& group, int64_t G, int64_t lo,
                               std::vector<int64_t>& off, std::vector<int64_t>& pos) {
  const int64_t n = group.size();
  off.assign(G + 1, 0);
  pos.resize(n);
  for (int64_t p = 0; p < n; ++p) off[group[p] + 1] += 1;
  for (int64_t g = 0; g < G; ++g) off[g + 1] += off[g];
  std::vector<int64_t> fill(off.begin(), off.end() - 1);
  for (int64_t p = 0; p < n; ++p) pos[fill[group[p]]++] = lo + p;
}

// indices of the k largest values of s[0..n) (ties: larger position first), best first. One pass
// from the most recent value back: values go to a buffer while they beat the k-th best of the
// last compaction (strictly: an earlier position loses a tie); a full buffer is cut back to its
// best k (nth_element), so the pass is O(n) and most values cost one comparison.
inline void select_largest(const float* s, int64_t n, int64_t k, std::vector<int64_t>& idx) {
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

// TWIN's keys of 8 behaviors, transposed: kt[j * 8 + lane] = key j of behavior `lane`
constexpr int64_t KEY_LANES = 8;
typedef float KeyLanes __attribute__((vector_size(KEY_LANES * sizeof(float))));

// the kernels return (indices, lengths) and the like as a vector; the operators as a tuple
inline std::tuple<torch::Tensor, torch::Tensor> two(const std::vector<torch::Tensor>& r) {
  return {r[0], r[1]};
}
inline std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> three(
    const std::vector<torch::Tensor>& r) {
  return {r[0], r[1], r[2]};
}
