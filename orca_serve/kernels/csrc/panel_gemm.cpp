// pack_panels, panel_linear: out = x W^T (+ bias), every matmul of the layers;
// panel_linear_silu_mul: the same for SwiGLU's gate/up, returning silu(gate) * up.
//
// W is repacked once into panels of 16 output features, [ceil(N / 16)][K][16],
// so one panel is one sequential stream. The threads take the work in units
// (runs of panels, and for prefill-sized batches one row block each) one at
// a time (parallel_units). Two loop nests read that one layout:
//
// - Decode-sized batches (under kBlockedMinRows rows): a step multiplies tens
//   of rows by every weight of the model, and the weights (540 MB for SmolLM2
//   in float32) come from DRAM each step. All rows of x sweep whole panels
//   while they are in L1/L2, in register tiles of accumulators (6 rows x 1
//   panel on AVX2, 12 rows x 2 panels on AVX-512: kTileRows, kTilePanels),
//   and, past 6 rows, the next panels are prefetched in parts spread over
//   that sweep. With 30 layers' weights cycling as in a real step, oneDNN's
//   prepacked matmul ran at 8-110 GFLOP/s from 1 to 96 rows on this
//   project's 2-core Zen machines; this runs 1.2-1.7x faster there.
// - Prefill-sized batches: the same tiles over K slices of up to 768 (all of
//   K for SmolLM2's 576) and a copy of x's row block in tile order that
//   stays in L2 (see panel_sweep_blocks). On the 128-request trace its
//   prefill iterations took 60-65 s against 67-72 s with oneDNN's prepacked
//   GEMM (two A/B sittings of two runs each; 256-deep K slices then), so the
//   layers keep no other copy of their weights. (On a
//   Xeon with AVX-512, oneDNN's ran at 1.04-1.13x our rate at 512-2,048
//   rows: not worth a second copy of the weights.)
#include "cpu_ops.h"

