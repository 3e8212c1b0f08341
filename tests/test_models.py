"""Model forward passes against HF transformers on tiny random checkpoints."""
from __future__ import annotations

import pytest
import torch

from helpers_models import load_hf
from orca_serve.config import ModelConfig
from orca_serve.kernels import cpu_ops_for, paged_attention_kernel
from orca_serve.worker.kernel_binding import bind_cpu_kernels
from orca_serve.layers.attention import Attention
from orca_serve.layers.rotary import rope_parameters
from orca_serve.models.loader import get_model_facts, load_model
from orca_serve.models.registry import PRESETS, get_model_class, make_hf_config
from orca_serve.sampling_params import SamplingParams
from orca_serve.worker.input_batch import RequestState, prepare_inputs

KINDS = ["llama", "llama-tied-llama3rope", "qwen2", "llama-bias", "gpt2", "gpt2-untied"]
BLOCK = 4


def bind_cache(model, num_blocks: int = 32, dtype: torch.dtype = torch.float32) -> None:
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.kv_cache = torch.zeros(2, num_blocks, BLOCK, layer.num_kv_heads, layer.head_dim, dtype=dtype)


@torch.inference_mode()
def run_chunks(model, prompt: list[int], chunks: list[int], batched: bool = False) -> torch.Tensor:
    """Feed ``prompt`` in chunks through the paged cache; logits of every position."""
    state = RequestState("r", prompt, len(prompt), list(range(32)), 0, SamplingParams())
    rows = []
    for n in chunks:
        inputs = prepare_inputs([(state, n)], BLOCK, torch.device("cpu"), batched_attention=batched)
        rows.append(model.compute_logits(model(inputs.input_ids, inputs.positions, inputs.attn_metadata)))
        state.num_computed_tokens += n
    return torch.cat(rows)


