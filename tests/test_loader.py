"""Loader: GGUF default model and its cache, model facts, and clear errors on bad input."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_models import MiniScheduler, hf_greedy
from orca_serve.config import EngineConfig, ModelConfig
from orca_serve.models import gguf_loader
from orca_serve.models.loader import (ModelNotFoundError, get_model_facts, load_hf_config, load_model, load_tokenizer,
                                      resolve_model_path)


def test_default_gguf_model_converts_and_matches_hf(default_model_dir):
    from transformers import LlamaForCausalLM

    from orca_serve.sampling_params import SamplingParams
    from orca_serve.worker.model_runner import ModelRunner

    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(default_model_dir, name))
    weights_mtime = os.stat(os.path.join(default_model_dir, "model.safetensors")).st_mtime_ns
    assert resolve_model_path(ModelConfig()) == default_model_dir  # cached: no second conversion
    assert os.stat(os.path.join(default_model_dir, "model.safetensors")).st_mtime_ns == weights_mtime

    tok = load_tokenizer(ModelConfig())
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=False)
    prompt = tok(ids, add_special_tokens=False)["input_ids"]
    runner = ModelRunner(EngineConfig(), num_kv_blocks=32)
    sched = MiniScheduler(num_blocks=32, budget=16)  # chunked prefill, then decode
    sched.add("q", prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    while sched.reqs:
        sched.step(runner)
    ours = sched.outputs["q"]
    hf = LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    assert ours == hf_greedy(hf, prompt, 20)
    # Same wrong q/k permutation in both would still match; the answer itself would not.
    assert "Paris" in tok.decode(ours)

    facts = get_model_facts(ModelConfig(), tokenizer=tok)
    assert (facts.vocab_size, facts.max_model_len, facts.num_layers) == (49152, 8192, 30)
    assert (facts.num_kv_heads, facts.head_dim) == (3, 64)
    assert tok.convert_tokens_to_ids("<|im_end|>") in facts.eos_token_ids


def test_unpermute_inverts_llama_cpp_permutation():
    def llama_cpp_permute(w, n_head):  # as in llama.cpp's convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    assert torch.equal(gguf_loader.unpermute_rows(llama_cpp_permute(w, 3), 3), w)
    assert gguf_loader.hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert gguf_loader.hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_loader.hf_name("blk.0.mystery.weight") is None


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose conversion is stubbed out, with a fresh cache root."""
    monkeypatch.setenv("ORCA_SERVE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"x")
    calls = []

    def convert(path, out_dir, fail=False):
        calls.append(path)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"model_type": "llama"}, f)
        if os.environ.get("FAKE_CONVERT_FAIL"):
            raise RuntimeError("crash mid-conversion")

    monkeypatch.setattr(gguf_loader, "convert_gguf", convert)
    return src, calls


def test_gguf_cache_is_reused_and_rebuilt_when_source_changes(fake_gguf):
    src, calls = fake_gguf
    first = gguf_loader.converted_dir(str(src))
    assert gguf_loader.converted_dir(str(src)) == first and len(calls) == 1
    src.write_bytes(b"longer")
    assert gguf_loader.converted_dir(str(src)) == first and len(calls) == 2
    assert os.listdir(os.path.dirname(first)) == [os.path.basename(first)]  # no temp leftovers


def test_crash_during_conversion_leaves_no_cache(fake_gguf, monkeypatch):
    src, _ = fake_gguf
    monkeypatch.setenv("FAKE_CONVERT_FAIL", "1")
    with pytest.raises(RuntimeError, match="crash"):
        gguf_loader.converted_dir(str(src))
    assert os.listdir(gguf_loader.cache_root()) == []


def test_facts_of_a_hf_directory(tiny_model_dir):
    mc = ModelConfig(model=tiny_model_dir("llama"))
    facts = get_model_facts(mc)
    assert (facts.vocab_size, facts.max_model_len, facts.num_layers, facts.num_kv_heads, facts.head_dim) \
        == (384, 512, 3, 2, 16)
    assert facts.eos_token_ids == (2,)
    assert get_model_facts(ModelConfig(model=mc.model, max_model_len=100)).max_model_len == 100
    with pytest.raises(ValueError, match="exceeds"):
        get_model_facts(ModelConfig(model=mc.model, max_model_len=4096))
    assert load_tokenizer(mc) is None  # tiny test models ship no tokenizer
    assert load_tokenizer(ModelConfig(load_format="dummy", dummy_config="tiny-gpt2")) is None


def test_dummy_weights_for_a_directory_config(tiny_model_dir):
    model, cfg = load_model(ModelConfig(model=tiny_model_dir("qwen2"), load_format="dummy"))
    assert cfg.model_type == "qwen2" and type(model).__name__ == "Qwen2ForCausalLM"


def copy_model(tiny_model_dir, tmp_path, kind="llama"):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir(kind), dst)
    return dst


def expect_error(path, match, exc=ValueError, **kw):
    with pytest.raises(exc, match=match):
        load_model(ModelConfig(model=str(path), **kw))


def test_missing_path_and_missing_config(tmp_path):
    expect_error(tmp_path / "nope", "does not exist", exc=ModelNotFoundError)
    assert issubclass(ModelNotFoundError, ValueError)
    expect_error(tmp_path, "no config.json")
    (tmp_path / "weights.bin").write_bytes(b"x")
    expect_error(tmp_path / "weights.bin", "not a .gguf file")


