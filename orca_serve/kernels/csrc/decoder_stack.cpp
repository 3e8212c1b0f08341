// DecoderStack: a pipeline stage's Llama-family decoder layers run back to
// back in one call, each layer the same native ops in the same order as the
// Python layers call them one by one (RMSNorm with the residual add, the QKV
// matmul, RoPE, the K/V write, paged attention, o_proj, the fused gate/up
// with SiLU, down_proj), so the hidden states come out bit for bit the same.
//
// Why: each op returning to Python costs more than its Python lines. The
// layer's matmuls and attention stream hundreds of MB (weights, the KV
// pool) through the caches, and the interpreter and torch's dispatch code
// that run next find none of their own code or data there: on this
// project's 2-core Xeon the first `tensor.view` after a 30-layer decode
// matmul took 35-43 us, the next ones ~1 us. With ~270 ops an iteration,
// SmolLM2's decode steps (64 requests) spent 21-24 ms of 162-172 ms between
// the native ops, prefill iterations ~95 ms of ~2 s. Here the only code
// between two ops is this file's loop and ATen's allocator.
#include "cpu_ops.h"

namespace {

// x [rows, in] . W^T (+ bias) through panel_linear into a new [rows, out] tensor.
at::Tensor matmul(const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& bias,
                  int64_t out_features) {
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  panel_linear(out, x, panels, bias);
  return out;
}

}  // namespace

DecoderStack::DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale)
    : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale) {
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
              "num_heads must be a positive multiple of num_kv_heads; got ", num_heads, " and ", num_kv_heads);
  TORCH_CHECK(supports_head_dim(head_dim), "DecoderStack: unsupported head_dim ", head_dim);
}

void DecoderStack::add_layer(at::Tensor input_norm, at::Tensor post_norm, at::Tensor qkv,
                             c10::optional<at::Tensor> qkv_bias, at::Tensor o, c10::optional<at::Tensor> o_bias,
                             at::Tensor gate_up, c10::optional<at::Tensor> gate_up_bias, at::Tensor down,
                             c10::optional<at::Tensor> down_bias, at::Tensor cos_sin) {
  const int64_t hidden = input_norm.numel(), qkv_features = (num_heads_ + 2 * num_kv_heads_) * head_dim_;
  const auto features = [](const at::Tensor& panels) { return panels.dim() == 3 ? panels.size(0) * kPanel : -1; };
  const auto in_features = [](const at::Tensor& panels) { return panels.dim() == 3 ? panels.size(1) : -1; };
  // The panels' widths are whole 16-feature panels; the last may be padding.
  TORCH_CHECK(in_features(qkv) == hidden && features(qkv) >= qkv_features && features(qkv) < qkv_features + kPanel,
              "qkv panels must hold [", qkv_features, ", ", hidden, "]");
  TORCH_CHECK(in_features(o) == num_heads_ * head_dim_ && features(o) >= hidden && features(o) < hidden + kPanel,
              "o panels must hold [", hidden, ", ", num_heads_ * head_dim_, "]");
  TORCH_CHECK(in_features(gate_up) == hidden && features(gate_up) % (2 * kPanel) == 0,
              "gate_up panels must hold gate/up pairs of 16 features over the hidden size ", hidden);
  TORCH_CHECK(in_features(down) == features(gate_up) / 2 && features(down) >= hidden && features(down) < hidden + kPanel,
              "down panels must hold [", hidden, ", ", features(gate_up) / 2, "]");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() && cos_sin.dim() == 3 &&
                  cos_sin.size(1) == 2 && cos_sin.size(2) == head_dim_,
              "cos_sin must be a contiguous float32 [positions, 2, ", head_dim_, "] tensor");
  // Norm weights and biases: what the kernels would refuse at the first
  // forward, refused here, where the layer is put together.
  check_vector(input_norm, hidden, "input_norm");
  check_vector(post_norm, hidden, "post_norm");
  if (qkv_bias) check_vector(*qkv_bias, qkv_features, "qkv_bias");
  if (o_bias) check_vector(*o_bias, hidden, "o_bias");
  if (gate_up_bias) check_vector(*gate_up_bias, features(gate_up), "gate_up_bias");
  if (down_bias) check_vector(*down_bias, hidden, "down_bias");
  layers_.push_back({input_norm, post_norm, qkv, qkv_bias, o, o_bias, gate_up, gate_up_bias, down, down_bias, cos_sin,
                     features(gate_up) / 2});
}

