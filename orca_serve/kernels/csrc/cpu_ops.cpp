// CPU kernels for orca-serve, built on first use by orca_serve/kernels/__init__.py
// into one module.
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
// Prompt rows are register-tiled for the specialized head sizes that are
// multiples of 16, with the scores built transposed (keys x queries) so K
// is read in place: six prompts of 224-512 tokens took 0.80-0.82x the time
// of the previous tiling, which copied every 16-key tile of K into [D][16]
// for every task (itself 1.25-1.45x the per-row loop). P.V then runs over L1-sized chunks
// of keys, with the softmax max kept by the score tiles and the
// exponentials taken per chunk, and the queries transposed 8 x 8 in
// registers: those prompts took 0.86-0.89x the time again, chunks plus
// decodes 0.86-0.95x.
//
// pack_panels, panel_linear: the layers' matmuls against weights repacked once
// into 16-feature panels, for decode-sized and prefill-sized batches (see
// panel_gemm.cpp); panel_linear_silu_mul, SwiGLU's gate/up matmul with
// silu(gate) * up applied to each unit of work's product while it is in cache.
//
// DecoderStack (decoder_stack.cpp): a stage's Llama-family layers, all of
// the above in one call, so that no op returns to Python between them.
//
// The sources: paged_attention.cpp (with attention_common.h,
// attention_prompt.h, attention_decode.h), elementwise.cpp, panel_gemm.cpp,
// decoder_stack.cpp;
// cpu_ops.h declares what they export. This file binds them into one module.
#include <torch/extension.h>

#include "cpu_ops.h"

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
  // The vector extension the build targets (orca_serve.kernels.ISAS).
#if defined(__AVX512F__)
  m.attr("isa") = "avx512";
#elif defined(__AVX2__)
  m.attr("isa") = "avx2";
#else
  m.attr("isa") = "generic";
#endif
  m.def("panel_linear", &panel_linear, "x W^T (+ bias) against a pack_panels weight", release());
  m.def("panel_linear_silu_mul", &panel_linear_silu_mul,
        "silu(x W_gate^T) * (x W_up^T) (+ biases) against pack_panels(interleave_gate_up(W))", release());
  m.def("supports_head_dim", &supports_head_dim, "whether a head_dim has a compiled kernel");
  // Local to this module: each ISA's build is its own module, and two
  // loaded in one process would otherwise register the same C++ type twice.
  py::class_<DecoderStack>(m, "DecoderStack", py::module_local(),
                           "a stage's Llama-family decoder layers run in one call")
      .def(py::init<int64_t, int64_t, int64_t, double, double>(), py::arg("num_heads"), py::arg("num_kv_heads"),
           py::arg("head_dim"), py::arg("eps"), py::arg("scale"))
      .def("add_layer", &DecoderStack::add_layer, py::arg("input_norm"), py::arg("post_norm"), py::arg("qkv"),
           py::arg("qkv_bias"), py::arg("o"), py::arg("o_bias"), py::arg("gate_up"), py::arg("gate_up_bias"),
           py::arg("down"), py::arg("down_bias"), py::arg("cos_sin"))
      .def_property_readonly("num_layers", &DecoderStack::num_layers)
      .def("forward", &DecoderStack::forward, py::arg("x"), py::arg("positions"),
           py::arg("kv_caches"), py::arg("slot_mapping"), py::arg("block_table"), py::arg("query_start"),
           py::arg("seq_lens"), py::arg("sample_rows"), py::arg("sample_query_start"),
           py::arg("sampled_only_layer"), release());
}