def test_broken_config(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    (d / "config.json").write_text("{not json")
    expect_error(d, "broken config.json")
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    expect_error(d, "unsupported model architecture")
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    expect_error(d, "config.json")
    (d / "config.json").write_text(json.dumps({"hidden_size": 4}))
    expect_error(d, "no model_type")



@pytest.mark.parametrize("fields,match", [
    # transformers' own validation (huggingface_hub's StrictDataclass* errors) came through as a traceback.
    ({"hidden_size": "x"}, r"cannot parse config\.json in .*: Validation error for field 'hidden_size': "
                           r"TypeError: Field 'hidden_size' expected int"),
    ({"hidden_size": 63}, r"cannot parse config\.json .*hidden size \(63\) is not a multiple"),
    # Sizes that failed deep in the build (ZeroDivisionError, a tensor shape) or said something odd.
    ({"num_hidden_layers": -1}, r"num_hidden_layers must be a positive integer, got -1"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer, got 0"),
    ({"num_key_value_heads": 3}, "4 attention heads are not a multiple of 3 KV heads"),
])
def test_config_with_bad_sizes(tiny_model_dir, tmp_path, fields, match):
    d = copy_model(tiny_model_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **fields}))
    expect_error(d, match)
    with pytest.raises(ValueError, match="hidden size 64 is not divisible by 5 attention heads"):
        load_hf_config(ModelConfig(load_format="dummy", dummy_config={"model_type": "gpt2", "n_embd": 64,
                                                                       "n_head": 5}))


def test_dummy_config_from_a_config_json_path(tiny_model_dir, tmp_path):
    # --dummy-config's help promised "a preset name or a config.json path"; a path
    # was looked up as a preset name ("unknown model preset").
    src = tiny_model_dir("qwen2")
    for spec in (os.path.join(src, "config.json"), src):
        cfg = load_hf_config(ModelConfig(load_format="dummy", dummy_config=spec))
        assert cfg.model_type == "qwen2" and cfg.hidden_size == load_hf_config(ModelConfig(model=src)).hidden_size
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="dummy_config: .*config.json does not hold a JSON object"):
        load_hf_config(ModelConfig(load_format="dummy", dummy_config=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="dummy_config: cannot read .*empty/config.json"):
        load_hf_config(ModelConfig(load_format="dummy", dummy_config=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="unknown model preset .*nothing' \\(and no such config.json path\\)"):
        load_hf_config(ModelConfig(load_format="dummy", dummy_config=str(tmp_path / "nothing")))


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(d, "corrupt or truncated")
    f.write_bytes(b"\x00" * 3)
    expect_error(d, "corrupt or truncated")


def test_missing_and_misshaped_tensors(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path)
    f = str(d / "model.safetensors")
    tensors = load_file(f)
    full = dict(tensors)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, f)
    expect_error(d, "missing tensors for: model.layers.1.self_attn.qkv_proj.weight")
    full["model.norm.weight"] = torch.ones(7)
    save_file(full, f)
    expect_error(d, "model.norm.weight.*shape mismatch")
    os.remove(f)
    expect_error(d, "no \\*.safetensors")


def test_bad_gguf_and_bad_dummy_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCA_SERVE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    expect_error(bad, "cannot read GGUF file")
    assert not os.path.exists(tmp_path / "cache" / "bad")
    with pytest.raises(ValueError, match="unknown model preset"):
        load_hf_config(ModelConfig(load_format="dummy", dummy_config="gpt-9"))
    with pytest.raises(ValueError, match="unsupported model_type"):
        load_hf_config(ModelConfig(load_format="dummy", dummy_config={"model_type": "bert"}))


def test_device_auto_takes_the_local_ranks_gpu_and_cuda_without_one_is_a_clear_error(monkeypatch):
    from orca_serve.models.loader import resolve_device, torch_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(ModelConfig()) == torch.device("cpu")
    assert resolve_device(ModelConfig(device="cpu"), local_rank=3) == torch.device("cpu")
    assert torch_dtype(ModelConfig(dtype="auto")) == torch.float32
    with pytest.raises(ValueError, match="device='cuda' but torch .* sees no CUDA GPU"):
        resolve_device(ModelConfig(device="cuda"))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(ModelConfig()) == torch.device("cuda", 0)
    assert resolve_device(ModelConfig(device="cuda"), local_rank=1) == torch.device("cuda", 1)
    assert resolve_device(ModelConfig(device="cpu"), local_rank=1) == torch.device("cpu")
    with pytest.raises(ValueError, match="rank 2 of this node needs GPU 2, but torch sees 2 GPU"):
        resolve_device(ModelConfig(), local_rank=2)
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda; got 'tpu'"):
        ModelConfig(device="tpu")


def test_engine_asked_for_cuda_without_a_gpu_fails_at_start_and_says_why(tiny_model_dir, monkeypatch):
    from orca_serve.engine.llm_engine import LLMEngine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' but torch .* sees no CUDA GPU.*--device cpu or auto"):
        LLMEngine(EngineConfig.from_kwargs(model=tiny_model_dir("llama"), device="cuda", num_kv_blocks=8))


def test_max_model_len_past_the_models_positions_is_refused(tiny_model_dir):
    from orca_serve.models.loader import get_model_facts, load_hf_config, max_model_len

    path = tiny_model_dir("llama")  # built for 512 positions
    assert get_model_facts(ModelConfig(model=path)).max_model_len == 512
    assert max_model_len(ModelConfig(model=path, max_model_len=100), load_hf_config(ModelConfig(model=path))) == 100
    with pytest.raises(ValueError, match="max_model_len 1024 exceeds the model's context length 512"):
        get_model_facts(ModelConfig(model=path, max_model_len=1024))