@pytest.mark.parametrize("batched", [False, True], ids=["grouped", "batched"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf(tiny_model_dir, kind, batched):
    path = tiny_model_dir(kind)
    model, _ = load_model(ModelConfig(model=path))
    bind_cache(model)
    prompt = [(7 * i + 3) % 384 for i in range(45)]
    with torch.no_grad():
        ref = load_hf(path)(torch.tensor([prompt])).logits[0]
    # Whole prompt at once, then the same prompt in chunks (a decode-sized one
    # included), which reads earlier context back from the paged cache.
    for chunks in ([45], [13, 1, 20, 11]):
        ours = run_chunks(model, prompt, chunks, batched)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (chunks, (ours - ref).abs().max())
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_rope_model_matches_hf_in_that_dtype(tiny_model_dir, dtype, atol):
    # RoPE's float32 cos/sin promoted half-precision q and k to float32, which
    # the half-precision KV cache refused: every --dtype bfloat16/float16 Llama
    # failed on its first batch. (HF itself differs from float32 by ~0.03 here.)
    path = tiny_model_dir("llama")
    model, _ = load_model(ModelConfig(model=path, dtype=str(dtype).removeprefix("torch.")))
    bind_cache(model, dtype=dtype)
    prompt = [(7 * i + 3) % 384 for i in range(45)]
    with torch.no_grad():
        ref = load_hf(path).to(dtype)(torch.tensor([prompt])).logits[0].float()
    ours = run_chunks(model, prompt, [13, 1, 20, 11]).float()
    assert torch.allclose(ours, ref, atol=atol, rtol=0), (ours - ref).abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("kind,layout", [(kind, layout) for kind in ("llama", "gpt2")
                                          for layout in ("pytorch-grouped", "pytorch-batched", "native")]
                         + [("llama", "native-stack")])
def test_last_layer_runs_on_sampled_rows_only(tiny_model_dir, kind, layout):
    """With ``sampled_rows_only`` the model returns just the sampled rows, equal
    to those rows of the full forward, and writes the same K/V for every row.
    native-stack: every kernel bound as the runner binds them, the layers in
    one native call."""
    native, batched = layout.startswith("native"), layout == "pytorch-batched"
    model, _ = load_model(ModelConfig(model=tiny_model_dir(kind)))
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if layout == "native-stack":
        assert bind_cpu_kernels(model, layers, "on", torch.device("cpu"), torch.float32)
        assert model.model.native_stack is not None
    elif native:
        kernel = paged_attention_kernel("on", cpu_ops_for("on", "cpu", torch.float32), layers[0].head_dim)
        for layer in layers:
            layer.attention_kernel = kernel
    caches = {mode: [torch.zeros(2, 32, BLOCK, m.num_kv_heads, m.head_dim) for m in layers]
              for mode in ("full", "sampled")}
    # a: a 10-token prompt, then a decode; b: a 20-token prompt in chunks of 12
    # (not sampled) and 8; c: a decode at position 4 in both steps.
    a = RequestState("a", list(range(3, 13)), 10, list(range(0, 8)), 0, SamplingParams())
    b = RequestState("b", list(range(40, 60)), 20, list(range(8, 16)), 0, SamplingParams())
    c = RequestState("c", [5, 6, 7, 8, 9], 5, list(range(16, 24)), 4, SamplingParams())
    # d: a lone prompt chunk that samples nothing (the last layer still writes its K/V).
    d = RequestState("d", list(range(70, 90)), 20, list(range(24, 32)), 0, SamplingParams())
    with torch.inference_mode():
        steps = [([(a, 10), (b, 12), (c, 1)], ["c", "a"]),  # decodes come first in a batch
                 ([(a, 1), (b, 8), (c, 1)], ["a", "c", "b"]),
                 ([(d, 5)], [])]
        for step, (scheduled, sampled) in enumerate(steps):
            out = {}
            for mode, cache in caches.items():
                for layer, kv in zip(layers, cache):
                    layer.kv_cache = kv
                inputs = prepare_inputs(scheduled, BLOCK, torch.device("cpu"), native_attention=native,
                                        sampled_rows_only=mode == "sampled", batched_attention=batched)
                assert [s.req_id for s in inputs.sampling_states] == sampled
                hidden = model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
                out[mode] = hidden[inputs.logits_indices] if mode == "full" else hidden
            assert out["sampled"].shape == out["full"].shape == (len(sampled), out["full"].shape[1]), step
            diff = (out["sampled"] - out["full"]).abs().max() if sampled else 0.0
            assert torch.allclose(out["sampled"], out["full"], atol=1e-5, rtol=0), (step, diff)
            for full_kv, sampled_kv in zip(caches["full"], caches["sampled"]):
                assert torch.equal(full_kv, sampled_kv), step
            for r, n in scheduled:
                r.num_computed_tokens += n
            for r in (a, c):
                r.token_ids.append(11 + step)


def test_tiny_configs_exercise_their_features(tiny_model_dir):
    model, cfg = load_model(ModelConfig(model=tiny_model_dir("llama-tied-llama3rope")))
    assert rope_parameters(cfg)["rope_type"] == "llama3"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qwen, _ = load_model(ModelConfig(model=tiny_model_dir("qwen2")))
    layer = qwen.model.layers[0].self_attn
    assert layer.qkv_proj.bias is not None and layer.o_proj.bias is None
    llama, _ = load_model(ModelConfig(model=tiny_model_dir("llama")))
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight
    assert llama.model.layers[0].self_attn.num_kv_heads == 2


def test_rope_reads_legacy_config_fields():
    class Legacy:
        rope_theta = 500000.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    assert rope_parameters(Legacy()) == {"type": "linear", "factor": 2.0, "rope_theta": 500000.0,
                                         "rope_type": "linear"}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_dummy_presets_run(preset):
    mc = ModelConfig(load_format="dummy", dummy_config=preset, seed=3)
    model, cfg = load_model(mc)
    again, _ = load_model(mc)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)  # seeded
    bind_cache(model)
    logits = run_chunks(model, list(range(10)), [10])
    assert logits.shape == (10, cfg.vocab_size) and torch.isfinite(logits).all()


def test_dummy_weights_take_any_seed_the_config_takes():
    # seed * 1_000_003 + crc32(name) overflowed torch's 64-bit seed from seed ~1.8e13 on.
    mc = ModelConfig(load_format="dummy", dummy_config="tiny-llama", seed=2**64 - 1)
    model, _ = load_model(mc)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gpt3_presets_have_paper_shapes():
    # (layers, d_model, heads) from the GPT-3 paper, Table 2.1 (see registry.py for 1.3B/13B).
    expected = {"gpt3-125m": (12, 768, 12), "gpt3-1.3b": (24, 2048, 16),
                "gpt3-13b": (40, 5120, 40), "gpt3-175b": (96, 12288, 96)}
    for name, (layers, d, heads) in expected.items():
        cfg = make_hf_config(name)
        assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions) == (layers, d, heads, 2048)
        assert get_model_class(cfg).__name__ == "GPT2LMHeadModel"
    facts = get_model_facts(ModelConfig(load_format="dummy", dummy_config="gpt3-175b"))
    assert 174e9 < facts.num_params < 176e9  # counted on the meta device, nothing allocated
    assert (facts.num_layers, facts.head_dim, facts.max_model_len) == (96, 128, 2048)
    assert set(PRESETS) >= {"gpt3-125m", "gpt3-1.3b", "gpt3-13b", "gpt3-175b", "tiny-llama", "tiny-gpt2"}