namespace {

// A register tile: kTileRows rows of x by kTilePanels panels of 16 features.
// AVX2 holds a row's 16 features of one panel in two ymm accumulators, so
// 6 rows x 1 panel (12 of its 16 registers) is the classic tile. AVX-512
// holds them in one zmm: 12 rows x 2 panels take 24 of its 32 registers, and
// each x value, broadcast once, feeds two FMAs. On a 2-core Xeon with
// AVX-512 (SmolLM2's 30 layers' matmuls cycling, medians), 12 x 1 zmm tiles
// ran at 0.72-0.83x oneDNN's rate at 512-2048 rows (13 loads per 12 FMAs a
// k step); 12 x 2 at 0.88-0.96x, and 1.1-1.4x from 8 to 128 rows. The
// AVX2 tiles ran at 0.64-0.83x the rate of these from 1 to 2,048 rows.
#ifdef __AVX512F__
constexpr int64_t kTileRows = 12;
constexpr int64_t kTilePanels = 2;
#else
constexpr int64_t kTileRows = 6;
constexpr int64_t kTilePanels = 1;
#endif

// Prefill-sized batches: cache blocking. The row block's x is copied once
// into tile order ([tile][k][row], per K slice) so each tile reads one
// sequential stream from L2, and every tile of the block runs over a tile's
// panels' slice while it is in L1 or L2. K is cut into as few slices as keep
// each at most kMaxDepth deep, all of one depth but a shorter last one
// (slice_depth): each slice after the first reads and writes the unit's
// output again, and a tile's accumulators hold its sums only over one slice.
// With 256-deep slices (a panel pair's slice, 32 KB, in L1), SmolLM2's
// K = 576 took three (256, 256 and 64) and K = 1,536 six. On a 2-core Zen 5
// (AMD EPYC, family 26), its four layer matmuls against slices of up to 768
// (one for 576, two for 1,536), medians of 15 alternated rounds: 1.00-1.11x
// the GFLOP/s at 128-2,048 rows on two threads (0.98-1.12x on one), and with
// 30 layers' weights cycling as in a step, 0.93-0.99x the time. A slice then
// no longer fits L1, so the next panels' lines are prefetched into L2
// (panel_run). The x block, 192 rows x 768 floats (590 KB), still fits a
// Zen 5 core's 1 MB L2.
constexpr int64_t kMaxDepth = 768;
constexpr int64_t kBlockRows = 192;

int64_t slice_depth(int64_t K) {
  const int64_t slices = std::max<int64_t>(1, (K + kMaxDepth - 1) / kMaxDepth);
  return std::max<int64_t>(1, (K + slices - 1) / slices);
}

// Below this many rows the weights stream from DRAM once, whole panels at a
// time; slicing K would break that stream for little reuse.
constexpr int64_t kBlockedMinRows = 128;
// The fewest panels one unit of work runs (see panel_run_length).
constexpr int64_t kMinRunPanels = 4;
// The most panels a prefill-sized unit runs. Its output block (kBlockRows
// rows by the run's features, 384 KB at 32 panels; for the gated matmul, its
// slab) is read and written again for every K slice after the first, so it
// should stay in L2 beside x's row block. Uncapped, a gate/up unit of 1,024
// or 2,048 rows ran 64 or 96 panels. On the 2-core AVX-512 Xeon (2 MB L2 per
// core), 30 layers' weights cycling, the gated gate/up ran at 352-362 GFLOP/s
// uncapped and 377-386 capped (medians of 11 alternated rounds, two
// sittings), and the 128-request trace in-process at 1.016-1.018x the
// total tok/s (two alternated pairs).
constexpr int64_t kMaxBlockRunPanels = 32;
static_assert(kMaxBlockRunPanels % 2 == 0 && kMaxBlockRunPanels % kTilePanels == 0, "runs hold whole gate/up pairs and whole tiles");

// One register tile: out[0..MR)[0..ncols) = a . b over kc (+ bias), or +=
// when accumulate. b is NP adjacent panels (or slices of them), [kc][16]
// each, ldb floats apart; ncols <= NP * 16. a holds MR rows of x: in place
// (row i at a + i * lda) or, Packed, interleaved by pack_rows (a[k * MR + i]).
// Prefetches pf_lines cache lines (16 floats each) of each of pf_panels
// panels from pf (ldb apart) along the way, spread over the k loop, into L1
// or, pf_to_l2, into L2.
template <int MR, int NP, bool Packed>
void panel_tile(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb, int64_t kc,
                float* __restrict out, int64_t ldo, int64_t ncols, bool accumulate, const float* __restrict bias,
                const float* pf, int64_t pf_panels, int64_t pf_lines, bool pf_to_l2) {
#if defined(__AVX512F__) || defined(__AVX2__)
  // k runs in steps of kStep with a share of the prefetches each. Packed
  // (prefill) tiles take 16: with 8 and no unrolling, the trace's prefill
  // iterations took 72-73 s instead of 60-65 s (AVX2, Zen 3).
  constexpr int64_t kStep = Packed ? 16 : 8;
  const int64_t steps = std::max<int64_t>(1, (kc + kStep - 1) / kStep);
  const int64_t per_step = (pf_lines + steps - 1) / steps;
  const auto prefetch_share = [&] {
    for (int64_t q = 0; q < per_step && pf_lines > 0; ++q, --pf_lines, pf += kPanel)
      for (int64_t j = 0; j < pf_panels; ++j) {
        if (pf_to_l2)
          _mm_prefetch(reinterpret_cast<const char*>(pf + j * ldb), _MM_HINT_T1);
        else
          _mm_prefetch(reinterpret_cast<const char*>(pf + j * ldb), _MM_HINT_T0);
      }
  };
#endif
#ifdef __AVX512F__
  __m512 c[NP][MR];
  _Pragma("GCC unroll 2") for (int j = 0; j < NP; ++j)
  _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) c[j][i] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < kc; k0 += kStep) {
    prefetch_share();
    const int64_t k1 = std::min(kc, k0 + kStep);
    _Pragma("GCC unroll 4") for (int64_t k = k0; k < k1; ++k) {
      // Unaligned loads: a panel row is 64 bytes, but panels need only be
      // 32-byte aligned (the AVX2 build's rule); on aligned data they cost the same.
      __m512 bv[NP];
      _Pragma("GCC unroll 2") for (int j = 0; j < NP; ++j) bv[j] = _mm512_loadu_ps(b + j * ldb + k * kPanel);
      _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) {
        const __m512 av = _mm512_set1_ps(Packed ? a[k * MR + i] : a[i * lda + k]);
        _Pragma("GCC unroll 2") for (int j = 0; j < NP; ++j) c[j][i] = _mm512_fmadd_ps(av, bv[j], c[j][i]);
      }
    }
  }
  // Straight from the registers into out, the columns past ncols masked off.
  _Pragma("GCC unroll 2") for (int j = 0; j < NP; ++j) {
    const int64_t cols = std::min<int64_t>(kPanel, std::max<int64_t>(0, ncols - j * kPanel));
    const __mmask16 keep = static_cast<__mmask16>((1u << cols) - 1u);
    const __m512 add = !accumulate && bias ? _mm512_maskz_loadu_ps(keep, bias + j * kPanel) : _mm512_setzero_ps();
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) {
      float* o = out + i * ldo + j * kPanel;
      _mm512_mask_storeu_ps(o, keep, _mm512_add_ps(c[j][i], accumulate ? _mm512_maskz_loadu_ps(keep, o) : add));
    }
  }
