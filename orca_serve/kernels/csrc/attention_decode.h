// Decode rows: one query row at the end of its context, scanning the
// context's KV blocks in order with the next one prefetched, whole or in
// parts whose softmax sums are merged after. Included by paged_attention.cpp
// only.
#pragma once

#include "attention_common.h"

namespace {

// Asks for lines [begin, end) (16 floats each) of a block ahead of use, into L2.
// One core keeps only a few misses in flight and its prefetcher stops at each
// 4 KiB page, so a decode's scan over scattered blocks runs at a third of the
// bandwidth without this; spreading the requests over the work on the
// current block keeps them from piling up. Into L2, not L1: on Zen 4 (32-128
// decodes over 200-450 tokens in random blocks) that took 0.62-0.73x the
// time, 14.6-19 -> 23-27 GB/s. Likely why (not measured directly): a
// prefetch to L1 holds one of L1's few miss buffers until its line arrives,
// so fewer lines were in flight; from L2 the block's reads are cheap.
inline void prefetch_lines(const float* block, int64_t begin, int64_t end) {
#ifdef __AVX2__
  for (int64_t i = begin; i < end; ++i) _mm_prefetch(reinterpret_cast<const char*>(block + 16 * i), _MM_HINT_T1);
#endif
}

// The lines of the block ahead that one KV head's work on the current block
// asks for: [lo, hi) of block (16 floats each; block null at the context's
// end), handed out a few at each key or row by a PrefetchCursor. Each
// request is then issued between loads of the current block, as in a plain
// scan: two threads summing 12 KB blocks in random order read 23-25 GB/s
// with one line of the next block asked for per line read, 21 with none,
// and 19 with each block's requests issued at once at its start (the 2-core
// Xeon, 2 GB of blocks). The AVX-512 pieces asking for a KV head's share at
// once ran the cold decode scan at 1.05-1.09x the time of spreading it.
struct PrefetchLines {
  const float* block;
  int64_t lo, hi;
};

// Hands out PrefetchLines' lines evenly over `steps` steps: step(k) asks for
// those of the next k.
class PrefetchCursor {
 public:
  PrefetchCursor(const PrefetchLines& p, int64_t steps)
      : block_(p.block), line_(p.lo), lines_(p.hi - p.lo), steps_(steps) {}
  void step(int64_t k) {
    if (!block_) return;
    for (credit_ += k * lines_; credit_ >= steps_; credit_ -= steps_) prefetch_lines(block_, line_, line_ + 1), ++line_;
  }

 private:
  const float* block_;
  int64_t line_, lines_, steps_, credit_ = 0;
};

// Blocks a decode's scan prefetches ahead of use (1, 2 and 3 measured with
// L1 prefetches on Zen 3, 1 and 2 into L2 on Zen 4; 1 was best or even).
constexpr int64_t kAhead = 1;

// Calls f(rows of KV head h in the block, first position t0, rows n, h,
// PrefetchLines) for each block of context positions [begin, end) (begin a
// block boundary) and each KV head h, block by block: f asks for KV head
// h's share of the lines of the block kAhead ahead.
template <typename F>
inline void scan_blocks(const float* cache, const int64_t* blocks, int64_t begin, int64_t end, int64_t block_size,
                        int64_t kv_heads, int head_dim, F&& f) {
  const int64_t row_stride = kv_heads * head_dim;
  for (int64_t t0 = begin; t0 < end; t0 += block_size) {
    const int64_t n = std::min(block_size, end - t0);
    const float* block = cache + blocks[t0 / block_size] * block_size * row_stride;
    const int64_t ahead = t0 + kAhead * block_size;
    const float* next = ahead < end ? cache + blocks[ahead / block_size] * block_size * row_stride : nullptr;
    const int64_t lines = next ? (std::min(block_size, end - ahead) * row_stride + 15) / 16 : 0;
    for (int64_t h = 0; h < kv_heads; ++h)
      f(block + h * head_dim, t0, n, h, PrefetchLines{next, lines * h / kv_heads, lines * (h + 1) / kv_heads});
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

#ifdef __AVX512F__
// The AVX-512 build's decode arithmetic (head sizes that are a multiple of
// 16): one key's score is one zmm FMA chain over its head, and sixteen keys'
// chains are summed across lanes together (hsum16); a V row is loaded once for
// the query heads of its KV head. On the 2-core Xeon (SmolLM2's 3 KV heads of
// 3 query heads, 64 dims), against the AVX2 pieces (block_scores,
// weighted_rows, 8 wide) in the same scan, side by side: one decode over 640
// tokens whose blocks sit in L2 took 0.76-0.81x the time on one thread;
// 16-128 decodes over 320-600 tokens, 30 layers' blocks cycling (from DRAM),
// 0.90-0.93x; 30-layer decode steps of 16-128 requests through the native
// stack 0.94-0.95x.

// Lane j = the sum of v[j]'s sixteen lanes: pairs of vectors folded by
// 256-bit, then 128-bit halves, then within 128-bit lanes (15 adds and 30
// shuffles for 16 sums), and the keys put back in order by one permute.
inline __m512 hsum16(const __m512* v) {
  __m512 b[8], c[4], d[2];
  for (int k = 0; k < 8; ++k)  // lanes of 128 bits: [v0 (l0+l2), v0 (l1+l3), v1 (l0+l2), v1 (l1+l3)]
    b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)  // lane i: 4 partial sums of key 4k + i
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // lane i: keys 8k + i and 8k + 4 + i, two partial sums each
    d[k] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * k], c[2 * k + 1]), _mm512_unpackhi_ps(c[2 * k], c[2 * k + 1]));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]));
  const __m512 e = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));  // element 4i + m: key i + 4m
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), e);
}