std::tuple<at::Tensor, at::Tensor> DecoderStack::forward(
    const at::Tensor& x_in, const at::Tensor& positions,
    const std::vector<at::Tensor>& kv_caches, const at::Tensor& slot_mapping, const at::Tensor& block_table,
    const at::Tensor& query_start, const at::Tensor& seq_lens, const c10::optional<at::Tensor>& sample_rows,
    const c10::optional<at::Tensor>& sample_query_start, int64_t sampled_only_layer) const {
  const int64_t L = static_cast<int64_t>(layers_.size());
  TORCH_CHECK(L > 0, "DecoderStack has no layers");
  TORCH_CHECK(static_cast<int64_t>(kv_caches.size()) == L, "one KV cache per layer: ", L, " layers, ",
              kv_caches.size(), " caches");
  TORCH_CHECK(sampled_only_layer >= -1 && sampled_only_layer < L, "sampled_only_layer must be -1 (none) or a layer "
              "below ", L, "; got ", sampled_only_layer);
  TORCH_CHECK(sampled_only_layer < 0 || (sample_rows.has_value() && sample_query_start.has_value()),
              "a sampled-only layer needs sample_rows and sample_query_start");
  check_rows(x_in, "x");
  const int64_t hidden = x_in.size(1), hkv = num_kv_heads_, group = num_heads_ / num_kv_heads_, d = head_dim_;
  const int64_t q_width = num_heads_ * d, kv_width = hkv * d;
  // Every cache checked before any layer writes to one.
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor& c = kv_caches[i];
    TORCH_CHECK(c.scalar_type() == at::kFloat && c.device().is_cpu() && c.is_contiguous() && c.dim() == 5 &&
                    c.size(0) == 2 && c.size(3) == hkv && c.size(4) == d,
                "layer ", i, "'s KV cache must be a contiguous float32 CPU tensor [2, blocks, block_size, ", hkv,
                ", ", d, "]; got ", c.sizes());
  }
  at::Tensor x = x_in, residual;
  // residual += x and the norm of the sum (into h), in one pass, as
  // RMSNorm.add_and_norm does for each of a layer's two residual adds.
  const auto add_and_norm = [&](const at::Tensor& x_, const at::Tensor& weight) {
    at::Tensor sum = at::empty_like(x_), h = at::empty_like(x_);
    add_rms_norm(h, sum, x_, residual, weight, eps_);
    residual = sum;
    return h;
  };
  for (int64_t i = 0; i < L; ++i) {
    const Layer& w = layers_[i];
    const at::Tensor k_cache = kv_caches[i].select(0, 0), v_cache = kv_caches[i].select(0, 1);
    // The residual stream and this layer's input norm: the stage's first
    // layer takes the stream as it comes (x), later ones add the previous
    // layer's MLP output to it in the same pass.
    at::Tensor h;
    if (i == 0) {
      residual = x;
      h = at::empty_like(x);
      rms_norm(h, x, w.input_norm, eps_);
    } else {
      h = add_and_norm(x, w.input_norm);
    }
    // Attention: q, k, v are column ranges of the QKV product, rotated in place.
    at::Tensor qkv = matmul(h, w.qkv, w.qkv_bias, (num_heads_ + 2 * hkv) * d);
    rotary_embedding(qkv, positions, w.cos_sin, num_heads_ + hkv, d);
    write_kv(k_cache, v_cache, qkv.narrow(1, q_width, kv_width), qkv.narrow(1, q_width + kv_width, kv_width),
             slot_mapping);
    at::Tensor q = qkv.narrow(1, 0, q_width), qs = query_start;
    const bool sampled_only = i == sampled_only_layer;
    if (sampled_only) {
      // Each request that samples keeps one query row, the last of its
      // context, and the rest of the layer runs on those rows alone.
      q = q.index_select(0, *sample_rows);
      qs = *sample_query_start;
      residual = residual.index_select(0, *sample_rows);
    }
    const int64_t rows = q.size(0);
    at::Tensor attn = at::empty({rows, hkv, group, d}, x.options());
    paged_attention(attn, q.view({rows, hkv, group, d}), k_cache, v_cache, block_table, qs, seq_lens, scale_);
    at::Tensor o = matmul(attn.view({rows, q_width}), w.o, w.o_bias, hidden);
    // MLP: the residual add and its norm in one pass, then SwiGLU.
    h = add_and_norm(o, w.post_norm);
    at::Tensor act = at::empty({rows, w.intermediate}, x.options());
    panel_linear_silu_mul(act, h, w.gate_up, w.gate_up_bias);
    x = matmul(act, w.down, w.down_bias, hidden);
  }
  return {x, residual};
}
