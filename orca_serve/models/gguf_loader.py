"""One-time conversion of a llama.cpp GGUF file into a float32 HF directory.

GGUF tensors are dequantized with the ``gguf`` package and renamed to HF
names. llama.cpp's converter permutes the rows of attn_q/attn_k for the
llama architecture (it interleaves the two rotary halves of each head, GPT-J
style); we apply the inverse so the weights fit HF's rotate-half RoPE. Config
and tokenizer come from transformers' own GGUF readers.

The result is cached (``$ORCA_SERVE_CACHE`` or ``~/.cache/orca-serve``, one
subdirectory per file) so later loads are plain safetensors reads. It is
written to a temporary directory and renamed into place, so a crash never
leaves a half-written cache behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch
from safetensors.torch import save_file
from tqdm import tqdm

# Bump when the conversion changes, so stale caches are rebuilt.
CONVERSION_VERSION = 1
_SOURCE_FILE = "orca_source.json"

# GGUF architecture -> (HF architecture, whether attn_q/attn_k rows are permuted)
_ARCHS = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp stores that HF configs express otherwise (llama3 rope scaling).
_SKIP = {"rope_freqs.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def cache_root() -> str:
    return os.environ.get("ORCA_SERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "orca-serve")


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name for a llama.cpp tensor name (None if unknown)."""
    m = _BLOCK.match(gguf_name)
    if m:
        part = _LAYER.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_TOP[base]}.{kind}" if base in _TOP else None


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k permutation: per head, rows [a0 b0 a1 b1 ...] -> [a0 a1 ... b0 b1 ...]."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _source_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"source": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "version": CONVERSION_VERSION}


def _is_current(directory: str, stamp: dict) -> bool:
    try:
        with open(os.path.join(directory, _SOURCE_FILE)) as f:
            return json.load(f) == stamp
    except (OSError, ValueError):
        return False


def converted_dir(gguf_path: str) -> str:
    """The HF directory for a GGUF file, converting it on first use."""
    root = cache_root()
    final = os.path.join(root, os.path.splitext(os.path.basename(gguf_path))[0])
    stamp = _source_stamp(gguf_path)
    if _is_current(final, stamp):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=root)
    try:
        convert_gguf(gguf_path, tmp)
        with open(os.path.join(tmp, _SOURCE_FILE), "w") as f:
            json.dump(stamp, f)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        if _is_current(final, stamp):
            return final  # a concurrent conversion finished first
        if os.path.isdir(final):  # stale: made from an older file or converter
            stale = tempfile.mkdtemp(prefix=".stale-", dir=root)
            os.replace(final, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_current(final, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Write config.json, model.safetensors (float32), tokenizer and generation config."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        reader = gguf.GGUFReader(gguf_path)
        arch = reader.fields["general.architecture"].contents()
    except Exception as e:  # the reader raises assorted errors on a bad file
        raise ValueError(f"cannot read GGUF file {gguf_path}: {e}") from e
    if arch not in _ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {gguf_path}; supported: {', '.join(_ARCHS)}")
    hf_arch, permuted = _ARCHS[arch]
    directory, name = os.path.split(os.path.abspath(gguf_path))
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    config.architectures = [hf_arch]
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

    tensors = {}
    for t in tqdm(reader.tensors, desc=f"converting {name}", leave=False):
        if t.name in _SKIP:
            continue
        target = hf_name(t.name)
        if target is None:
            raise ValueError(f"unknown tensor {t.name!r} in GGUF file {gguf_path}")
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        w = w.reshape(tuple(int(d) for d in reversed(t.shape))).float()
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if permuted and kind in heads:
            w = unpermute_rows(w, heads[kind])
        tensors[target] = w.contiguous()
    if "lm_head.weight" not in tensors:
        config.tie_word_embeddings = True
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=getattr(config, "pad_token_id", None)).save_pretrained(out_dir)
