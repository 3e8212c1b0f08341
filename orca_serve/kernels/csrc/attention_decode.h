// Decode rows: one query row at the end of its context, scanning the
// context's KV blocks in order with the next one prefetched, whole or in
// parts whose softmax sums are merged after. Included by paged_attention.cpp
// only.
#pragma once

#include "attention_common.h"

namespace {

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

}  // namespace
