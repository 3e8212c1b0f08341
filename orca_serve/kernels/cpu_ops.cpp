// CPU kernels for orca-serve, built on first use by orca_serve/kernels/__init__.py.
//
// rms_norm, silu_and_mul, rotary_embedding: the elementwise parts of a Llama
// layer in one pass over memory each. PyTorch runs them as chains of
// separate ops (pow, mean, rsqrt, mul, mul; chunk, silu, mul; cat, neg, mul,
// mul, add), each reading and writing the whole activation: at a 2048-token
// prefill that chain cost ~9 ms per layer, against ~2.7 ms here. add_rms_norm
// takes the residual add before each norm into the same pass, and write_kv
// puts a batch's new K/V rows into the paged pool (vLLM's reshape_and_cache):
// both replace torch ops whose per-call cost (~45 us each, 120 calls an
// iteration) counted at decode-sized batches.
//
// paged_attention: every query token of a mixed batch (decodes, prompts,
// prompt chunks) attends causally to its request's context directly in the
// paged KV pool, in one call per layer. The pure-PyTorch path gathers each
// request's blocks into a padded copy first (read + write + read of the
// context per layer) and loops over prefill chunks in Python; here each K/V
// row is read in place, and the query heads sharing a KV head (GQA) are done
// together, with no repetition of K/V. A decode (one query row) reads each
// block whole, every KV head at once, with the next block prefetched: a
// decode-heavy batch is bound by how fast one core streams scattered blocks
// (110 decodes over 340 tokens: ~6 ms per layer with a task per KV head,
// ~2.6-3 ms this way, on this project's 2-core machine). A batch of fewer
// decodes than threads cuts each decode's context into parts for the idle
// threads and merges their softmax sums after (as flash-decoding does).
// Prompt rows are register-tiled for head sizes that are multiples of 16,
// with the scores built transposed (keys x queries) so K is read in place:
// six prompts of 224-512 tokens took 0.80-0.82x the time of the previous
// tiling, which
// copied every 16-key tile of K into [D][16] for every task (itself
// 1.25-1.45x the per-row loop). P.V then runs over L1-sized chunks of keys,
// with the softmax max kept by the score tiles and the exponentials taken
// per chunk, and the queries transposed 8 x 8 in registers: those prompts
// took 0.86-0.89x the time again, chunks plus decodes 0.86-0.95x.
//
// pack_panels, panel_linear: the layers' matmuls against weights repacked once
// into 16-feature panels, for decode-sized and prefill-sized batches (see the
// section below).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxHeadDim = 512;

// exp(x) for x <= 0 (softmax after subtracting the max), written so the
// compiler vectorizes the loop that calls it: range reduction to 2^n * e^r with
// |r| <= ln2/2 and a degree-6 polynomial (relative error ~2e-7, float32 level).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
  float p = 1.3888888888888889e-3f;
  p = p * r + 8.3333333333333332e-3f;
  p = p * r + 4.1666666666666664e-2f;
  p = p * r + 1.6666666666666666e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#ifdef __AVX2__
// Sums of each of eight vectors, as one vector: lane j = sum of the lanes of v[j].
inline __m256 hsum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

