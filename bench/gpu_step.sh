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
# On a 4-GPU machine two calls do all of it, the GPUs working side by side (each job on cards of its own):
#   A        tp on GPUs 0,1 then hooks (0) and capture (1); b06 on GPU 2; parity on GPU 3
#   B        app on all four, then 8B stock (GPU 0) beside 8B ours (GPU 1) in the time left
#   C        tp (all logs kept) then eager parity; capture (GPU 2); update latency (GPU 3)
#   D        tp (whole log kept) then 8B stock beside 8B ours; capture (GPU 2); update latency (GPU 3)
#   E        app on all four (whole log kept)
#   I        one job at a time (engines started side by side took 150-250 s each, alone ~70): tp on GPUs 0,1,
#            update latency (GPU 2), capture (GPU 3), 8B stock then ours (GPU 0) in what is left
#   J        the first half of I: tp on GPUs 0,1, then update latency (GPU 2)
#   F        tp alone on GPUs 0,1 (stacks of every engine process dumped if it is not done at 150 s); capture
#            (GPU 2); update latency alone (GPU 3)
set -uo pipefail
step=$1
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} RAY_AUTH_MODE=disabled PATH=$PATH:/tmp/site/bin
# NVLink multicast stays off on these machines (KINDS.md); vLLM's fused all-reduce would pick FlashInfer's
# multicast ("mnnvl") workspace by itself: name the IPC one instead (gpu_multi also turns the fusion off).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm
if [ ! -f /tmp/site/.done ]; then bash .gpu/install.sh >/dev/null || exit 1; fi
python3 -c "import steer_actors" 2>/dev/null ||
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
# Nothing of an earlier step may hold a GPU (a killed run can leave engine processes behind).
ray stop --force >/dev/null 2>&1
for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
sleep 2
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader | tr '\n' ' '; echo
one="env CUDA_VISIBLE_DEVICES=0 BENCH_CHILD_TIMEOUT_S=280"
t0=$SECONDS
job() {  # job <name> <gpus> <child timeout s> <timeout s> <script args...>: log under /tmp/<name>.log
  local name=$1 gpus=$2 child=$3 limit=$4; shift 4
  env CUDA_VISIBLE_DEVICES="$gpus" BENCH_CHILD_TIMEOUT_S="$child" VLLM_CACHE_ROOT="/tmp/vc-$name" BENCH_KEEP_RAY=1 \
    timeout "$limit" python3 "$@" >"/tmp/$name.log" 2>&1
  echo "$name rc=$? at $((SECONDS - t0)) s"
}
keep_log() {  # keep_log <name>: the whole log, less progress bars (the device returns 8 files at most)
  grep -avE "it/s\]|Loading safetensors|^\s*$" "/tmp/$1.log" | tail -c 3000000 >"$OUT/${1}_full.log"
}
wait_free() {  # wait_free <gpu list> <s>: until those cards hold < 2 GiB (a stopped engine takes a moment)
  local end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ]; do
    busy=$(nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits |
           awk -F', ' -v ids=",$1," 'index(ids, ","$1",") && $2 > 2048' | wc -l)
    [ "$busy" -eq 0 ] && return 0; sleep 2
  done
}
report() {  # the end of every log in one file (the device returns at most 8 files)
  for f in "$@"; do echo "=== $f"; grep -vE "^\s*$|Loading|it/s" "/tmp/$f.log" | tail -25 | cut -c1-400; done >"$OUT/$step.log"
  ray stop --force >/dev/null 2>&1
  grep -hE "Error|error" "$OUT/$step.log" | tail -8 | cut -c1-300
}
case $step in
  A)
    ( job tp 0,1 200 240 bench/gpu_multi.py --part tp --out "$OUT/tp.json"
      job hooks 0 300 320 bench/gpu.py --model 0.6b --runs hooks --out "$OUT/hooks.json" &
      job capture 1 320 330 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json"; wait ) &
    job b06 2 270 570 bench/gpu.py --model 0.6b --runs stock,ours,stock --out "$OUT/b06.json" &
    job parity 3 280 570 bench/gpu.py --runs parity_eager,parity_graphs --out "$OUT/parity.json" &
    wait; report tp hooks capture b06 parity; exit 0 ;;
  C)  # the rest: TP=2 with every log kept, eager parity, capture throughput, update latency
    ( job tp 0,1 190 200 bench/gpu_multi.py --part tp --out "$OUT/tp.json"
      grep -aE -B2 -A40 "Traceback|Error" /tmp/tp.log | head -600 >"$OUT/tp_err.log"
      for f in $(grep -alE "Traceback|Error" /tmp/ray/session_*/logs/*.err /tmp/ray/session_*/logs/*.out 2>/dev/null | head -30); do
        echo "=== $f"; grep -aE -B3 -A30 "Traceback|Error" "$f" | head -120; done >"$OUT/ray_err.log"
      OMP_NUM_THREADS=8 job parity 0 125 135 bench/gpu.py --runs parity_eager --out "$OUT/parity.json" ) &
    job capture 2 355 360 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json" &
    job update 3 330 340 bench/gpu.py --model 0.6b --runs ours_update --out "$OUT/update.json" &
    wait; report tp parity capture update; exit 0 ;;
  D)
    { df -h /dev/shm | tail -1; nproc; free -g | sed -n 2p; } | tr '\n' ' '; echo
    ( CUDA_VISIBLE_DEVICES= python3 -c "import sys; sys.path.insert(0, 'bench'); import gpu; gpu.build_checkpoint('8b', 'cpu')" \
        >/tmp/build8b.log 2>&1 ) & build=$!
    ( job tp 0,1 200 215 bench/gpu_multi.py --part tp --out "$OUT/tp.json"
      keep_log tp
      wait_free 0,1 60
      while [ ! -f /tmp/bench-qwen3-8b/config.json ] && kill -0 "$build" 2>/dev/null; do sleep 2; done
      left=$((565 - (SECONDS - t0)))
      if [ "$left" -gt 200 ]; then
        job b8stock 0 "$((left - 10))" "$left" bench/gpu.py --model 8b --runs stock --out "$OUT/b8stock.json" &
        BENCH_ROUNDS=1 job b8ours 1 "$((left - 10))" "$left" bench/gpu.py --model 8b --runs ours --out "$OUT/b8ours.json" &
        wait
      else echo "no time left for 8B ($left s)"; fi ) &
    job capture 2 390 400 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json" &
    job update 3 330 340 bench/gpu.py --model 0.6b --runs ours_update --out "$OUT/update.json" &
    wait; report tp capture update build8b b8stock b8ours; exit 0 ;;
  F)
    export STEER_ACTORS_DUMP_STACKS=1
    stacks() {  # stacks <label>: py-spy (and faulthandler via SIGUSR1) for every engine-side process
      for pid in $(pgrep -f "RayWorkerProc|EngineCore|SteerEngine|VLLM|gpu.py --child"); do
        echo "=== $1 pid $pid $(tr '\0' ' ' </proc/$pid/cmdline | cut -c1-120)"
        timeout 20 py-spy dump --pid "$pid" 2>&1 | head -80
      done >>"$OUT/stacks.txt"
      pkill -USR1 -f "RayWorkerProc" 2>/dev/null
    }
    ( VLLM_USE_FLASHINFER_SAMPLER=0 job tp 0,1 170 180 bench/gpu_multi.py --part tp --out "$OUT/tp.json" ) &
    ( sleep 150; [ -f "$OUT/tp.json" ] || stacks tp; sleep 150; stacks late ) & dumper=$!
    job capture 2 330 340 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json" &
    job update 3 300 310 bench/gpu.py --model 0.6b --runs update_only --out "$OUT/update.json" &
    wait $(jobs -p | grep -v "^$dumper$"); kill $dumper 2>/dev/null
    keep_log tp; report tp capture update; exit 0 ;;
  G)  # why engines came up without steerable layers; if the tiny engine has them, F's measurements
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/diag_patch.py >"$OUT/diag.txt" 2>/tmp/diag.err
    grep -avE "it/s\]|^\s*$" /tmp/diag.err | tail -c 200000 >"$OUT/diag_err.txt"
    cut -c1-1500 "$OUT/diag.txt"
    grep -q '"layers": \[0' "$OUT/diag.txt" || exit 0
    ( VLLM_USE_FLASHINFER_SAMPLER=0 job tp 0,1 170 180 bench/gpu_multi.py --part tp --out "$OUT/tp.json"; keep_log tp ) &
    job capture 2 290 300 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json" &
    job update 3 270 280 bench/gpu.py --model 0.6b --runs update_only --out "$OUT/update.json" &
    wait; report tp capture update; exit 0 ;;
  I)
    VLLM_USE_FLASHINFER_SAMPLER=0 job tp 0,1 150 155 bench/gpu_multi.py --part tp --out "$OUT/tp.json"; keep_log tp
    job update 2 170 175 bench/gpu.py --model 0.6b --runs update_only --out "$OUT/update.json"
    job capture 3 240 245 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json"
    left=$((570 - (SECONDS - t0)))
    [ "$left" -gt 200 ] && BENCH_ROUNDS=1 job b8 0 "$((left - 10))" "$left" bench/gpu.py --model 8b --runs stock,ours --out "$OUT/b8.json"
    report tp update capture b8; exit 0 ;;
  J)  # the first half of I (capture waits for its next version): tp on GPUs 0,1, then update latency
    VLLM_USE_FLASHINFER_SAMPLER=0 job tp 0,1 150 155 bench/gpu_multi.py --part tp --out "$OUT/tp.json"; keep_log tp
    job update 2 170 175 bench/gpu.py --model 0.6b --runs update_only --out "$OUT/update.json"
    keep_log update
    report tp update; exit 0 ;;
  K)  # tp with room for its slow first request, then capture
    VLLM_USE_FLASHINFER_SAMPLER=0 job tp 0,1 270 280 bench/gpu_multi.py --part tp --out "$OUT/tp.json"; keep_log tp
    job capture 2 270 275 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json"
    report tp capture; exit 0 ;;
  L)  # capture alone
    job capture 2 330 340 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json"; keep_log capture
    report capture; exit 0 ;;
  H)  # the short version of F for the end of a budget
    ( VLLM_USE_FLASHINFER_SAMPLER=0 job tp 0,1 150 155 bench/gpu_multi.py --part tp --out "$OUT/tp.json"; keep_log tp ) &
    job capture 2 200 205 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json" &
    job update 3 190 195 bench/gpu.py --model 0.6b --runs update_only --out "$OUT/update.json" &
    wait; report tp capture update; exit 0 ;;
  E)
    ( while sleep 10; do date +%T; nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader
        nvidia-smi --query-gpu=index,uuid,memory.used --format=csv,noheader; done >"$OUT/gpu_apps.log" 2>&1 ) & sampler=$!
    VLLM_USE_FLASHINFER_SAMPLER=0 job app 0,1,2,3 540 560 bench/gpu_multi.py --part app --out "$OUT/app.json"
    kill $sampler 2>/dev/null
    keep_log app
    report app; exit 0 ;;
  B)
    # the 8B checkpoint is built on the CPU meanwhile (every GPU is the app's)
    ( CUDA_VISIBLE_DEVICES= python3 -c "import sys; sys.path.insert(0, 'bench'); import gpu; gpu.build_checkpoint('8b', 'cpu')" \
        >/tmp/build8b.log 2>&1 ) &
    job app 0,1,2,3 400 420 bench/gpu_multi.py --part app --out "$OUT/app.json"
    grep -aE -B2 -A40 "Traceback|Error" /tmp/app.log | head -600 >"$OUT/app_err.log"
    wait
    ray stop --force >/dev/null 2>&1; sleep 2
    left=$((575 - (SECONDS - t0)))
    if [ "$left" -gt 150 ]; then
      job b8stock 0 "$((left - 10))" "$left" bench/gpu.py --model 8b --runs stock --out "$OUT/b8stock.json" &
      BENCH_ROUNDS=1 job b8ours 1 "$((left - 10))" "$left" bench/gpu.py --model 8b --runs ours --out "$OUT/b8ours.json" &
      wait
    fi
    report build8b app b8stock b8ours; exit 0 ;;
esac
case $step in
  parity) $one timeout 580 python3 bench/gpu.py --runs parity_eager,parity_graphs --out "$OUT/parity.json" ;;
  b06)    $one timeout 580 python3 bench/gpu.py --model 0.6b --runs stock,ours,stock --out "$OUT/b06.json" ;;
  b06b)   $one timeout 580 python3 bench/gpu.py --model 0.6b --runs capture,hooks --out "$OUT/b06b.json" ;;
  b8)     env CUDA_VISIBLE_DEVICES=0 BENCH_CHILD_TIMEOUT_S=400 timeout 580 python3 bench/gpu.py --model 8b --runs stock,ours --out "$OUT/b8.json" ;;
  tp)     timeout 580 python3 bench/gpu_multi.py --part tp --out "$OUT/tp.json" ;;
  app)    timeout 580 python3 bench/gpu_multi.py --part app --out "$OUT/app.json" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac 2>&1 | grep -vE "^\s*$|INFO|WARNING|Loading|it/s" | tail -15 | cut -c1-600
