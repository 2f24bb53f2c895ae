#!/usr/bin/env bash
# One step of a GPU session, run by the device tool after the 8 wheel pieces are staged:
#   bash bench/gpu_step.sh <step>      (results under $OUT/<step>.json)
# Steps, in the order a session should run them (each fits one 10-minute call on an H100):
#   parity   V2-runner checks, tiny fp32: eager vs graphs, per-request mixed batch, capture vs HF (1 GPU)
#   b06      0.6B: stock, ours (idle, 1 layer, all layers, 16 specs, update latency), stock again (1 GPU)
#   b06b     0.6B: all-layer capture + fetch GB/s, seed-style hooks (1 GPU)
#   tp       TP=2 through vLLM's Ray executor == TP=1 (2+ GPUs)
#   app      two TP=2 replicas on two raylets: atomicity, cross-raylet capture, 2 vs 1 replica (4 GPUs)
#   b8       8B: stock, ours (1 GPU)
set -uo pipefail
step=$1
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} RAY_AUTH_MODE=disabled PATH=$PATH:/tmp/site/bin
if [ ! -f /tmp/site/.done ]; then bash .gpu/install.sh >/dev/null || exit 1; fi
python3 -c "import steer_actors" 2>/dev/null ||
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
# Nothing of an earlier step may hold a GPU (a killed run can leave engine processes behind).
ray stop --force >/dev/null 2>&1
for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
sleep 2
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader | tr '\n' ' '; echo
one="env CUDA_VISIBLE_DEVICES=0 BENCH_CHILD_TIMEOUT_S=280"
case $step in
  parity) $one timeout 580 python3 bench/gpu.py --runs parity_eager,parity_graphs --out "$OUT/parity.json" ;;
  b06)    $one timeout 580 python3 bench/gpu.py --model 0.6b --runs stock,ours,stock --out "$OUT/b06.json" ;;
  b06b)   $one timeout 580 python3 bench/gpu.py --model 0.6b --runs capture,hooks --out "$OUT/b06b.json" ;;
  b8)     env CUDA_VISIBLE_DEVICES=0 BENCH_CHILD_TIMEOUT_S=400 timeout 580 python3 bench/gpu.py --model 8b --runs stock,ours --out "$OUT/b8.json" ;;
  tp)     timeout 580 python3 bench/gpu_multi.py --part tp --out "$OUT/tp.json" ;;
  app)    timeout 580 python3 bench/gpu_multi.py --part app --out "$OUT/app.json" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac 2>&1 | grep -vE "^\s*$|INFO|WARNING|Loading|it/s" | tail -15 | cut -c1-600