// scores[t] = scale * <q, k row t> for the n (<= block size) rows of one block.
// D > 0: compiled for that head size; D == 0: any head size d (<= kMaxHeadDim).
template <int D>
inline void block_scores(const float* __restrict q, const float* __restrict kb, int64_t n, int64_t row_stride,
                         int d_runtime, float scale, float* __restrict scores) {
  const int dim = D > 0 ? D : d_runtime;
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (D > 0 && D % 8 == 0) {
    __m256 qv[D / 8];
    for (int c = 0; c < D / 8; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
    const __m256 sv = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {
      __m256 acc[8];
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
template <int D>
inline void weighted_rows(float* __restrict acc, const float* __restrict w, const float* __restrict vb, int64_t n,
                          int64_t row_stride, int d_runtime) {
#ifdef __AVX2__
  if constexpr (D > 0 && D % 8 == 0) {
    // 64 dims at a time, accumulated in registers over the rows.
    for (int c0 = 0; c0 < D; c0 += 64) {
      constexpr int kMax = 8;
      const int nv = std::min(kMax, (D - c0) / 8);
      __m256 a[kMax];
      for (int c = 0; c < kMax; ++c) a[c] = c < nv ? _mm256_loadu_ps(acc + c0 + 8 * c) : _mm256_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
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
    const float* vr = vb + i * row_stride;
    const float wi = w[i];
#pragma omp simd
    for (int d = 0; d < dim; ++d) acc[d] += wi * vr[d];
  }
}

// Query rows [j0, j1) of one request and one KV head. Row j sits at position
// first_pos + j and attends causally to context positions [0, first_pos + j]
// (a decode is the one row at the end of its context). q/out rows are
// q_row_stride / out_row_stride floats apart; within a row, head h*group+g
// reads KV head h. K/V pool rows are [kv_heads, D]: row_stride = kv_heads * D.
// scores: scratch of group * (first_pos + j1) floats.
template <int D>
void attend_rows(const float* __restrict q, int64_t q_row_stride, float* __restrict out, int64_t out_row_stride,
                 const float* __restrict k_cache, const float* __restrict v_cache, const int64_t* __restrict blocks,
                 int64_t first_pos, int64_t j0, int64_t j1, int64_t block_size, int64_t kv_heads, int64_t h,
                 int64_t group, int d_runtime, float scale, float* __restrict scores) {
  const int D_ = D > 0 ? D : d_runtime;
  const int64_t row_stride = kv_heads * D_;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t len = first_pos + j + 1;
    const float* qrow = q + j * q_row_stride + h * group * D_;
    float* orow = out + j * out_row_stride + h * group * D_;
    for (int64_t t0 = 0; t0 < len; t0 += block_size) {
      const int64_t n = std::min(block_size, len - t0);
      const float* kb = k_cache + blocks[t0 / block_size] * block_size * row_stride + h * D_;
      for (int64_t g = 0; g < group; ++g)
        block_scores<D>(qrow + g * D_, kb, n, row_stride, D_, scale, scores + g * len + t0);
    }
    for (int64_t g = 0; g < group; ++g) {
      float* s = scores + g * len;
      const float inv = 1.f / exp_shifted(s, len);
      float acc[D > 0 ? D : kMaxHeadDim];
      std::fill(acc, acc + D_, 0.f);
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const int64_t n = std::min(block_size, len - t0);
        const float* vb = v_cache + blocks[t0 / block_size] * block_size * row_stride + h * D_;
        weighted_rows<D>(acc, s + t0, vb, n, row_stride, D_);
      }
#pragma omp simd
      for (int d = 0; d < D_; ++d) orow[g * D_ + d] = acc[d] * inv;
    }
  }
}



// Asks for part `part` of `parts` of a block's rows ahead of use, into L2.
// One core keeps only a few misses in flight and its prefetcher stops at each
// 4 KiB page, so a decode's scan over scattered blocks runs at a third of the
// bandwidth without this; spreading the requests over the work on the
// current block keeps them from piling up. Into L2, not L1: on Zen 4 (32-128
// decodes over 200-450 tokens in random blocks) that took 0.62-0.73x the
// time, 14.6-19 -> 23-27 GB/s. Likely why (not measured directly): a
// prefetch to L1 holds one of L1's few miss buffers until its line arrives,
// so fewer lines were in flight; from L2 the block's reads are cheap.
inline void prefetch_part(const float* block, int64_t floats, int64_t part, int64_t parts) {
#ifdef __AVX2__
  const int64_t lines = (floats + 15) / 16, begin = lines * part / parts, end = lines * (part + 1) / parts;
  for (int64_t i = begin; i < end; ++i) _mm_prefetch(reinterpret_cast<const char*>(block + 16 * i), _MM_HINT_T1);
#endif
}

// Blocks a decode's scan prefetches ahead of use (1, 2 and 3 measured with
// L1 prefetches on Zen 3, 1 and 2 into L2 on Zen 4; 1 was best or even).
constexpr int64_t kAhead = 1;

// Query vectors of a prompt task padded to whole 16-wide columns, and the
// scratch floats attend_rows_tiled needs for nq of them over max_len keys
// (qt and the accumulators [nq][d], the scores, three per-query vectors).
inline int64_t padded_queries(int64_t nq) { return (nq + 15) / 16 * 16; }
inline int64_t tiled_scratch(int64_t nq, int64_t max_len, int64_t d) { return padded_queries(nq) * (2 * d + max_len + 3); }

#ifdef __AVX2__
// Prompt rows, register-tiled (head sizes that are multiples of 16). A task's
// query vectors (rows x the KV head's group) are transposed once into
// qt [D][nq_pad] (8 x 8 register transposes); scores are built transposed,
// st [key][query] = K Q^T, 6 keys x 16 queries per register tile: per d, 2
// loads of qt and 6 broadcasts of K values read in place from the pool's rows,
// for 12 FMAs. Nothing per key is copied (an earlier version transposed every
// 16-key tile of K for every task). Softmax runs down each query's column,
// vectorized across queries: the score tiles keep the column max, and the
// exponentials are taken chunk by chunk just before P.V reads them. P.V runs
// 6 queries x 16 dims per tile, the 6 weights of a key contiguous in its st
// row, over one kPvKeys chunk of keys at a time so the chunk's V rows and
// weights stay in L1 for every tile (walking the whole context per tile read
// each V row from L2 once per tile and 16-dim slice). Same contract as
// attend_rows; scratch: tiled_scratch floats.
constexpr int kKeyTile = 6;    // keys per score tile
constexpr int kQueryTile = 6;  // queries per P.V tile
constexpr int64_t kPvKeys = 32;  // keys per P.V chunk (V rows and weights kept in L1)

// st rows t0 + r (r < KT), columns [c0, c0 + 16): scale * <key row r, query c>.
template <int D, int KT, bool Max>
inline void score_tile_t(const float* const* krow, const float* __restrict qt, int64_t nq_pad, float scale,
                         float* __restrict st_rows, int64_t c0, float* __restrict mx) {
  __m256 acc[KT][2];
  for (int r = 0; r < KT; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int d = 0; d < D; ++d) {
    const __m256 q0 = _mm256_loadu_ps(qt + d * nq_pad + c0), q1 = _mm256_loadu_ps(qt + d * nq_pad + c0 + 8);
    for (int r = 0; r < KT; ++r) {
      const __m256 kb = _mm256_broadcast_ss(krow[r] + d);
      acc[r][0] = _mm256_fmadd_ps(kb, q0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(kb, q1, acc[r][1]);
    }
  }
  const __m256 sv = _mm256_set1_ps(scale);
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
  for (int r = 0; r < KT; ++r) {
    acc[r][0] = _mm256_mul_ps(acc[r][0], sv);
    acc[r][1] = _mm256_mul_ps(acc[r][1], sv);
    _mm256_storeu_ps(st_rows + r * nq_pad + c0, acc[r][0]);
    _mm256_storeu_ps(st_rows + r * nq_pad + c0 + 8, acc[r][1]);
    if (Max) {
      m0 = _mm256_max_ps(m0, acc[r][0]);
      m1 = _mm256_max_ps(m1, acc[r][1]);
    }
  }
  if (Max) {
    _mm256_storeu_ps(mx + c0, _mm256_max_ps(m0, _mm256_loadu_ps(mx + c0)));
    _mm256_storeu_ps(mx + c0 + 8, _mm256_max_ps(m1, _mm256_loadu_ps(mx + c0 + 8)));
  }
}

// dst[c * ld + r] = rows[r][c] for r, c < 8: an 8 x 8 block transposed in
// registers (the classic unpack / shuffle / permute sequence, 24 shuffles).
inline void transpose8(const float* const* rows, float* __restrict dst, int64_t ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[i]);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// acc[r][d0, d0 + 16) += sum over keys t in [t0, t1) of st[t][c0 + r] * v row t,
// for QT queries whose accumulators are rows of acc (D floats apart).
template <int D, int QT>
inline void pv_chunk_t(const float* __restrict st, int64_t nq_pad, int64_t c0, const float* const* __restrict vrow,
                       int64_t t0, int64_t t1, int d0, float* __restrict acc) {
  __m256 a[QT][2];
  for (int r = 0; r < QT; ++r) {
    a[r][0] = _mm256_loadu_ps(acc + r * D + d0);
    a[r][1] = _mm256_loadu_ps(acc + r * D + d0 + 8);
  }
  for (int64_t t = t0; t < t1; ++t) {
    const float* v = vrow[t - t0] + d0;
    const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
    const float* pw = st + t * nq_pad + c0;
    for (int r = 0; r < QT; ++r) {
      const __m256 pb = _mm256_broadcast_ss(pw + r);
      a[r][0] = _mm256_fmadd_ps(pb, v0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(pb, v1, a[r][1]);
    }
  }
  for (int r = 0; r < QT; ++r) {
    _mm256_storeu_ps(acc + r * D + d0, a[r][0]);
    _mm256_storeu_ps(acc + r * D + d0 + 8, a[r][1]);
  }
}

template <int D>
void attend_rows_tiled(const float* __restrict q, int64_t q_row_stride, float* __restrict out, int64_t out_row_stride,
                       const float* __restrict k_cache, const float* __restrict v_cache,
                       const int64_t* __restrict blocks, int64_t first_pos, int64_t j0, int64_t j1,
                       int64_t block_size, int64_t kv_heads, int64_t h, int64_t group, int /*d_runtime*/,
                       float scale, float* __restrict scratch) {
  static_assert(D % 16 == 0, "tiles are 16 wide");
  const int64_t row_stride = kv_heads * D, nq = (j1 - j0) * group, nq_pad = padded_queries(nq);
  const int64_t len_max = first_pos + j1;
  float* qt = scratch;                   // [D][nq_pad]
  float* st = qt + D * nq_pad;           // [len_max][nq_pad]
  float* mx = st + len_max * nq_pad;     // [nq_pad] each query's max score
  float* sum = mx + nq_pad;              // [nq_pad]
  float* lenf = sum + nq_pad;            // [nq_pad] each query's context length
  // Query vector i = (row j0 + i / group, head h * group + i % group); padding
  // columns are zero queries over one key, computed and never written out.
  alignas(32) static const float zeros[D] = {};
  const float* qv[8];
  for (int64_t i0 = 0; i0 < nq_pad; i0 += 8) {
    for (int64_t i = i0; i < i0 + 8; ++i) {
      qv[i - i0] = i < nq ? q + (j0 + i / group) * q_row_stride + (h * group + i % group) * D : zeros;
      lenf[i] = i < nq ? static_cast<float>(first_pos + j0 + i / group + 1) : 1.f;
    }
    for (int d = 0; d < D; d += 8) {
      transpose8(qv, qt + d * nq_pad + i0, nq_pad);
      for (auto& p : qv) p += 8;
    }
  }
  // Key t's row of KV head h in a cache (K or V).
  auto row_at = [&](const float* cache, int64_t t) {
    return cache + (blocks[t / block_size] * block_size + t % block_size) * row_stride + h * D;
  };
  // Keys before the task's first causal length are seen by every query of it:
  // their score tiles keep each column's max as they go. Only the last few
  // keys (past that length for some queries) need a masked pass.
  std::fill(mx, mx + nq_pad, -INFINITY);
  std::fill(sum, sum + nq_pad, 0.f);
  const int64_t seen_by_all = first_pos + j0 + 1;
  const float* kr[kKeyTile];
  int64_t t = 0;
  for (; t + kKeyTile <= len_max; t += kKeyTile) {
    for (int r = 0; r < kKeyTile; ++r) kr[r] = row_at(k_cache, t + r);
    const bool seen = t + kKeyTile <= seen_by_all;
    for (int64_t c0 = 0; c0 < nq_pad; c0 += 16)
      (seen ? score_tile_t<D, kKeyTile, true> : score_tile_t<D, kKeyTile, false>)(kr, qt, nq_pad, scale,
                                                                                  st + t * nq_pad, c0, mx);
  }
  const int64_t masked_from = std::min(t, seen_by_all / kKeyTile * kKeyTile);
  for (; t < len_max; ++t) {
    kr[0] = row_at(k_cache, t);
    for (int64_t c0 = 0; c0 < nq_pad; c0 += 16) score_tile_t<D, 1, false>(kr, qt, nq_pad, scale, st + t * nq_pad, c0, mx);
  }
  for (t = masked_from; t < len_max; ++t) {
    const float* row = st + t * nq_pad;
    const float tf = static_cast<float>(t);
#pragma omp simd
    for (int64_t i = 0; i < nq_pad; ++i) mx[i] = tf < lenf[i] && row[i] > mx[i] ? row[i] : mx[i];
  }
  // P.V key chunk by key chunk, accumulating in acc [nq][D].
  float* acc = lenf + nq_pad;  // [nq][D]
  std::fill(acc, acc + nq * D, 0.f);
  const float* vr[kPvKeys];
  for (int64_t k0 = 0; k0 < len_max; k0 += kPvKeys) {
    const int64_t k1 = std::min(len_max, k0 + kPvKeys);
    for (int64_t tk = k0; tk < k1; ++tk) {
      vr[tk - k0] = row_at(v_cache, tk);
      // Softmax weights of this chunk's keys, computed here so their rows are
      // still in L1 for the tiles below; past a query's causal length: zero.
      float* row = st + tk * nq_pad;
      const float tf = static_cast<float>(tk);
#pragma omp simd
      for (int64_t i = 0; i < nq_pad; ++i) {
        const float e = tf < lenf[i] ? exp_nonpositive(row[i] - mx[i]) : 0.f;
        row[i] = e;
        sum[i] += e;
      }
    }
    int64_t i = 0;
    for (; i + kQueryTile <= nq; i += kQueryTile) {
      // Keys past the tile's longest causal length have zero weight for all of it.
      const int64_t end = std::min(k1, first_pos + j0 + (i + kQueryTile - 1) / group + 1);
      if (end > k0)
        for (int d0 = 0; d0 < D; d0 += 16) pv_chunk_t<D, kQueryTile>(st, nq_pad, i, vr, k0, end, d0, acc + i * D);
    }
    for (; i < nq; ++i) {
      const int64_t end = std::min(k1, first_pos + j0 + i / group + 1);
      if (end > k0)
        for (int d0 = 0; d0 < D; d0 += 16) pv_chunk_t<D, 1>(st, nq_pad, i, vr, k0, end, d0, acc + i * D);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    float* o = out + (j0 + i / group) * out_row_stride + (h * group + i % group) * D;
    const float s = 1.f / sum[i];
#pragma omp simd
    for (int d = 0; d < D; ++d) o[d] = acc[i * D + d] * s;
  }
}
#endif

// Calls f(rows of KV head h in the block, first position t0, rows n, query
// head hd) for each block of context positions [begin, end) (begin a block
// boundary) and each query head hd (h = hd / group), block by block,
// prefetching the block kAhead ahead.
template <typename F>
inline void scan_blocks(const float* cache, const int64_t* blocks, int64_t begin, int64_t end, int64_t block_size,
                        int64_t kv_heads, int64_t group, int head_dim, F&& f) {
  const int64_t row_stride = kv_heads * head_dim, heads = kv_heads * group;
  for (int64_t t0 = begin; t0 < end; t0 += block_size) {
    const int64_t n = std::min(block_size, end - t0);
    const float* block = cache + blocks[t0 / block_size] * block_size * row_stride;
    const int64_t ahead = t0 + kAhead * block_size;
    const float* next = ahead < end ? cache + blocks[ahead / block_size] * block_size * row_stride : nullptr;
    const int64_t next_floats = next ? std::min(block_size, end - ahead) * row_stride : 0;
    for (int64_t hd = 0; hd < heads; ++hd) {
      if (next) prefetch_part(next, next_floats, hd, heads);
      f(block + (hd / group) * head_dim, t0, n, hd);
    }
  }
}

// A batch with fewer tasks than threads (one user's decode) cuts each
// decode's context into parts, each its own task, merged after. One task
// runs on one core, and one core reads scattered KV blocks at ~12.5 GB/s
// here (Zen 4) against 17.5-21 GB/s for two: a lone decode kept one core
// for all of its attention. Parts of about kDecodePartBlocks blocks, as many
// as makes a multiple of the threads, none under kDecodePartMinBlocks.
// Side by side, a lone decode of 600-8000 tokens (30 layers cycling) took
// 0.66-0.76x the time cut. Larger batches are not cut: there every thread
// has tasks already, and cutting 100 decodes of 310 tokens in two took 1.06x
// the time (each part starts on a block that was not prefetched).
constexpr int64_t kDecodePartBlocks = 16;
constexpr int64_t kDecodePartMinBlocks = 4;

// Parts to cut a decode of `blocks` KV blocks into (1: none).
inline int64_t decode_parts(int64_t blocks, int64_t threads) {
  const int64_t want = (blocks + kDecodePartBlocks - 1) / kDecodePartBlocks;
  const int64_t parts = std::min((want + threads - 1) / threads * threads, blocks / kDecodePartMinBlocks);
  return std::max<int64_t>(parts, 1);
}

// Floats one decode part leaves for the merge: per query head its max score,
// its sum of exponentials, and its unnormalized output [D].
inline int64_t decode_partial_floats(int64_t heads, int64_t d) { return heads * (d + 2); }

// One decode row (the last position of its context), all heads, over
// context positions [begin, end): K then V are read block by block,
// each block whole (every KV head of its block_size rows are contiguous)
// while the next one is prefetched; the query heads of each KV head take
// their scores from that block while it is in L1. Over the whole context
// (partial null) the result goes to out; over a part, its max, sum and
// unnormalized output go to partial (decode_partial_floats) for
// merge_decode_parts. scratch: heads * (end - begin + D) floats.
template <int D>
void attend_decode(const float* __restrict q, float* __restrict out, const float* __restrict k_cache,
                   const float* __restrict v_cache, const int64_t* __restrict blocks, int64_t begin, int64_t end,
                   int64_t block_size, int64_t kv_heads, int64_t group, int d_runtime, float scale,
                   float* __restrict scratch, float* __restrict partial) {
  const int D_ = D > 0 ? D : d_runtime;
  const int64_t row_stride = kv_heads * D_, heads = kv_heads * group, len = end - begin;
  float* scores = scratch;                 // [heads, len]
  float* acc = scratch + heads * len;      // [heads, D]
  scan_blocks(k_cache, blocks, begin, end, block_size, kv_heads, group, D_,
              [&](const float* kb, int64_t t0, int64_t n, int64_t hd) {
                block_scores<D>(q + hd * D_, kb, n, row_stride, D_, scale, scores + hd * len + t0 - begin);
              });
  for (int64_t b = 0; b < kAhead && begin + b * block_size < end; ++b) {
    const int64_t t0 = begin + b * block_size;
    prefetch_part(v_cache + blocks[t0 / block_size] * block_size * row_stride,
                  std::min(block_size, end - t0) * row_stride, 0, 1);
  }
  for (int64_t hd = 0; hd < heads; ++hd) {
    float* s = scores + hd * len;
    if (partial) {  // the part's exponentials stay unnormalized; the merge scales them
      partial[heads + hd] = exp_shifted(s, len, partial + hd);
      continue;
    }
    const float inv = 1.f / exp_shifted(s, len);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  float* o = partial ? partial + 2 * heads : acc;
  std::fill(o, o + heads * D_, 0.f);
  scan_blocks(v_cache, blocks, begin, end, block_size, kv_heads, group, D_,
              [&](const float* vb, int64_t t0, int64_t n, int64_t hd) {
                weighted_rows<D>(o + hd * D_, scores + hd * len + t0 - begin, vb, n, row_stride, D_);
              });
  if (!partial) std::memcpy(out, acc, sizeof(float) * heads * D_);
}

// out [heads, d] of one decode from its parts' partials (attend_decode):
// each part's output and sum rescaled from its own max to the largest.
void merge_decode_parts(const float* __restrict partials, int64_t parts, int64_t heads, int64_t d,
                        float* __restrict out) {
  const int64_t stride = decode_partial_floats(heads, d);
  for (int64_t hd = 0; hd < heads; ++hd) {
    float m = -INFINITY;
    for (int64_t p = 0; p < parts; ++p) m = std::max(m, partials[p * stride + hd]);
    float* o = out + hd * d;
    std::fill(o, o + d, 0.f);
    float sum = 0.f;
    for (int64_t p = 0; p < parts; ++p) {
      const float* part = partials + p * stride;
      const float w = exp_nonpositive(part[hd] - m);
      sum += w * part[heads + hd];
      const float* po = part + 2 * heads + hd * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] += w * po[i];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] *= inv;
  }
}

using AttendFn = decltype(&attend_rows<0>);
using DecodeFn = decltype(&attend_decode<0>);

// The kernels compiled for one head size: rows of prompts, and decodes.
struct HeadDimKernels {
  AttendFn rows = nullptr;
  DecodeFn decode = nullptr;
};

template <int D>
HeadDimKernels kernels_for() {
#ifdef __AVX2__
  if constexpr (D > 0 && D % 16 == 0) return {attend_rows_tiled<D>, attend_decode<D>};
#endif
  return {attend_rows<D>, attend_decode<D>};
}

HeadDimKernels pick(int64_t head_dim) {
  switch (head_dim) {
    case 16: return kernels_for<16>();
    case 32: return kernels_for<32>();
    case 64: return kernels_for<64>();
    case 80: return kernels_for<80>();
    case 96: return kernels_for<96>();
    case 128: return kernels_for<128>();
    case 256: return kernels_for<256>();
    default: return head_dim >= 1 && head_dim <= kMaxHeadDim ? kernels_for<0>() : HeadDimKernels{};
  }
}

// Query rows per work item: small enough to spread one long prompt over both
// cores, large enough that a decode-heavy batch is not all scheduling.
constexpr int64_t kRowsPerTask = 16;

}  // namespace

bool supports_head_dim(int64_t head_dim) { return pick(head_dim).rows != nullptr; }

// Attention of a mixed batch (decodes, whole prompts, prompt chunks) over the
// paged KV pool, whose new K/V rows must already be written. Request r owns
// query rows [query_start[r], query_start[r+1]) of q: the last rows of its
// context of seq_lens[r] tokens, whose blocks are block_table[r].
// out: [T, kv_heads, group, head_dim] contiguous; q: the same shape, rows may
// be strided (a view of the fused QKV projection); k_cache, v_cache:
// [num_blocks, block_size, kv_heads, head_dim]; block_table [R, max_blocks],
// query_start [R + 1], seq_lens [R]: int64.
void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_table, const at::Tensor& query_start, const at::Tensor& seq_lens,
                     double scale) {
  TORCH_CHECK(q.dim() == 4 && out.sizes() == q.sizes(), "q and out must be [tokens, kv_heads, group, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache/v_cache must be [num_blocks, block_size, kv_heads, head_dim]");
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "paged_attention takes contiguous float32 CPU out/k_cache/v_cache tensors");
  const int64_t T = q.size(0), hkv = q.size(1), group = q.size(2), d = q.size(3);
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.device().is_cpu() && q.stride(3) == 1 && q.stride(2) == d &&
                  q.stride(1) == group * d,
              "q must be float32 on CPU with contiguous heads (its rows may be strided)");
  for (const at::Tensor* t : {&block_table, &query_start, &seq_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "block_table/query_start/seq_lens must be int64");
  TORCH_CHECK(block_table.dim() == 2, "block_table must be [requests, max_blocks]");
  const int64_t R = block_table.size(0), block_size = k_cache.size(1), num_blocks = k_cache.size(0),
                max_blocks = block_table.size(1);
  TORCH_CHECK(k_cache.size(2) == hkv && k_cache.size(3) == d, "KV cache heads/head_dim do not match q");
  TORCH_CHECK(query_start.numel() == R + 1 && seq_lens.numel() == R, "query_start needs R + 1 and seq_lens R entries");
  const HeadDimKernels fn = pick(d);
  TORCH_CHECK(fn.rows != nullptr, "paged_attention: unsupported head_dim ", d);
  const int64_t* qs = query_start.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  TORCH_CHECK(qs[0] == 0 && qs[R] == T, "query_start must run from 0 to the number of query rows ", T);
  // A prompt task: request r, KV head h, query rows [j0, j1). A decode task
  // (h < 0): context positions [j0, j1), and, for a part of a cut decode,
  // where its partial goes in `partials` (else -1).
  struct Task { int64_t r, h, j0, j1, partial; };
  std::vector<Task> tasks;
  int64_t max_len = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = qs[r + 1] - qs[r];
    TORCH_CHECK(n >= 0 && n <= lens[r], "request ", r, ": ", n, " query rows for a context of ", lens[r]);
    TORCH_CHECK(lens[r] <= max_blocks * block_size, "context length ", lens[r], " of request ", r,
                " does not fit its block table");
    for (int64_t b = 0; b < (lens[r] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(table[r * max_blocks + b] >= 0 && table[r * max_blocks + b] < num_blocks,
                  "block id out of range for request ", r);
    max_len = std::max(max_len, lens[r]);
    // Later rows of a prompt see more context: tasks are handed out
    // dynamically, so uneven costs still balance over the threads.
    if (n == 1) {
      tasks.push_back({r, -1, 0, lens[r], -1});
      continue;
    }
    for (int64_t h = 0; h < hkv; ++h)
      for (int64_t j0 = 0; j0 < n; j0 += kRowsPerTask)
        tasks.push_back({r, h, j0, std::min(n, j0 + kRowsPerTask), -1});
  }
  // Decodes cut into parts: (request, its first partial, parts).
  struct SplitDecode { int64_t r, first, parts; };
  std::vector<SplitDecode> split;
  int64_t num_partials = 0;
  const int64_t threads = at::get_num_threads();
  if (static_cast<int64_t>(tasks.size()) < threads) {
    std::vector<Task> cut;
    for (const Task& t : tasks) {
      const int64_t blocks = (lens[t.r] + block_size - 1) / block_size;
      const int64_t parts = t.h < 0 ? decode_parts(blocks, threads) : 1;
      if (parts == 1) {
        cut.push_back(t);
        continue;
      }
      const int64_t span = (blocks + parts - 1) / parts * block_size;  // whole blocks per part
      const int64_t first = num_partials;
      for (int64_t b = 0; b < lens[t.r]; b += span)
        cut.push_back({t.r, -1, b, std::min(lens[t.r], b + span), num_partials++});
      split.push_back({t.r, first, num_partials - first});
    }
    tasks.swap(cut);
  }
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t q_stride = q.stride(0), o_stride = hkv * group * d, n_tasks = static_cast<int64_t>(tasks.size());
  const float sc = static_cast<float>(scale);
  const int64_t partial_floats = decode_partial_floats(hkv * group, d), n_split = static_cast<int64_t>(split.size());
  std::vector<float> partials(num_partials * partial_floats);
#pragma omp parallel num_threads(threads)
  {
    // Scratch for the largest of: a prompt task (tiled or not) and a decode.
    std::vector<float> scores(std::max({kRowsPerTask * group * max_len, tiled_scratch(kRowsPerTask * group, max_len, d),
                                        hkv * group * (max_len + d)}));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_tasks; ++i) {
      const Task& t = tasks[i];
      const int64_t n = qs[t.r + 1] - qs[t.r];
      if (t.h < 0) {
        fn.decode(qp + qs[t.r] * q_stride, op + qs[t.r] * o_stride, kp, vp, table + t.r * max_blocks, t.j0, t.j1,
                  block_size, hkv, group, static_cast<int>(d), sc, scores.data(),
                  t.partial < 0 ? nullptr : partials.data() + t.partial * partial_floats);
        continue;
      }
      fn.rows(qp + qs[t.r] * q_stride, q_stride, op + qs[t.r] * o_stride, o_stride, kp, vp, table + t.r * max_blocks,
         lens[t.r] - n, t.j0, t.j1, block_size, hkv, t.h, group, static_cast<int>(d), sc, scores.data());
    }
    // (The loop above ends in a barrier: every part is in `partials` here.)
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n_split; ++i)
      merge_decode_parts(partials.data() + split[i].first * partial_floats, split[i].parts, hkv * group, d,
                         op + qs[split[i].r] * o_stride);
  }
}

namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1,
              name, " must be a 2-D float32 CPU tensor with contiguous rows");
}