#else
  alignas(32) float t[MR][NP * kPanel];
#ifdef __AVX2__
  __m256 c0[NP][MR], c1[NP][MR];
  _Pragma("GCC unroll 2") for (int j = 0; j < NP; ++j)
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    c0[j][i] = _mm256_setzero_ps();
    c1[j][i] = _mm256_setzero_ps();
  }
  for (int64_t k0 = 0; k0 < kc; k0 += kStep) {
    prefetch_share();
    const int64_t k1 = std::min(kc, k0 + kStep);
    _Pragma("GCC unroll 4") for (int64_t k = k0; k < k1; ++k)
    _Pragma("GCC unroll 2") for (int j = 0; j < NP; ++j) {
      const float* bk = b + j * ldb + k * kPanel;
      const __m256 b0 = _mm256_load_ps(bk), b1 = _mm256_load_ps(bk + 8);
      _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(Packed ? a + k * MR + i : a + i * lda + k);
        c0[j][i] = _mm256_fmadd_ps(av, b0, c0[j][i]);
        c1[j][i] = _mm256_fmadd_ps(av, b1, c1[j][i]);
      }
    }
  }
  _Pragma("GCC unroll 2") for (int j = 0; j < NP; ++j)
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(t[i] + j * kPanel, c0[j][i]);
    _mm256_store_ps(t[i] + j * kPanel + 8, c1[j][i]);
  }
#else
  (void)pf;
  (void)pf_panels;
  (void)pf_lines;
  (void)pf_to_l2;
  for (int i = 0; i < MR; ++i)
    for (int64_t c = 0; c < NP * kPanel; ++c) t[i][c] = 0.f;
  for (int64_t k = 0; k < kc; ++k)
    for (int i = 0; i < MR; ++i) {
      const float av = Packed ? a[k * MR + i] : a[i * lda + k];
      for (int j = 0; j < NP; ++j) {
#pragma omp simd
        for (int64_t c = 0; c < kPanel; ++c) t[i][j * kPanel + c] += av * b[j * ldb + k * kPanel + c];
      }
    }
#endif
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < ncols; ++j)
      out[i * ldo + j] = t[i][j] + (accumulate ? out[i * ldo + j] : (bias ? bias[j] : 0.f));
#endif
}

using PanelTileFn = decltype(&panel_tile<1, 1, false>);
// kPanelTiles<Packed, NP>[r]: the tile of r rows by NP panels, 1 <= r <= kTileRows.
template <bool Packed, int NP, size_t... R>
constexpr std::array<PanelTileFn, kTileRows + 1> panel_tiles(std::index_sequence<R...>) {
  return {nullptr, &panel_tile<R + 1, NP, Packed>...};
}
template <bool Packed, int NP>
constexpr auto kPanelTiles = panel_tiles<Packed, NP>(std::make_index_sequence<kTileRows>{});

// x rows [0, rows) x columns [k0, k0 + kc) -> dst, tile by tile: tile t holds
// its r = min(kTileRows, rows - kTileRows * t) rows interleaved, k-major ([kc][r]).
void pack_rows(const float* __restrict x, int64_t ldx, int64_t rows, int64_t k0, int64_t kc, float* __restrict dst) {
  for (int64_t m = 0; m < rows; m += kTileRows) {
    const int64_t r = std::min(kTileRows, rows - m);
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t i = 0; i < r; ++i) dst[k * r + i] = x[(m + i) * ldx + k0 + k];
    dst += r * kc;
  }
}

