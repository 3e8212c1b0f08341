// Prompt rows (and chunks of prompts) attending causally over the paged pool:
// a plain per-row kernel for any head size, and a register-tiled one for the
// head sizes paged_attention.cpp specializes that are multiples of 16 (16,
// 32, 64, 80, 96, 128, 256). Included by paged_attention.cpp only.
#pragma once

#include "attention_common.h"

namespace {

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

// Query vectors of a prompt task padded to whole 16-wide columns, and the
// scratch floats attend_rows_tiled needs for nq of them over max_len keys
// (qt and the accumulators [nq][d], the scores, three per-query vectors).
inline int64_t padded_queries(int64_t nq) { return (nq + 15) / 16 * 16; }
inline int64_t tiled_scratch(int64_t nq, int64_t max_len, int64_t d) { return padded_queries(nq) * (2 * d + max_len + 3); }

#ifdef __AVX2__
// Prompt rows, register-tiled (specialized head sizes, multiples of 16). A task's
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
//
// The AVX-512 build runs the same loops in zmm tiles (score_tiles, pv_tiles):
// 8 keys x 48 queries (24 accumulators; 3 loads of qt and 8 broadcasts for
// 24 FMAs a d step) and 6 queries x 64 dims. Each score and each output
// element is still one FMA chain in the same order (over d, over keys), so
// both builds give the same bits. At ymm width the tiles ran at the ymm FMA
// peak: on the 2-core Xeon, 8 prompts of 256 tokens (SmolLM2's 9 query and
// 3 KV heads), the score tiles took 1.57 ms and P.V 1.45 ms of a 4.14 ms
// call; with these, the call takes 2.74 ms (9.28 against 14.40 ms at 512
// tokens). 48 is a 16-row task's query vectors with SmolLM2's group of 3: an
// earlier try with 32-query tiles padded them to 64 and ran slower.
#ifdef __AVX512F__
constexpr int kKeyTile = 8;    // keys per score tile
#else
constexpr int kKeyTile = 6;
#endif
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

#ifdef __AVX512F__
// st rows t0 + r (r < KT), columns [c0, c0 + 16 * NV): as score_tile_t, in zmm.
template <int D, int KT, int NV, bool Max>
inline void score_tile_z(const float* const* krow, const float* __restrict qt, int64_t nq_pad, float scale,
                         float* __restrict st_rows, int64_t c0, float* __restrict mx) {
  __m512 acc[KT][NV];
  for (int r = 0; r < KT; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m512 q[NV];
    for (int v = 0; v < NV; ++v) q[v] = _mm512_loadu_ps(qt + d * nq_pad + c0 + 16 * v);
    for (int r = 0; r < KT; ++r) {
      const __m512 kb = _mm512_set1_ps(krow[r][d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(kb, q[v], acc[r][v]);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
  for (int v = 0; v < NV; ++v) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < KT; ++r) {
      const __m512 s = _mm512_mul_ps(acc[r][v], sv);
      _mm512_storeu_ps(st_rows + r * nq_pad + c0 + 16 * v, s);
      if (Max) m = _mm512_max_ps(m, s);
    }
    if (Max) _mm512_storeu_ps(mx + c0 + 16 * v, _mm512_max_ps(m, _mm512_loadu_ps(mx + c0 + 16 * v)));
  }
}

// acc[r][d0, d0 + 16 * NV) += sum over keys t in [t0, t1) of st[t][c0 + r] * v row t: as pv_chunk_t, in zmm.
template <int D, int QT, int NV>
inline void pv_chunk_z(const float* __restrict st, int64_t nq_pad, int64_t c0, const float* const* __restrict vrow,
                       int64_t t0, int64_t t1, int d0, float* __restrict acc) {
  __m512 a[QT][NV];
  for (int r = 0; r < QT; ++r)
    for (int v = 0; v < NV; ++v) a[r][v] = _mm512_loadu_ps(acc + r * D + d0 + 16 * v);
  for (int64_t t = t0; t < t1; ++t) {
    __m512 vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = _mm512_loadu_ps(vrow[t - t0] + d0 + 16 * v);
    const float* pw = st + t * nq_pad + c0;
    for (int r = 0; r < QT; ++r) {
      const __m512 pb = _mm512_set1_ps(pw[r]);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm512_fmadd_ps(pb, vv[v], a[r][v]);
    }
  }
  for (int r = 0; r < QT; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + r * D + d0 + 16 * v, a[r][v]);
}
#endif

// The score tiles of keys krow[0, KT) against every query column of st's rows.
template <int D, int KT, bool Max>
inline void score_tiles(const float* const* krow, const float* __restrict qt, int64_t nq_pad, float scale,
                        float* __restrict st_rows, float* __restrict mx) {
#ifdef __AVX512F__
  int64_t c0 = 0;
  for (; c0 + 48 <= nq_pad; c0 += 48) score_tile_z<D, KT, 3, Max>(krow, qt, nq_pad, scale, st_rows, c0, mx);
  // nq_pad is a multiple of 16: what is left is 0, 16 or 32 columns.
  if (nq_pad - c0 == 32)
    score_tile_z<D, KT, 2, Max>(krow, qt, nq_pad, scale, st_rows, c0, mx);
  else if (nq_pad - c0 == 16)
    score_tile_z<D, KT, 1, Max>(krow, qt, nq_pad, scale, st_rows, c0, mx);
#else
  for (int64_t c0 = 0; c0 < nq_pad; c0 += 16) score_tile_t<D, KT, Max>(krow, qt, nq_pad, scale, st_rows, c0, mx);
#endif
}

// P.V of QT queries (from column c0) over keys [t0, t1), every dim of acc.
template <int D, int QT>
inline void pv_tiles(const float* __restrict st, int64_t nq_pad, int64_t c0, const float* const* __restrict vrow,
                     int64_t t0, int64_t t1, float* __restrict acc) {
#ifdef __AVX512F__
  for (int d0 = 0; d0 + 64 <= D; d0 += 64) pv_chunk_z<D, QT, 4>(st, nq_pad, c0, vrow, t0, t1, d0, acc);
  if constexpr (D % 64 != 0) pv_chunk_z<D, QT, D % 64 / 16>(st, nq_pad, c0, vrow, t0, t1, D / 64 * 64, acc);
#else
  for (int d0 = 0; d0 < D; d0 += 16) pv_chunk_t<D, QT>(st, nq_pad, c0, vrow, t0, t1, d0, acc);
#endif
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
    if (t + kKeyTile <= seen_by_all)
      score_tiles<D, kKeyTile, true>(kr, qt, nq_pad, scale, st + t * nq_pad, mx);
    else
      score_tiles<D, kKeyTile, false>(kr, qt, nq_pad, scale, st + t * nq_pad, mx);
  }
  const int64_t masked_from = std::min(t, seen_by_all / kKeyTile * kKeyTile);
  for (; t < len_max; ++t) {
    kr[0] = row_at(k_cache, t);
    score_tiles<D, 1, false>(kr, qt, nq_pad, scale, st + t * nq_pad, mx);
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
      if (end > k0) pv_tiles<D, kQueryTile>(st, nq_pad, i, vr, k0, end, acc + i * D);
    }
    for (; i < nq; ++i) {
      const int64_t end = std::min(k1, first_pos + j0 + i / group + 1);
      if (end > k0) pv_tiles<D, 1>(st, nq_pad, i, vr, k0, end, acc + i * D);
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

}  // namespace