// block_scores for D % 16 == 0: sixteen keys at a time, q held in up to 8
// registers (D > 128 goes over q in 128-float chunks).
template <int D, typename Step>
inline void block_scores_z(const float* __restrict q, const float* __restrict kb, int64_t n, int64_t row_stride,
                           float scale, float* __restrict scores, const Step& step) {
  constexpr int C = D / 16, QC = C < 8 ? C : 8;
  static_assert(C % QC == 0, "q's chunks must cover the head exactly");
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i);
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int c0 = 0; c0 < C; c0 += QC) {
      __m512 qv[QC];
      for (int c = 0; c < QC; ++c) qv[c] = _mm512_loadu_ps(q + 16 * (c0 + c));
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        if (j < m) {
          if (c0 == 0) step(1);
          const float* kr = kb + (i + j) * row_stride + 16 * c0;
          for (int c = 0; c < QC; ++c) acc[j] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr + 16 * c), acc[j]);
        }
    }
    _mm512_mask_storeu_ps(scores + i, static_cast<__mmask16>((1u << m) - 1), _mm512_mul_ps(hsum16(acc), sv));
  }
}

// acc[g][0, D) += sum over the n rows t of w[g * ws + t] * v row t for G
// query heads at once, each V row loaded once for all of them. With few
// accumulators (G * D / 16 <= 8) even and odd rows go to two sets, so that
// enough FMA chains are in flight.
template <int D, int G, typename Step>
inline void weighted_rows_z(float* __restrict acc, const float* __restrict w, int64_t ws, const float* __restrict vb,
                            int64_t n, int64_t row_stride, const Step& step) {
  constexpr int C = D / 16, S = G * C <= 8 ? 2 : 1;
  __m512 a[S][G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) {
      a[0][g][c] = _mm512_loadu_ps(acc + g * D + 16 * c);
      if constexpr (S == 2) a[1][g][c] = _mm512_setzero_ps();
    }
  int64_t i = 0;
  auto row = [&](int set, int64_t t) {
    step(1);
    const float* vr = vb + t * row_stride;
    __m512 v[C];
    for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_ps(vr + 16 * c);
    for (int g = 0; g < G; ++g) {
      const __m512 wv = _mm512_set1_ps(w[g * ws + t]);
      for (int c = 0; c < C; ++c) a[set][g][c] = _mm512_fmadd_ps(wv, v[c], a[set][g][c]);
    }
  };
  if constexpr (S == 2)
    for (; i + 2 <= n; i += 2) {
      row(0, i);
      row(1, i + 1);
    }
  for (; i < n; ++i) row(0, i);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c)
      _mm512_storeu_ps(acc + g * D + 16 * c, S == 2 ? _mm512_add_ps(a[0][g][c], a[1][g][c]) : a[0][g][c]);
}
#endif

