// What the CPU kernels' sources share: the ops the module exports (bound in
// cpu_ops.cpp, which also gives the overview), the panel width that the
// matmuls and Python's PanelArena agree on, and the helpers used by more
// than one source.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

// paged_attention.cpp
bool supports_head_dim(int64_t head_dim);
void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_table, const at::Tensor& query_start, const at::Tensor& seq_lens,
                     double scale);

// elementwise.cpp
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm(at::Tensor out, at::Tensor sum, const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
                  double eps);
void silu_and_mul(at::Tensor out, const at::Tensor& x);
void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping);
void rotary_embedding(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos_sin,
                      int64_t num_rot_heads, int64_t head_dim);

// panel_gemm.cpp
constexpr int64_t kPanel = 16;  // output features per panel
at::Tensor pack_panels(const at::Tensor& weight, const c10::optional<at::Tensor>& out);
void panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& bias);
void panel_linear_silu_mul(at::Tensor out, const at::Tensor& x, const at::Tensor& panels,
                           const c10::optional<at::Tensor>& bias);

// decoder_stack.cpp: a stage's Llama-family decoder layers in one call.
class DecoderStack {
 public:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale);
  // One layer's weights, in stack order: its norms' weights, and the
  // matmuls' pack_panels (gate_up interleaved as for panel_linear_silu_mul,
  // its bias too), RoPE's cos_sin table.
  void add_layer(at::Tensor input_norm, at::Tensor post_norm, at::Tensor qkv, c10::optional<at::Tensor> qkv_bias,
                 at::Tensor o, c10::optional<at::Tensor> o_bias, at::Tensor gate_up,
                 c10::optional<at::Tensor> gate_up_bias, at::Tensor down, c10::optional<at::Tensor> down_bias,
                 at::Tensor cos_sin);
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  // (the last layer's MLP output, the residual stream before it), as the
  // Python layers return them, from x, the stream into the stage. Each
  // layer's K/V go into kv_caches[i] ([2, blocks, block_size, kv_heads,
  // head_dim]); the metadata is paged_attention's and write_kv's. Layer
  // sampled_only_layer (-1: none) runs past its K/V write on the rows
  // sample_rows alone, their query offsets sample_query_start.
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& positions,
                                             const std::vector<at::Tensor>& kv_caches,
                                             const at::Tensor& slot_mapping, const at::Tensor& block_table,
                                             const at::Tensor& query_start, const at::Tensor& seq_lens,
                                             const c10::optional<at::Tensor>& sample_rows,
                                             const c10::optional<at::Tensor>& sample_query_start,
                                             int64_t sampled_only_layer) const;

 private:
  struct Layer {
    at::Tensor input_norm, post_norm, qkv;
    c10::optional<at::Tensor> qkv_bias;
    at::Tensor o;
    c10::optional<at::Tensor> o_bias;
    at::Tensor gate_up;
    c10::optional<at::Tensor> gate_up_bias;
    at::Tensor down;
    c10::optional<at::Tensor> down_bias;
    at::Tensor cos_sin;
    int64_t intermediate;
  };
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  std::vector<Layer> layers_;
};

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

// silu(g) * u, the sigmoid taken from exp(-|g|) <= 1 so that it never
// overflows for large |g| (vectorizes like exp_nonpositive).
inline float silu_times(float g, float u) {
  const float e = exp_nonpositive(-std::fabs(g));
  return g * ((g >= 0.f ? 1.f : e) / (1.f + e)) * u;
}

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1,
              name, " must be a 2-D float32 CPU tensor with contiguous rows");
}

// A norm weight or a bias: n float32 values in one contiguous CPU vector.
inline void check_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous() && t.dim() == 1 &&
                  t.numel() == n,
              name, " must be a contiguous float32 vector of ", n, " values, on the CPU");
}