// Rows per parallel task: enough work (~16K floats) to amortize the fork.
int64_t grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

// out[t] = weight * r / sqrt(mean(r^2) + eps), as HF computes it in float32,
// for each row t of r = x, or, with h, r = x + h (also written to sum).
void norm_rows(at::Tensor out, const at::Tensor& x, const at::Tensor* h, at::Tensor* sum, const at::Tensor& weight,
               double eps) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes(), "out and x must have the same shape");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be a contiguous float32 vector of the hidden size");
  if (h) {
    check_rows(*h, "h");
    check_rows(*sum, "sum");
    TORCH_CHECK(h->sizes() == x.sizes() && sum->sizes() == x.sizes(), "x, h and sum must have the same shape");
  }
  const int64_t rows = x.size(0), n = x.size(1), xs = x.stride(0), os = out.stride(0);
  const int64_t hs = h ? h->stride(0) : 0, ss = h ? sum->stride(0) : 0;
  const float* xp = x.data_ptr<float>();
  const float* hp = h ? h->data_ptr<float>() : nullptr;
  float* sp = h ? sum->data_ptr<float>() : nullptr;
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * xs;
      if (hp) {
        const float* hr = hp + r * hs;
        float* sr = sp + r * ss;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) sr[i] = row[i] + hr[i];
        row = sr;
      }
      float* orow = op + r * os;
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < n; ++i) sq += row[i] * row[i];
      const float inv = 1.f / std::sqrt(sq / static_cast<float>(n) + static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) orow[i] = wp[i] * (row[i] * inv);
    }
  });
}

}  // namespace

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  norm_rows(out, x, nullptr, nullptr, weight, eps);
}