// One run of tiles: `rows` rows of op (the caller's row block, rows ldo
// apart; op's column 0 is output feature n_base), panels [p0, p1), K
// columns [k0, k0 + kc). a is that block's x in
// place (at column k0, rows ldx apart) or, Packed, its slice in tile order
// (pack_rows). Each tile prefetches its share of the next panels' lines of
// this slice.
//
// Where those lines go: into L2 for prefill-sized tiles, whose slices (up
// to kMaxDepth x 16 floats a panel) L1 does not hold beside the current
// ones, and when 7-18 rows (2-3 AVX2 tiles) sweep a decode-sized panel.
// For the latter, side by side on Zen 4 (30 layers' GEMMs cycling, medians),
// that took 0.75-0.81x the time of L1 prefetches at 8 rows, 0.80-0.87x at
// 12, 0.85-0.99x at 16 and 0.92x at 18. The likely reason: such a panel (K x 16 floats, 36-96 KB for SmolLM2) does not fit in L1 (32 KB),
// so lines prefetched into L1 for the next panel evict the current one's,
// which the later tiles then read from L2 after all. From 4 tiles up the two
// measured within noise (0.94-1.04x).
//
// Up to 6 rows every line is read once, in order, and the hardware
// prefetchers stream it better than our hints do, once the panels sit on
// 2 MiB pages (PanelArena): with no software prefetch there, the 30 layers'
// matmuls and the LM head took 0.91-0.95x the time at 1-6 rows (two
// sittings, medians of 21 alternated rounds), where at 7-16 rows going
// without took 1.13-1.28x. A plain two-thread read of 512 MB measured the
// same way: 33.8 GB/s without hints, 25.7-31.1 GB/s with. (All of this was
// measured with AVX2's 6-row tiles; the limits are kept in rows, which is
// what the AVX-512 build's first measurements on a Xeon agreed with: one
// 12-row tile at 8 rows, left without prefetches, ran at 0.79x the rate of
// AVX2's two tiles with them.)
constexpr int64_t kNoPrefetchMaxRows = 6;
constexpr int64_t kL2PrefetchMaxRows = 18;

