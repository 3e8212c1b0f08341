"""Shared pytest fixtures."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton paged decode kernel runs on the CPU through Triton's
# interpreter, which must be chosen before the kernel module is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ---------------------------------------------------------------------------
# Worker side (models, loader, model runner). Builders live in helpers_models.py.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(kind)`` -> directory of a saved tiny random HF model
    (kinds: helpers_models.TINY_CONFIGS), built once per test session."""
    from helpers_models import save_tiny_model

    built: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in built:
            built[kind] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{kind}"), kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def orca_cache_dir(tmp_path_factory):
    """ORCA_SERVE_CACHE for the whole session, so the default GGUF model is
    converted at most once per run. An ORCA_SERVE_CACHE already set in the
    environment (e.g. a persistent CI cache) is kept."""
    existing = os.environ.get("ORCA_SERVE_CACHE")
    if existing:
        yield existing
        return
    path = str(tmp_path_factory.mktemp("orca-cache"))
    mp = pytest.MonkeyPatch()
    mp.setenv("ORCA_SERVE_CACHE", path)
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def default_model_dir(orca_cache_dir) -> str:
    """The default model (SmolLM2-135M-Instruct GGUF) converted to a HF directory."""
    from orca_serve.config import ModelConfig
    from orca_serve.models.loader import resolve_model_path

    return resolve_model_path(ModelConfig())

# --------------------------- end of worker side ----------------------------


@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory):
    """The server tests' tiny random llama with a real tokenizer (server_helpers.build_tiny_model)."""
    from server_helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