// The residual add before a norm, in the same pass: sum = x + h, out = RMSNorm(sum).
void add_rms_norm(at::Tensor out, at::Tensor sum, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
                  double eps) {
  norm_rows(out, x, &h, &sum, weight, eps);
}

// x = [gate | up] per row; out = silu(gate) * up.
void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  check_rows(x, "x");
  check_rows(out, "out");
  const int64_t rows = x.size(0), n = out.size(1), xs = x.stride(0), os = out.stride(0);
  TORCH_CHECK(x.size(1) == 2 * n && out.size(0) == rows, "x must be [rows, 2 * n] for out [rows, n]");
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = xp + r * xs;
      const float* up = gate + n;
      float* o = op + r * os;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        // sigmoid from exp(-|g|) <= 1, so it never overflows for large |g|.
        const float g = gate[i];
        const float e = exp_nonpositive(-std::fabs(g));
        const float sig = (g >= 0.f ? 1.f : e) / (1.f + e);
        o[i] = g * sig * up[i];
      }
    }
  });
}

// Each new token's K and V rows (k, v: [T, kv_heads * head_dim], rows may be
// strided, as views of the fused QKV projection) into the paged pool
// (k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]) at its slot
// (block id * block_size + offset). torch's index_copy_ took ~45 us a call
// for a decode batch's rows; this is a row copy per token.
void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache/v_cache must be [num_blocks, block_size, kv_heads, head_dim]");
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "k_cache/v_cache must be contiguous float32 CPU tensors");
  check_rows(k, "k");
  check_rows(v, "v");
  const int64_t T = k.size(0), width = k_cache.size(2) * k_cache.size(3), slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(v.size(0) == T && k.size(1) == width && v.size(1) == width, "k and v must be [tokens, ", width,
              "] for this cache");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == T,
              "slot_mapping must be a contiguous int64 vector with one slot per token");
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "slot ", slot[t], " of token ", t, " is outside the pool's ", slots,
                " slots");
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t ks = k.stride(0), vs = v.stride(0);
  at::parallel_for(0, T, grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kc + slot[t] * width, kp + t * ks, sizeof(float) * width);
      std::memcpy(vc + slot[t] * width, vp + t * vs, sizeof(float) * width);
    }
  });
}