template <bool Packed>
void panel_run(const float* a, int64_t ldx, int64_t rows, int64_t K, int64_t k0, int64_t kc, const float* pp,
               int64_t p0, int64_t p1, float* op, int64_t ldo, int64_t n_base, int64_t N, const float* bp) {
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t share = (kc + tiles - 1) / tiles;  // next panels' lines (one per k) each tile prefetches
  const bool pf_to_l2 = Packed || (rows > kNoPrefetchMaxRows && rows <= kL2PrefetchMaxRows);
  const bool prefetch = Packed || rows > kNoPrefetchMaxRows;
  const int64_t ldb = K * kPanel;
  for (int64_t p = p0; p < p1; p += kTilePanels) {
    const int64_t np = std::min(kTilePanels, p1 - p), n0 = p * kPanel, ncols = std::min(np * kPanel, N - n0);
    const float* b = pp + p * ldb + k0 * kPanel;
    const int64_t next_np = prefetch ? std::min(kTilePanels, p1 - p - np) : 0;
    const float* next = next_np > 0 ? b + np * ldb : nullptr;
    const auto& tile = np == kTilePanels ? kPanelTiles<Packed, kTilePanels> : kPanelTiles<Packed, 1>;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m = t * kTileRows, r = std::min(kTileRows, rows - m);
      const int64_t lo = std::min(kc, t * share), lines = next ? std::min(kc, lo + share) - lo : 0;
      tile[r](Packed ? a + m * kc : a + m * ldx, ldx, b, ldb, kc, op + m * ldo + n0 - n_base, ldo, ncols, k0 > 0,
              bp ? bp + n0 : nullptr, next ? next + lo * kPanel : nullptr, next_np, lines, pf_to_l2);
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

// Units of work per thread a matmul is cut into: kUnitsPerThread, or, when
// all of x is one row block (up to 192 rows: decode steps of as many
// requests), kOneBlockUnitsPerThread. Each unit starts on panels that were
// not prefetched and reads its x rows again, so a decode-sized matmul wants
// few long runs; a thread held up by the host (what the units are for)
// still leaves the other one or two units to take. On the 2-core Xeon,
// SmolLM2's four layer matmuls (30 layers' weights cycling, medians of 7-9
// alternated rounds) ran 6-12% faster with 3 units per thread than with 8
// from 1 to 192 rows (AVX-512 build; 2-8% in the AVX2 build), and 30-layer
// decode steps of 16 / 64 / 128 requests took 0.95x / 0.96x / 0.97x the
// time (at 16 / 128, 0.94x / 0.98x beside a 2 ms-in-20 ms busy loop). 2 or
// 4 per thread were no faster than 3 at 64-192 rows. With several row
// blocks, whose last is ragged, 3 per thread left the threads uneven (256
// rows: 0.94x the rate of 8).
constexpr int64_t kUnitsPerThread = 8;
constexpr int64_t kOneBlockUnitsPerThread = 3;

// Panels per unit of work, cutting a matmul's P panels into runs so that
// `blocks` row blocks x runs give each thread the units above, no run
// shorter than kMinRunPanels unless the matmul has fewer panels than that.
// Gated (SiLU-and-mul) runs are whole gate/up panel pairs.
int64_t panel_run_length(int64_t P, int64_t blocks, bool gated) {
  const int64_t units = (blocks == 1 ? kOneBlockUnitsPerThread : kUnitsPerThread) * at::get_num_threads();
  const int64_t want = (units + blocks - 1) / blocks;
  const int64_t runs = std::max<int64_t>(1, std::min(want, P / kMinRunPanels));
  const int64_t run = (P + runs - 1) / runs, whole = gated ? 2 : kTilePanels;
  return (run + whole - 1) / whole * whole;
}

// Gated matmuls (panel_linear_silu_mul): the panels alternate gate and up,
// panel 2j holding gate features [16j, 16j + 16) and panel 2j + 1 the same up
// features, so a unit's run holds whole pairs. Its tiles write into a slab
// of the calling thread's, [rows][run's features], which silu_mul_slab then
// turns into out's [rows][run's features / 2] while it is in cache: the
// [M, 2 * I] product is never written out whole, and no second pass reads it
// back (on the 128-request trace, SmolLM2's separate silu_and_mul took
// ~0.9 s of ~60).
float* unit_slab(int64_t floats) {
  thread_local std::vector<float> slab;
  if (slab.size() < static_cast<size_t>(floats)) slab.resize(floats);
  return slab.data();
}

void silu_mul_slab(const float* __restrict slab, int64_t rows, int64_t panels, float* __restrict out, int64_t ldo) {
  const int64_t width = panels * kPanel;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < panels / 2; ++j) {
      const float* gate = slab + r * width + 2 * j * kPanel;
      const float* up = gate + kPanel;
      float* o = out + r * ldo + j * kPanel;
#pragma omp simd
      for (int64_t c = 0; c < kPanel; ++c) o[c] = silu_times(gate[c], up[c]);
    }
}

// What panel_linear and panel_linear_silu_mul check and read of their
// arguments (panel_args, below). N is the number of the panels' features
// that out's width stands for: all of its columns, or, gated, twice as many.
struct PanelArgs {
  const float *xp, *pp, *bp;
  float* op;
  int64_t M, K, N, P, ldx, ldo;
};

// One unit of work: out's rows [m0, m0 + rows) x panels [p0, p1), over K in
// slices of `depth`. x_at(k0) is x's rows at column k0 as panel_run<Packed>
// reads them. Gated, the tiles write into the thread's slab, and the unit
// ends by turning it into silu(gate) * up in out.
template <bool Packed, bool Gated, typename XAt>
void panel_unit(const PanelArgs& a, const XAt& x_at, int64_t m0, int64_t rows, int64_t p0, int64_t p1,
                int64_t depth) {
  const int64_t width = (p1 - p0) * kPanel;
  float* dst = Gated ? unit_slab(rows * width) : a.op + m0 * a.ldo;
  const int64_t ldd = Gated ? width : a.ldo, n_base = Gated ? p0 * kPanel : 0;
  // k0 == 0 runs even when K == 0, so out still gets the bias (or zeros).
  for (int64_t k0 = 0; k0 == 0 || k0 < a.K; k0 += depth)
    panel_run<Packed>(x_at(k0), a.ldx, rows, a.K, k0, std::min(depth, a.K - k0), a.pp, p0, p1, dst, ldd, n_base, a.N,
                      a.bp);
  if (Gated) silu_mul_slab(dst, rows, p1 - p0, a.op + m0 * a.ldo + p0 / 2 * kPanel, a.ldo);
}

// Decode-sized batches: out [M, N] = x [M, K] . W^T (+ bias), x read in place,
// runs of whole panels, each panel streamed once (K in one slice). Gated:
// out [M, N / 2].
template <bool Gated>
void panel_sweep_rows(const PanelArgs& a) {
  const int64_t run = panel_run_length(a.P, 1, Gated);
  parallel_units((a.P + run - 1) / run, [&](int64_t u) {
    const int64_t p0 = u * run;
    panel_unit<false, Gated>(a, [&](int64_t) { return a.xp; }, 0, a.M, p0, std::min(a.P, p0 + run),
                             std::max<int64_t>(a.K, 1));
  });
}

// Prefill-sized batches: x is packed once, every (row block, K slice) in tile
// order, by all threads together; then the work goes out in units of one row
// block x a run of panels, each over every K slice. Both phases hand out
// their units with parallel_units. The pack buffer is kept per calling
// thread and grows to the largest x seen. Gated: out [M, N / 2].
template <bool Gated>
void panel_sweep_blocks(const PanelArgs& a) {
  const int64_t M = a.M, K = a.K, depth = slice_depth(K);
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows, slices = std::max<int64_t>(1, (K + depth - 1) / depth);
  thread_local std::vector<float> packed;
  if (packed.size() < static_cast<size_t>(M * K)) packed.resize(M * K);
  float* pk = packed.data();
  // Block b's slice starting at k0 sits at b * kBlockRows * K + k0 * rows.
  parallel_units(blocks * slices, [&](int64_t u) {
    const int64_t m0 = (u / slices) * kBlockRows, k0 = (u % slices) * depth;
    const int64_t rows = std::min(kBlockRows, M - m0);
    pack_rows(a.xp + m0 * a.ldx, a.ldx, rows, k0, std::min(depth, K - k0), pk + m0 * K + k0 * rows);
  });
  const int64_t run = std::min(panel_run_length(a.P, blocks, Gated), kMaxBlockRunPanels);
  parallel_units(blocks * ((a.P + run - 1) / run), [&](int64_t u) {
    const int64_t m0 = (u % blocks) * kBlockRows, rows = std::min(kBlockRows, M - m0), p0 = (u / blocks) * run;
    panel_unit<true, Gated>(a, [&](int64_t k0) { return pk + m0 * K + k0 * rows; }, m0, rows, p0,
                            std::min(a.P, p0 + run), depth);
  });
}

PanelArgs panel_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& panels,
                     const c10::optional<at::Tensor>& bias, bool gated) {
  check_rows(x, "x");
  check_rows(out, "out");
  const int64_t N = gated ? 2 * out.size(1) : out.size(1);
  TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.is_contiguous() && panels.dim() == 3 &&
                  panels.size(2) == kPanel,
              "panels must be a contiguous float32 [P, K, 16] tensor from pack_panels");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K, "x has ", K, " features but the weight takes ", panels.size(1));
  if (gated) {
    TORCH_CHECK(P % 2 == 0, "a gated matmul takes gate/up pairs of panels, an even number; got ", P, " panels");
    TORCH_CHECK(out.size(0) == M && N == P * kPanel, "out must be [", M, ", ", P * kPanel / 2, "]: half the ",
                P * kPanel, " features of the panels");
  } else {
    TORCH_CHECK(out.size(0) == M && N > (P - 1) * kPanel && N <= P * kPanel,
                "out must be [", M, ", N] with N within the panels' ", P * kPanel, " features");
  }
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_vector(*bias, N, "bias");
    bp = bias->data_ptr<float>();
  }
  const float* pp = panels.data_ptr<float>();
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(pp) % 32 == 0, "panels must be 32-byte aligned (as pack_panels returns them)");
  return {x.data_ptr<float>(), pp, bp, out.data_ptr<float>(), M, K, N, P, x.stride(0), out.stride(0)};
}

template <bool Gated>
void panel_sweep(const PanelArgs& a) {
  if (a.M == 0 || a.P == 0) return;  // nothing to write (P == 0: a weight of no rows, out of no columns)
  if (a.M >= kBlockedMinRows)
    panel_sweep_blocks<Gated>(a);
  else
    panel_sweep_rows<Gated>(a);
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
  panel_sweep<false>(panel_args(out, x, panels, bias, false));
}

// out [M, I] = silu(x W_gate^T + b_gate) * (x W_up^T + b_up), the merged
// [W_gate; W_up] given as pack_panels of its rows interleaved 16 by 16
// (gate 0-15, up 0-15, gate 16-31, ...; packed_gemm.interleave_gate_up),
// and the bias, when given, interleaved the same way. I must be a multiple
// of 16. Each gate/up product is the one panel_linear computes, bit for bit.
void panel_linear_silu_mul(at::Tensor out, const at::Tensor& x, const at::Tensor& panels,
                           const c10::optional<at::Tensor>& bias) {
  panel_sweep<true>(panel_args(out, x, panels, bias, true));
}
