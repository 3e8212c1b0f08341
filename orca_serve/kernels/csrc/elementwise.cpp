// The elementwise parts of a Llama layer, one pass over memory each: RMSNorm
// (with the residual add before it), SiLU-and-mul, in-place RoPE, and the
// write of a batch's new K/V rows into the paged pool.
#include "cpu_ops.h"

namespace {

// Rows per parallel task: enough work (~16K floats) to amortize the fork.
int64_t grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

// out[t] = weight * r / sqrt(mean(r^2) + eps), as HF computes it in float32,
// for each row t of r = x, or, with h, r = x + h (also written to sum).
void norm_rows(at::Tensor out, const at::Tensor& x, const at::Tensor* h, at::Tensor* sum, const at::Tensor& weight,
               double eps) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes(), "out and x must have the same shape");
  check_vector(weight, x.size(1), "weight");
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
      for (int64_t i = 0; i < n; ++i) o[i] = silu_times(gate[i], up[i]);
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
