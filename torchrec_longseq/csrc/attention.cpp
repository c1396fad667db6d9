#include "common.h"

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

// the operators: no bias / no index as None (an empty bias is no bias too, as in the kernel)
TORCH_LIBRARY_IMPL(longseq, CPU, m) {
  m.impl("attention_forward",
         [](torch::Tensor qa, torch::Tensor keys, torch::Tensor offsets,
            std::optional<torch::Tensor> bias, std::optional<torch::Tensor> index) {
           const bool indexed = index.has_value();
           return two(attention_forward(
               qa, keys, offsets, bias.has_value() ? *bias : qa.new_zeros({0}),
               indexed ? *index : offsets.new_zeros({0}), indexed));
         });
  m.impl("attention_backward",
         [](torch::Tensor grad, torch::Tensor qa, torch::Tensor keys, torch::Tensor offsets,
            torch::Tensor weights, std::optional<torch::Tensor> index) {
           const bool indexed = index.has_value();
           return three(attention_backward(grad, qa, keys, offsets, weights,
                                           indexed ? *index : offsets.new_zeros({0}), indexed));
         });
}