// In place, rotate-half (GPT-NeoX / HF Llama) style: the first num_rot_heads
// heads of each row of qkv [T, heads * D] (q heads then k heads) by their
// token's position; cos_sin [max_position, 2, D] holds cos and sin per position.
void rotary_embedding(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos_sin,
                      int64_t num_rot_heads, int64_t head_dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == qkv.size(0),
              "positions must be a contiguous int64 vector with one entry per row");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() && cos_sin.dim() == 3 &&
                  cos_sin.size(1) == 2 && cos_sin.size(2) == head_dim,
              "cos_sin must be a contiguous float32 [max_position, 2, head_dim] tensor");
  TORCH_CHECK(head_dim % 2 == 0 && num_rot_heads * head_dim <= qkv.size(1), "bad head layout for rotary_embedding");
  const int64_t rows = qkv.size(0), stride = qkv.stride(0), half = head_dim / 2, max_pos = cos_sin.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < max_pos, "position ", pos[r], " outside the rotary table of ", max_pos);
  float* base = qkv.data_ptr<float>();
  const float* table = cos_sin.data_ptr<float>();
  at::parallel_for(0, rows, grain(num_rot_heads * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = table + pos[r] * 2 * head_dim;
      const float* s = c + head_dim;
      for (int64_t h = 0; h < num_rot_heads; ++h) {
        float* x = base + r * stride + h * head_dim;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] - x2 * s[i];
          x[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
      }
    }
  });
}

