// paged_attention: every query row of a mixed batch attends to its
// request's context in the paged KV pool, in one call per layer (see
// cpu_ops.cpp for why, and attention_prompt.h / attention_decode.h for the
// kernels it hands its tasks to).
#include "attention_decode.h"
#include "attention_prompt.h"

namespace {

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