// Scores of the `group` query heads of one KV head (q rows d apart, scores
// rows len apart) against a block's n keys, asking for pf's lines one key at
// a time: block_scores, or in the AVX-512 build its zmm form.
template <int D>
inline void group_scores(const float* __restrict q, const float* __restrict kb, int64_t n, int64_t row_stride,
                         int d_runtime, float scale, int64_t group, float* __restrict scores, int64_t len,
                         const PrefetchLines& pf) {
  PrefetchCursor cursor(pf, group * n);
  const auto step = [&](int64_t k) { cursor.step(k); };
  for (int64_t g = 0; g < group; ++g) {
#ifdef __AVX512F__
    if constexpr (D > 0 && D % 16 == 0) {
      block_scores_z<D>(q + g * D, kb, n, row_stride, scale, scores + g * len, step);
      continue;
    }
#endif
    block_scores<D>(q + g * d_runtime, kb, n, row_stride, d_runtime, scale, scores + g * len, step);
  }
}

#ifdef __AVX512F__
// weighted_rows_z for k (1..G) query heads: the widest set compiled that fits.
template <int D, int G, typename Step>
inline void weighted_rows_up_to(int64_t k, float* __restrict acc, const float* __restrict w, int64_t ws,
                                const float* __restrict vb, int64_t n, int64_t row_stride, const Step& step) {
  if constexpr (G > 1)
    if (k < G) return weighted_rows_up_to<D, G - 1>(k, acc, w, ws, vb, n, row_stride, step);
  weighted_rows_z<D, G>(acc, w, ws, vb, n, row_stride, step);
}
#endif

// weighted_rows for the `group` query heads of one KV head (acc rows d apart,
// w rows ws apart), asking for pf's lines one row at a time. The AVX-512
// build takes as many heads at once as 16 registers hold (4 of 64 dims, 2 of
// 128).
template <int D>
inline void group_weighted_rows(float* __restrict acc, const float* __restrict w, int64_t ws, int64_t group,
                                const float* __restrict vb, int64_t n, int64_t row_stride, int d_runtime,
                                const PrefetchLines& pf) {
#ifdef __AVX512F__
  if constexpr (D > 0 && D % 16 == 0) {
    constexpr int kSet = D <= 64 ? 4 : D <= 128 ? 2 : 1;
    PrefetchCursor cursor(pf, (group + kSet - 1) / kSet * n);
    const auto step = [&](int64_t k) { cursor.step(k); };
    for (int64_t g = 0; g < group; g += kSet)
      weighted_rows_up_to<D, kSet>(group - g, acc + g * D, w + g * ws, ws, vb, n, row_stride, step);
    return;
  }
#endif
  PrefetchCursor cursor(pf, group * n);
  for (int64_t g = 0; g < group; ++g)
    weighted_rows<D>(acc + g * d_runtime, w + g * ws, vb, n, row_stride, d_runtime,
                     [&](int64_t k) { cursor.step(k); });
}

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
  scan_blocks(k_cache, blocks, begin, end, block_size, kv_heads, D_,
              [&](const float* kb, int64_t t0, int64_t n, int64_t h, const PrefetchLines& pf) {
                group_scores<D>(q + h * group * D_, kb, n, row_stride, D_, scale, group,
                                scores + h * group * len + t0 - begin, len, pf);
              });
  for (int64_t b = 0; b < kAhead && begin + b * block_size < end; ++b) {
    const int64_t t0 = begin + b * block_size;
    prefetch_lines(v_cache + blocks[t0 / block_size] * block_size * row_stride, 0,
                   (std::min(block_size, end - t0) * row_stride + 15) / 16);
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
  scan_blocks(v_cache, blocks, begin, end, block_size, kv_heads, D_,
              [&](const float* vb, int64_t t0, int64_t n, int64_t h, const PrefetchLines& pf) {
                group_weighted_rows<D>(o + h * group * D_, scores + h * group * len + t0 - begin, len, group, vb, n,
                                       row_stride, D_, pf);
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

}  // namespace