// ---- panel_linear: out = x W^T (+ bias), every matmul of the layers ----
//
// W is repacked once into panels of 16 output features, [ceil(N / 16)][K][16],
// so one panel is one sequential stream. The threads take the work in units
// (runs of panels, and for prefill-sized batches one row block each) one at
// a time (parallel_units). Two loop nests read that one layout:
//
// - Decode-sized batches (under kBlockedMinRows rows): a step multiplies tens
//   of rows by every weight of the model, and the weights (540 MB for SmolLM2
//   in float32) come from DRAM each step. All rows of x sweep a whole panel
//   while it is in L1/L2, 6 rows x 16 features of accumulators in registers
//   (the classic AVX2 6x16 tile), and, when more than one tile sweeps it, the
//   next panel is prefetched in parts spread over that sweep. With 30 layers'
//   weights cycling as in a real step, oneDNN's prepacked matmul ran at
//   8-110 GFLOP/s from 1 to 96 rows on this project's 2-core machine; this
//   runs 1.2-1.7x faster there.
// - Prefill-sized batches: the same tiles over K slices that stay in L1 and
//   a copy of x's row block in tile order that stays in L2 (see
//   panel_sweep_blocks). On the 128-request trace its prefill iterations took
//   60-65 s against 67-72 s with oneDNN's prepacked GEMM (two A/B sittings of
//   two runs each), so the layers keep no other copy of their weights.
namespace {

constexpr int64_t kPanel = 16;     // output features per panel
constexpr int64_t kTileRows = 6;   // rows of x per register tile

// Prefill-sized batches: classic cache blocking. K is cut into slices of
// kDepth so a panel's slice (kDepth x 16 floats, 16 KB) stays in L1 while every
// tile of a row block runs over it; the row block's x slice is copied once into
// tile order ([tile][k][row], kBlockRows x kDepth floats, 192 KB) so each tile
// reads one sequential stream from L2. Slices after the first add to out.
constexpr int64_t kDepth = 256;
constexpr int64_t kBlockRows = 192;
// Below this many rows the weights stream from DRAM once, whole panels at a
// time; slicing K would break that stream for little reuse.
constexpr int64_t kBlockedMinRows = 128;
// The fewest panels one unit of work runs (see panel_run_length).
constexpr int64_t kMinRunPanels = 4;

// One register tile: out[0..MR)[0..ncols) = a . b over kc (+ bias), or += when
// accumulate. b is a panel (or a slice of one), [kc][16]. a holds MR rows of x:
// in place (row i at a + i * lda) or, Packed, interleaved by pack_rows
// (a[k * MR + i]). Prefetches pf_lines cache lines (16 floats each) from pf
// along the way, spread over the k loop, into L1 or, pf_to_l2, into L2.
template <int MR, bool Packed>
void panel_tile(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t kc,
                float* __restrict out, int64_t ldo, int64_t ncols, bool accumulate, const float* __restrict bias,
                const float* pf, int64_t pf_lines, bool pf_to_l2) {
  alignas(32) float t[MR][kPanel];
#ifdef __AVX2__
  // k runs in steps of kStep with a share of the prefetches each. Packed
  // (prefill) tiles take 16: with 8 and no unrolling, the trace's prefill
  // iterations took 72-73 s instead of 60-65 s.
  constexpr int64_t kStep = Packed ? 16 : 8;
  const int64_t steps = std::max<int64_t>(1, (kc + kStep - 1) / kStep);
  const int64_t per_step = (pf_lines + steps - 1) / steps;
  __m256 c0[MR], c1[MR];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    c0[i] = _mm256_setzero_ps();
    c1[i] = _mm256_setzero_ps();
  }
  for (int64_t k0 = 0; k0 < kc; k0 += kStep) {
    for (int64_t q = 0; q < per_step && pf_lines > 0; ++q, --pf_lines, pf += kPanel) {
      if (pf_to_l2)
        _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
      else
        _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T0);
    }
    const int64_t k1 = std::min(kc, k0 + kStep);
    _Pragma("GCC unroll 4") for (int64_t k = k0; k < k1; ++k) {
      const __m256 b0 = _mm256_load_ps(b + k * kPanel), b1 = _mm256_load_ps(b + k * kPanel + 8);
      _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(Packed ? a + k * MR + i : a + i * lda + k);
        c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
        c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
      }
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(t[i], c0[i]);
    _mm256_store_ps(t[i] + 8, c1[i]);
  }
