// The pieces of attention that the prompt and decode kernels share: scores of
// one query against a block's keys, the softmax's exponentials, and the
// weighted sum of a block's values. Included by paged_attention.cpp only.
#pragma once

#include "cpu_ops.h"

namespace {

constexpr int kMaxHeadDim = 512;

#ifdef __AVX2__
// Sums of each of eight vectors, as one vector: lane j = sum of the lanes of v[j].
inline __m256 hsum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

// What block_scores and weighted_rows call as they go, step(k) after k keys
// or rows, when the caller has nothing to do between them (the decode scan
// asks for the next block's lines there).
struct NoStep {
  void operator()(int64_t) const {}
};

// scores[t] = scale * <q, k row t> for the n (<= block size) rows of one block.
// D > 0: compiled for that head size; D == 0: any head size d (<= kMaxHeadDim).
template <int D, typename Step = NoStep>
inline void block_scores(const float* __restrict q, const float* __restrict kb, int64_t n, int64_t row_stride,
                         int d_runtime, float scale, float* __restrict scores, Step&& step = Step()) {
  const int dim = D > 0 ? D : d_runtime;
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (D > 0 && D % 8 == 0) {
    __m256 qv[D / 8];
    for (int c = 0; c < D / 8; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
    const __m256 sv = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {
      __m256 acc[8];
      step(8);
      for (int j = 0; j < 8; ++j) {
        const float* kr = kb + (i + j) * row_stride;
        acc[j] = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kr));
        for (int c = 1; c < D / 8; ++c) acc[j] = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kr + 8 * c), acc[j]);
      }
      _mm256_storeu_ps(scores + i, _mm256_mul_ps(hsum8(acc), sv));
    }
  }
#endif
  for (; i < n; ++i) {
    step(1);
    const float* kr = kb + i * row_stride;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int d = 0; d < dim; ++d) acc += q[d] * kr[d];
    scores[i] = acc * scale;
  }
}

// s[t] = exp(s[t] - max s) in place; returns their sum, and with max_out,
// the max.
inline float exp_shifted(float* __restrict s, int64_t len, float* max_out = nullptr) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t t = 0; t < len; ++t) m = s[t] > m ? s[t] : m;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < len; ++t) {
    s[t] = exp_nonpositive(s[t] - m);
    sum += s[t];
  }
  if (max_out) *max_out = m;
  return sum;
}

// acc[0, D) += sum over the n rows t of w[t] * v row t (rows row_stride apart).
template <int D, typename Step = NoStep>
inline void weighted_rows(float* __restrict acc, const float* __restrict w, const float* __restrict vb, int64_t n,
                          int64_t row_stride, int d_runtime, Step&& step = Step()) {
#ifdef __AVX2__
  if constexpr (D > 0 && D % 8 == 0) {
    // 64 dims at a time, accumulated in registers over the rows.
    for (int c0 = 0; c0 < D; c0 += 64) {
      constexpr int kMax = 8;
      const int nv = std::min(kMax, (D - c0) / 8);
      __m256 a[kMax];
      for (int c = 0; c < kMax; ++c) a[c] = c < nv ? _mm256_loadu_ps(acc + c0 + 8 * c) : _mm256_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        if (c0 == 0) step(1);
        const __m256 wv = _mm256_set1_ps(w[i]);
        const float* vr = vb + i * row_stride + c0;
        for (int c = 0; c < kMax; ++c)
          if (c < nv) a[c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(vr + 8 * c), a[c]);
      }
      for (int c = 0; c < kMax; ++c)
        if (c < nv) _mm256_storeu_ps(acc + c0 + 8 * c, a[c]);
    }
    return;
  }
#endif
  const int dim = D > 0 ? D : d_runtime;
  for (int64_t i = 0; i < n; ++i) {
    step(1);
    const float* vr = vb + i * row_stride;
    const float wi = w[i];
#pragma omp simd
    for (int d = 0; d < dim; ++d) acc[d] += wi * vr[d];
  }
}

}  // namespace