def test_dummy_from_config_dict():
    cfg = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=1, vocab_size=100, max_position_embeddings=64)
    model, hf = load_model(ModelConfig(load_format="dummy", dummy_config=cfg))
    assert hf.architectures == ["LlamaForCausalLM"]
    bind_cache(model)
    assert run_chunks(model, [1, 2, 3], [3]).shape == (3, 100)


def test_batched_layout_pads_prefills_only_where_padding_is_cheap():
    """Chunks of similar size share one padded SDPA; one long prompt beside
    short ones keeps an SDPA per chunk rather than padding them all to it."""
    def meta(lengths, batched=True, computed=(0, 0, 0)):
        """A decode, then prompts of ``lengths`` tokens, each scheduled from ``computed``."""
        states = [RequestState(str(i), list(range(n)), n, list(range(8 * i, 8 * i + 8)), c, SamplingParams())
                  for i, (n, c) in enumerate(zip(lengths, computed))]
        decode = RequestState("d", [1, 2, 3], 2, [40, 41], 2, SamplingParams())
        return prepare_inputs([(decode, 1)] + [(s, len(s.token_ids) - s.num_computed_tokens) for s in states],
                              BLOCK, torch.device("cpu"), batched_attention=batched).attn_metadata

    # Fresh prompts: keys are the chunks' own rows (no cache gather), SDPA's causal mask.
    similar = meta([20, 17, 12])
    assert similar.prefills == [] and len(similar.decode_groups) == 1
    batch = similar.prefill_batch
    assert (batch.start, batch.num_chunks, batch.max_query, batch.max_context) == (1, 3, 20, 20)
    assert batch.kv_slots is None and batch.mask is None
    assert batch.valid.tolist() == list(range(20)) + list(range(20, 37)) + list(range(40, 52))
    assert batch.query_index.view(3, 20)[1, :17].tolist() == list(range(21, 38))  # chunk 1's own rows
    # A chunk with context before it (a prompt's second chunk) reads the cache, masked.
    later = meta([24, 17, 12], computed=(4, 0, 0)).prefill_batch
    assert (later.max_query, later.max_context) == (20, 24)
    assert later.kv_slots.shape == (3 * 24,) and later.mask.shape == (3, 1, 20, 24)
    # Chunk 0 starts at position 4: its query 5 sees keys 0-9; chunk 1 (17 rows):
    # query 5 sees keys 0-5, its padding rows key 0 alone.
    assert later.mask[0, 0, 5].tolist() == [True] * 10 + [False] * 14
    assert later.mask[1, 0, 5].tolist() == [True] * 6 + [False] * 18
    assert later.mask[1, 0, 17].tolist() == [True] + [False] * 23
    lopsided = meta([30, 2, 3])
    assert lopsided.prefill_batch is None
    assert [(c.start, c.end) for c in lopsided.prefills] == [(1, 31), (31, 33), (33, 36)]
    # Decodes: one group while padding at most doubles what they gather. A
    # 40-token context pads a 4-token one (80 gathered for 44) but not a
    # 3-token one too (120 for 47): that starts a group of its own.
    def decode_groups(contexts):
        states = [RequestState(str(i), list(range(n)), n - 1, list(range(12 * i, 12 * i + 12)), n - 1,
                               SamplingParams()) for i, n in enumerate(contexts)]
        meta = prepare_inputs([(s, 1) for s in states], BLOCK, torch.device("cpu"), batched_attention=True)
        return [(g.start, g.end) for g in meta.attn_metadata.decode_groups]

    assert decode_groups([20, 17, 12, 9]) == [(0, 4)]
    assert decode_groups([40, 4, 3]) == [(0, 2), (2, 3)]
    grouped = meta([20, 17, 12], batched=False)
    assert grouped.prefill_batch is None and len(grouped.prefills) == 3