#else
  (void)pf;
  (void)pf_lines;
  (void)pf_to_l2;
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < kPanel; ++j) t[i][j] = 0.f;
  for (int64_t k = 0; k < kc; ++k)
    for (int i = 0; i < MR; ++i) {
      const float av = Packed ? a[k * MR + i] : a[i * lda + k];
#pragma omp simd
      for (int64_t j = 0; j < kPanel; ++j) t[i][j] += av * b[k * kPanel + j];
    }
#endif
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < ncols; ++j)
      out[i * ldo + j] = t[i][j] + (accumulate ? out[i * ldo + j] : (bias ? bias[j] : 0.f));
}

using PanelTileFn = decltype(&panel_tile<1, false>);
template <bool Packed>
constexpr PanelTileFn kPanelTiles[kTileRows + 1] = {
    nullptr, &panel_tile<1, Packed>, &panel_tile<2, Packed>, &panel_tile<3, Packed>,
    &panel_tile<4, Packed>, &panel_tile<5, Packed>, &panel_tile<6, Packed>};

// x rows [0, rows) x columns [k0, k0 + kc) -> dst, tile by tile: tile t holds
// its r = min(6, rows - 6t) rows interleaved, k-major ([kc][r]).
void pack_rows(const float* __restrict x, int64_t ldx, int64_t rows, int64_t k0, int64_t kc, float* __restrict dst) {
  for (int64_t m = 0; m < rows; m += kTileRows) {
    const int64_t r = std::min(kTileRows, rows - m);
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t i = 0; i < r; ++i) dst[k * r + i] = x[(m + i) * ldx + k0 + k];
    dst += r * kc;
  }
}

// One run of tiles: `rows` rows of op (the caller's row block, rows ldo
// apart), panels [p0, p1), K columns [k0, k0 + kc). a is that block's x in
// place (at column k0, rows ldx apart) or, Packed, its slice in tile order
// (pack_rows). Each tile prefetches its share of the next panel's lines of
// this slice.
//
// Where those lines go: into L2 when 2 or 3 tiles sweep a decode-sized
// panel. Side by side on Zen 4 (30 layers' GEMMs cycling, medians) that took
// 0.75-0.81x the time of L1 prefetches at 8 rows, 0.80-0.87x at 12,
// 0.85-0.99x at 16 and 0.92x at 18. The likely reason: such a panel (K x 16
// floats, 36-96 KB for SmolLM2) does not fit in L1 (32 KB), so lines
// prefetched into L1 for the next panel evict the current one's, which the
// later tiles then read from L2 after all. From 4 tiles up the two measured
// within noise (0.94-1.04x).
//
// With one tile (up to 6 rows) every line is read once, in order, and the
// hardware prefetchers stream it better than our hints do, once the panels
// sit on 2 MiB pages (PanelArena): with no software prefetch there, the 30
// layers' matmuls and the LM head took 0.91-0.95x the time at 1-6 rows
// (two sittings, medians of 21 alternated rounds), where at 7-16 rows going
// without took 1.13-1.28x. A plain two-thread read of 512 MB measured the
// same way: 33.8 GB/s without hints, 25.7-31.1 GB/s with.
constexpr int64_t kL2PrefetchMaxTiles = 3;

template <bool Packed>
void panel_run(const float* a, int64_t ldx, int64_t rows, int64_t K, int64_t k0, int64_t kc, const float* pp,
               int64_t p0, int64_t p1, float* op, int64_t ldo, int64_t N, const float* bp) {
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t share = (kc + tiles - 1) / tiles;  // next panel's lines (one per k) each tile prefetches
  const bool pf_to_l2 = !Packed && tiles >= 2 && tiles <= kL2PrefetchMaxTiles;
  const bool prefetch = Packed || tiles >= 2;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kPanel, ncols = std::min(kPanel, N - n0);
    const float* b = pp + (p * K + k0) * kPanel;
    const float* next = prefetch && p + 1 < p1 ? b + K * kPanel : nullptr;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m = t * kTileRows, r = std::min(kTileRows, rows - m);
      const int64_t lo = std::min(kc, t * share), lines = next ? std::min(kc, lo + share) - lo : 0;
      kPanelTiles<Packed>[r](Packed ? a + m * kc : a + m * ldx, ldx, b, kc, op + m * ldo + n0, ldo, ncols, k0 > 0,
                             bp ? bp + n0 : nullptr, next ? next + lo * kPanel : nullptr, lines, pf_to_l2);
    }
  }
}

// Hands out units [0, units) to the threads one at a time, as paged_attention
// hands out its tasks (OpenMP's dynamic schedule): a thread
// the OS or a neighbour on the host preempts for a while takes fewer of them
// instead of holding the others at the end of the matmul, as a fixed split
// made it do. On this project's 2-core machine, whose speed moves with its
// neighbours' load, SmolLM2's layer GEMMs took 0.92x the time at 110 rows and
// 0.95x at 2048 side by side with the fixed split (0.94x at 2048 with a
// 2 ms-in-20 ms busy loop beside them, 0.98x in a quiet minute).
template <typename F>
void parallel_units(int64_t units, const F& body) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t u = 0; u < units; ++u) body(u);
}

