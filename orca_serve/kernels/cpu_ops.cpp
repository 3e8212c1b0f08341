// CPU kernels for orca-serve, built on first use by orca_serve/kernels/__init__.py.
//
// rms_norm, silu_and_mul, rotary_embedding: the elementwise parts of a Llama
// layer in one pass over memory each. PyTorch runs them as chains of
// separate ops (pow, mean, rsqrt, mul, mul; chunk, silu, mul; cat, neg, mul,
// mul, add), each reading and writing the whole activation: at a 2048-token
// prefill that chain cost ~30 ms per layer, against ~3 ms here.
//
// paged_decode_attention: one query token per request attends to its whole
// context directly in the paged KV pool. The pure-PyTorch path has to gather
// every request's blocks into a padded copy first (read + write + read of the
// whole context per layer); this kernel reads each K and V row once, and each
// row serves all query heads that share its KV head (GQA).
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

// One request, all its heads. q: [heads, D] with heads = kv_heads * group, head
// h*group+g reading KV head h; scores: [heads, context_len]; out: [heads, D].
// K/V rows of the pool are [kv_heads, D] (row_stride = kv_heads * D floats).
template <int D>
void decode_one(const float* __restrict q, const float* __restrict k_cache, const float* __restrict v_cache,
                const int64_t* __restrict blocks, int64_t context_len, int64_t block_size, int64_t kv_heads,
                int64_t group, int d_runtime, float scale, float* __restrict scores, float* __restrict out) {
  const int D_ = D > 0 ? D : d_runtime;
  const int64_t row_stride = kv_heads * D_, heads = kv_heads * group;
  for (int64_t t0 = 0; t0 < context_len; t0 += block_size) {
    const int64_t n = std::min(block_size, context_len - t0);
    const float* kb = k_cache + blocks[t0 / block_size] * block_size * row_stride;
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t g = 0; g < group; ++g)
        block_scores<D>(q + (h * group + g) * D_, kb + h * D_, n, row_stride, D_, scale,
                        scores + (h * group + g) * context_len + t0);
  }
  for (int64_t hg = 0; hg < heads; ++hg) {
    float* s = scores + hg * context_len;
    float m = -INFINITY;
    for (int64_t t = 0; t < context_len; ++t) m = std::max(m, s[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < context_len; ++t) {
      s[t] = exp_nonpositive(s[t] - m);
      sum += s[t];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t t = 0; t < context_len; ++t) s[t] *= inv;
  }
  std::fill(out, out + heads * D_, 0.f);
  for (int64_t t0 = 0; t0 < context_len; t0 += block_size) {
    const int64_t n = std::min(block_size, context_len - t0);
    const float* vb = v_cache + blocks[t0 / block_size] * block_size * row_stride;
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t g = 0; g < group; ++g) {
        const int64_t hg = h * group + g;
        const float* w = scores + hg * context_len + t0;
        float acc[D > 0 ? D : kMaxHeadDim];
        std::copy(out + hg * D_, out + (hg + 1) * D_, acc);
        for (int64_t i = 0; i < n; ++i) {
          const float* vr = vb + i * row_stride + h * D_;
          const float wi = w[i];
#pragma omp simd
          for (int d = 0; d < D_; ++d) acc[d] += wi * vr[d];
        }
        std::copy(acc, acc + D_, out + hg * D_);
      }
  }
}

using DecodeFn = void (*)(const float*, const float*, const float*, const int64_t*, int64_t, int64_t, int64_t,
                          int64_t, int, float, float*, float*);

DecodeFn pick(int64_t head_dim) {
  switch (head_dim) {
    case 16: return decode_one<16>;
    case 32: return decode_one<32>;
    case 64: return decode_one<64>;
    case 80: return decode_one<80>;
    case 96: return decode_one<96>;
    case 128: return decode_one<128>;
    case 256: return decode_one<256>;
    default: return head_dim >= 1 && head_dim <= kMaxHeadDim ? decode_one<0> : nullptr;
  }
}

}  // namespace

bool supports_head_dim(int64_t head_dim) { return pick(head_dim) != nullptr; }

// out, q: [n, num_kv_heads, group, head_dim]; k_cache, v_cache: [num_blocks, block_size,
// num_kv_heads, head_dim]; block_table: [n, max_blocks] int64; context_lens: [n] int64.
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_table,
                            const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 4 && out.sizes() == q.sizes(), "q and out must be [n, kv_heads, group, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache/v_cache must be [num_blocks, block_size, kv_heads, head_dim]");
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &q, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "paged_decode_attention takes contiguous float32 CPU tensors");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.is_contiguous() && block_table.dim() == 2,
              "block_table must be a contiguous int64 [n, max_blocks] tensor");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous(),
              "context_lens must be a contiguous int64 tensor");
  const int64_t n = q.size(0), hkv = q.size(1), group = q.size(2), d = q.size(3);
  const int64_t block_size = k_cache.size(1), num_blocks = k_cache.size(0), max_blocks = block_table.size(1);
  TORCH_CHECK(k_cache.size(2) == hkv && k_cache.size(3) == d, "KV cache heads/head_dim do not match q");
  TORCH_CHECK(block_table.size(0) == n && context_lens.numel() == n, "block_table/context_lens must have n rows");
  DecodeFn fn = pick(d);
  TORCH_CHECK(fn != nullptr, "paged_decode_attention: unsupported head_dim ", d);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= max_blocks * block_size, "context length ", lens[r], " of row ", r,
                " does not fit its block table");
    for (int64_t b = 0; b < (lens[r] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(table[r * max_blocks + b] >= 0 && table[r * max_blocks + b] < num_blocks,
                  "block id out of range in row ", r);
  }
  const int64_t max_len = *std::max_element(lens, lens + n);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // One task per request: a pool row holds all KV heads of a slot, so reading
  // all heads together streams whole rows.
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(hkv * group * max_len);
    for (int64_t r = begin; r < end; ++r)
      fn(qp + r * hkv * group * d, kp, vp, table + r * max_blocks, lens[r], block_size, hkv, group,
         static_cast<int>(d), sc,
         scores.data(), op + r * hkv * group * d);
  });
}

namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1,
              name, " must be a 2-D float32 CPU tensor with contiguous rows");
}

// Rows per parallel task: enough work (~16K floats) to amortize the fork.
int64_t grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

}  // namespace

// out[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps), as HF computes it in float32.
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes(), "out and x must have the same shape");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be a contiguous float32 vector of the hidden size");
  const int64_t rows = x.size(0), h = x.size(1), xs = x.stride(0), os = out.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * xs;
      float* orow = op + r * os;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < h; ++i) ss += xr[i] * xr[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) orow[i] = wp[i] * (xr[i] * inv);
    }
  });
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("rotary_embedding", &rotary_embedding, "in-place rotate-half RoPE of q and k heads");
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV pool");
  m.def("supports_head_dim", &supports_head_dim, "whether a head_dim has a compiled kernel");
}
