"""Architecture name -> model class, and named configs for dummy weights.

The GPT-3 presets use the GPT-2 architecture with the shapes of Table 2.1 of
"Language Models are Few-Shot Learners" (the models Orca evaluates), with a
2048-token context and GPT-2's 50257-token vocabulary. Two rows of that table
do not multiply out (1.3B: 24 heads x 128 != 2048; 13B: d_model 5140 is not
divisible by 40 heads); we keep d_model and d_head for 1.3B (16 heads) and
use d_model 5120 for 13B, as Megatron-LM and the Orca paper do.
"""
from __future__ import annotations

import json
import os

from transformers import AutoConfig, PretrainedConfig

from orca_serve.models.gpt2 import GPT2LMHeadModel
from orca_serve.models.llama import LlamaForCausalLM, Qwen2ForCausalLM

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def _gpt3(layers: int, d_model: int, heads: int) -> dict:
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=layers, n_embd=d_model,
                n_head=heads, n_inner=4 * d_model, n_positions=2048, vocab_size=50257,
                activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256)


PRESETS: dict[str, dict] = {
    "gpt3-125m": _gpt3(12, 768, 12),
    "gpt3-350m": _gpt3(24, 1024, 16),
    "gpt3-760m": _gpt3(24, 1536, 16),
    "gpt3-1.3b": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
    # SmolLM2-135M's shapes, for benchmarks that need no checkpoint.
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
    "tiny-llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "tiny-gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_layer=2,
                      n_head=4, vocab_size=512, n_positions=1024, bos_token_id=0, eos_token_id=0),
}


def make_hf_config(spec: str | dict) -> PretrainedConfig:
    """A transformers config from a preset name, a config.json path (or the
    directory holding one) or a HF config dict."""
    if isinstance(spec, str):
        if spec in PRESETS:
            spec = PRESETS[spec]
        elif os.path.exists(spec):
            spec = _read_config(spec)
        else:
            raise ValueError(f"unknown model preset {spec!r} (and no such config.json path); known: "
                             f"{', '.join(PRESETS)}")
    if not isinstance(spec, dict):
        raise ValueError(f"dummy_config must be a preset name or a config dict, got {type(spec).__name__}")
    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if model_type is None:
        by_arch = {arch: mt for mt, arch in _BY_MODEL_TYPE.items()}
        model_type = next((by_arch[a] for a in spec.get("architectures") or [] if a in by_arch), None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(_BY_MODEL_TYPE)}")
    spec.setdefault("architectures", [_BY_MODEL_TYPE[model_type]])
    try:
        return AutoConfig.for_model(model_type, **spec)
    except Exception as e:  # transformers' own validation errors (huggingface_hub's StrictDataclass*) too
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"dummy_config: {why}") from e


def _read_config(path: str) -> dict:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"dummy_config: cannot read {file}: {e}") from e
    if not isinstance(spec, dict):
        raise ValueError(f"dummy_config: {file} does not hold a JSON object")
    return spec


def get_model_class(hf_config) -> type:
    """The model class for a HF config, by ``architectures`` then ``model_type``."""
    names = list(getattr(hf_config, "architectures", None) or [])
    names.append(_BY_MODEL_TYPE.get(getattr(hf_config, "model_type", None)))
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(f"unsupported model architecture {names[:-1] or getattr(hf_config, 'model_type', None)!r}; "
                     f"supported: {', '.join(ARCHITECTURES)}")