// Panels per unit of work, cutting a matmul's P panels into runs so that
// `blocks` row blocks x runs give each thread several units, no run shorter
// than kMinRunPanels unless the matmul has fewer panels than that.
int64_t panel_run_length(int64_t P, int64_t blocks) {
  const int64_t want = (8 * at::get_num_threads() + blocks - 1) / blocks;
  const int64_t runs = std::max<int64_t>(1, std::min(want, P / kMinRunPanels));
  return (P + runs - 1) / runs;
}

// Decode-sized batches: out [M, N] = x [M, K] . W^T (+ bias), x read in place,
// runs of whole panels, each panel streamed once.
void panel_sweep_rows(const float* xp, int64_t ldx, int64_t M, int64_t K, const float* pp, int64_t P, float* op,
                      int64_t ldo, int64_t N, const float* bp) {
  const int64_t run = panel_run_length(P, 1);
  parallel_units((P + run - 1) / run, [&](int64_t u) {
    panel_run<false>(xp, ldx, M, K, 0, K, pp, u * run, std::min(P, (u + 1) * run), op, ldo, N, bp);
  });
}

// Prefill-sized batches: x is packed once, every (row block, K slice) in tile
// order, by all threads together; then the work goes out in units of one row
// block x a run of panels, each over every K slice. Both phases hand out
// their units with parallel_units. The pack buffer is kept per calling
// thread and grows to the largest x seen.
void panel_sweep_blocks(const float* xp, int64_t ldx, int64_t M, int64_t K, const float* pp, int64_t P, float* op,
                        int64_t ldo, int64_t N, const float* bp) {
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows, slices = std::max<int64_t>(1, (K + kDepth - 1) / kDepth);
  thread_local std::vector<float> packed;
  if (packed.size() < static_cast<size_t>(M * K)) packed.resize(M * K);
  float* pk = packed.data();
  // Block b's slice starting at k0 sits at b * kBlockRows * K + k0 * rows.
  parallel_units(blocks * slices, [&](int64_t u) {
    const int64_t m0 = (u / slices) * kBlockRows, k0 = (u % slices) * kDepth;
    const int64_t rows = std::min(kBlockRows, M - m0);
    pack_rows(xp + m0 * ldx, ldx, rows, k0, std::min(kDepth, K - k0), pk + m0 * K + k0 * rows);
  });
  const int64_t run = panel_run_length(P, blocks);
  parallel_units(blocks * ((P + run - 1) / run), [&](int64_t u) {
    const int64_t b = u % blocks, p0 = (u / blocks) * run, p1 = std::min(P, p0 + run);
    const int64_t m0 = b * kBlockRows, rows = std::min(kBlockRows, M - m0);
    // k0 == 0 runs even when K == 0, so out still gets the bias (or zeros).
    for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kDepth)
      panel_run<true>(pk + m0 * K + k0 * rows, ldx, rows, K, k0, std::min(kDepth, K - k0), pp, p0, p1, op + m0 * ldo,
                      ldo, N, bp);
  });
}

}  // namespace

// weight [N, K] -> panels [ceil(N / 16), K, 16], the last one zero-padded.
// Into `out` when given (a slice of the runner's weight arena, which holds
// every layer's panels on 2 MiB pages), else into a new tensor.
at::Tensor pack_panels(const at::Tensor& weight, const c10::optional<at::Tensor>& out) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.device().is_cpu() && weight.dim() == 2,
              "weight must be a 2-D float32 CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + kPanel - 1) / kPanel;
  at::Tensor panels;
  if (out.has_value()) {
    panels = *out;
    TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.device().is_cpu() && panels.is_contiguous() &&
                    panels.sizes() == at::IntArrayRef({P, K, kPanel}),
                "out must be a contiguous float32 CPU tensor of shape [", P, ", ", K, ", ", kPanel,
                "] for a [", N, ", ", K, "] weight, got ", panels.sizes());
    TORCH_CHECK(reinterpret_cast<std::uintptr_t>(panels.data_ptr<float>()) % 32 == 0,
                "out must be 32-byte aligned (panel_linear's aligned loads)");
  } else {
    panels = at::empty({P, K, kPanel}, w.options());
  }
  const float* src = w.data_ptr<float>();
  float* dst = panels.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t cols = std::min(kPanel, N - p * kPanel);
      for (int64_t j = 0; j < cols; ++j) {
        const float* row = src + (p * kPanel + j) * K;
        float* col = dst + p * K * kPanel + j;
        for (int64_t k = 0; k < K; ++k) col[k * kPanel] = row[k];
      }
      // The last panel's missing features read as zeros, whatever out held.
      if (cols < kPanel)
        for (int64_t k = 0; k < K; ++k) {
          float* row = dst + (p * K + k) * kPanel;
          std::fill(row + cols, row + kPanel, 0.f);
        }
    }
  });
  return panels;
}

// out [M, N] = x [M, K] . W^T (+ bias [N]), W given as pack_panels(W).
void panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& bias) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.is_contiguous() && panels.dim() == 3 &&
                  panels.size(2) == kPanel,
              "panels must be a contiguous float32 [P, K, 16] tensor from pack_panels");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K, "x has ", K, " features but the weight takes ", panels.size(1));
  TORCH_CHECK(out.size(0) == M && N > (P - 1) * kPanel && N <= P * kPanel,
              "out must be [", M, ", N] with N within the panels' ", P * kPanel, " features");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be a contiguous float32 vector of the output size");
    bp = bias->data_ptr<float>();
  }
  const float* pp = panels.data_ptr<float>();
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(pp) % 32 == 0, "panels must be 32-byte aligned (as pack_panels returns them)");
  if (M == 0) return;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  if (M >= kBlockedMinRows)
    panel_sweep_blocks(xp, ldx, M, K, pp, P, op, ldo, N, bp);
  else
    panel_sweep_rows(xp, ldx, M, K, pp, P, op, ldo, N, bp);
}

// The ops release the GIL like torch's own: the engine runs them on its own
// thread while the server's event loop keeps answering on another.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("rms_norm", &rms_norm, "RMSNorm of each row", release());
  m.def("add_rms_norm", &add_rms_norm, "sum = x + h, then RMSNorm of each row of sum", release());
  m.def("write_kv", &write_kv, "write new K/V rows into the paged pool at their slots", release());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up", release());
  m.def("rotary_embedding", &rotary_embedding, "in-place rotate-half RoPE of q and k heads", release());
  m.def("paged_attention", &paged_attention, "mixed-batch causal attention over the paged KV pool", release());
  m.def("pack_panels", &pack_panels, "repack a [N, K] weight into 16-feature panels for panel_linear",
        py::arg("weight"), py::arg("out") = py::none(), release());
  m.attr("panel_width") = kPanel;
  m.def("panel_linear", &panel_linear, "x W^T (+ bias) against a pack_panels weight", release());
  m.def("supports_head_dim", &supports_head_dim, "whether a head_dim has a compiled kernel");
}
