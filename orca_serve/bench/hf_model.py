"""Hugging Face transformers copies of the model, for the ``hf-*`` peers.

The peers must run exactly the weights our engine runs, so the model is
resolved by our own loader: a GGUF file (the embedded default included)
becomes the same cached float32 HF directory the engine loads, and dummy
weights use the same presets. That directory is also what to give vLLM
(``python -m orca_serve.bench hf-dir`` prints it).
"""
from __future__ import annotations

from orca_serve.config import ModelConfig


def hf_dir(model: str | None) -> str:
    """The HF directory (config.json, safetensors, tokenizer) of a model path or the default."""
    from orca_serve.models.loader import resolve_model_path

    return resolve_model_path(ModelConfig(model=model))


def load_hf_model(model: str | None, dtype: str = "float32", load_format: str = "auto",
                  dummy_config: str | None = None, seed: int = 0, device: str = "auto"):
    """(transformers model in eval mode on the engine's device for the same
    ``device`` setting, tokenizer or None)."""
    import torch
    from transformers import AutoModelForCausalLM

    from orca_serve.models import loader

    mc = ModelConfig(model=model, dtype=dtype, load_format=load_format, dummy_config=dummy_config, seed=seed,
                     device=device)
    config = loader.load_hf_config(mc)
    torch_dtype = loader.torch_dtype(mc, config)
    if load_format == "dummy":
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(loader.resolve_model_path(mc), dtype=torch_dtype)
    return hf.to(loader.resolve_device(mc)).eval(), loader.load_tokenizer(mc)


def load_tokenizer(model: str | None):
    """The tokenizer of a model directory, a .gguf file, or the default model (None if it has none)."""
    from orca_serve.models.loader import load_tokenizer as _load

    return _load(ModelConfig(model=model))
