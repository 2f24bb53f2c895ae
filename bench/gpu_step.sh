#!/usr/bin/env bash
# One step of a GPU session, run by the device tool after the 8 wheel pieces are staged:
#   bash bench/gpu_step.sh <step>      (results under $OUT; the device returns at most 8 files)
# Single steps (each fits one 10-minute call on an H100):
#   parity   V2-runner checks, tiny fp32: eager vs graphs, per-request mixed batch, capture vs HF (1 GPU)
#   b06      0.6B: stock, ours (idle, 1 layer, all layers, 16 specs, update latency), stock again (1 GPU)
#   b06b     0.6B: all-layer capture + fetch GB/s, seed-style hooks (1 GPU)
#   tp       TP=2 through vLLM's Ray executor == TP=1 (2+ GPUs)
#   app      two TP=2 replicas on two raylets: atomicity, cross-raylet capture, 2 vs 1 replica (4 GPUs)
#   b8       8B: stock, ours (1 GPU)
# Steps of a session on a 4-GPU machine, one job at a time (engines started side by side took 150-250 s each,
# about 70 s alone; a fresh machine's first start is slower still: cold Triton and compile caches):
#   N        update latency (GPU 0), then capture throughput + fetch (GPU 1), one compile cache
#   C        capture throughput + fetch alone (GPU 1), py-spy profiles of the worker and the engine actor; then
#            the same without the device's row writes (C_SECOND=skip), or with C_SECOND=torch|<scatter programs>,
#            or with float32 rows (C_SECOND=fp32; the first run stores the model's dtype)
#   E        the app on all four (whole log kept, GPU processes sampled every 10 s); E_MODEL=8b|0.6b. At 8B it
#            needs more than one call's 10 minutes (E_APP_S, default 880 s): run it through bench/gpu_bg.sh
#   R        the 0.6B steering ratios again (stock, ours, stock; one round), R_LIMIT=<s> to fit what is left
#   P        8B stock then ours (GPU 0)
#   M        bench/gpu_capture_step.py: the worker's CaptureStore alone, host time per step (GPU 1, ~2 min)
# Earlier sessions' composite steps (A-L) are in git history (session 5 and before).
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
# capture runs on GPU 1 beside a step on GPU 0; on a one-GPU machine, after it on GPU 0
cap=$(( $(nvidia-smi -L 2>/dev/null | wc -l) > 1 ? 1 : 0 ))
t0=$SECONDS
job() {  # job <name> <gpus> <child timeout s> <timeout s> <script args...>: log under /tmp/<name>.log
  local name=$1 gpus=$2 child=$3 limit=$4; shift 4
  env CUDA_VISIBLE_DEVICES="$gpus" BENCH_CHILD_TIMEOUT_S="$child" VLLM_CACHE_ROOT="${VLLM_CACHE_SHARED:-/tmp/vc-$name}" BENCH_KEEP_RAY=1 \
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
profile_capture() {  # 8 s of py-spy (raw stacks, per thread) once the capture child says its big batch began
  rm -f /tmp/phase-capture; command -v py-spy >/dev/null || return 0
  local end=$((SECONDS + 440))
  while [ ! -f /tmp/phase-capture ] && [ $SECONDS -lt $end ]; do sleep 1; done
  [ -f /tmp/phase-capture ] || return 0
  sleep 1  # the batch takes ~7 s now
  local gpu="" eng p
  # the vLLM worker: the GPU's process that is not the benchmark's driver (session 7 sampled the driver)
  for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader -i $cap); do
    tr '\0' ' ' </proc/$p/cmdline 2>/dev/null | grep -q "gpu.py" || { gpu=$p; break; }
  done
  eng=$(pgrep -f "ray::SteerEngine" | head -1)
  # --nonblocking: session 8's sampler paused the worker at every sample (with native stacks, ~ms each) and
  # slowed the very run it profiled (0.31 against 0.63 unprofiled): these read the stacks without stopping it
  [ -n "$gpu" ] && py-spy record -p "$gpu" -d 8 -r 100 -t --nonblocking -f raw -o "$OUT/prof_worker.txt" >/dev/null 2>&1 &
  [ -n "$eng" ] && py-spy record -p "$eng" -d 8 -r 100 -t --nonblocking -f raw -o "$OUT/prof_engine.txt" >/dev/null 2>&1 &
  wait
}
case $step in
  N)
    export VLLM_CACHE_SHARED=/tmp/vc-06b  # the two jobs build the same 0.6B engine: the second reuses the compile
    # a fresh machine's first engine start took 225 s (cold caches): room for it
    job update 0 390 400 bench/gpu.py --model 0.6b --runs update_only --out "$OUT/update.json"; keep_log update
    profile_capture & prof=$!  # py-spy of the worker and the engine actor while every request captures every layer
    job capture $cap 440 450 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json"; keep_log capture
    [ -f /tmp/phase-capture ] || kill $prof 2>/dev/null; wait
    report update capture; exit 0 ;;
  C)
    profile_capture & prof=$!
    job capture $cap 440 450 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture.json"; keep_log capture
    [ -f /tmp/phase-capture ] || kill $prof 2>/dev/null; wait
    if ! grep -q capture_all_layers\" "$OUT/capture.json" 2>/dev/null; then  # the direct path failed: the host one
      STEER_CAPTURE_DIRECT=0 job capture_host $cap 440 450 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture_host.json"
      report capture capture_host; exit 0
    fi
    # the same without the device's writes (rows not written: benchmark only), to tell their cost from the
    # host's; C_SECOND=torch|<programs> runs that scatter instead, C_SECOND=fp32 float32 rows (the first run
    # stores the model's dtype, bf16)
    case ${C_SECOND:-skip} in
      skip|torch) second="STEER_CAPTURE_SCATTER=${C_SECOND:-skip}" ;;
      fp32) second="BENCH_CAPTURE_DTYPE=float32" ;;
      *) second="STEER_CAPTURE_SCATTER_PROGRAMS=$C_SECOND" ;;
    esac
    echo "capture_2: $second"
    ( export $second BENCH_CAPTURE_QUICK=1 VLLM_CACHE_SHARED=/tmp/vc-capture  # the first job's compile cache
      job capture_2 $cap 440 450 bench/gpu.py --model 0.6b --runs capture --out "$OUT/capture_2.json" )
    report capture capture_2; exit 0 ;;
  E)
    ( while sleep 10; do date +%T; nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader
        nvidia-smi --query-gpu=index,uuid,memory.used --format=csv,noheader; done >"$OUT/gpu_apps.log" 2>&1 ) & sampler=$!
    VLLM_USE_FLASHINFER_SAMPLER=0 job app 0,1,2,3 "$((${E_APP_S:-880} - 20))" "${E_APP_S:-880}" bench/gpu_multi.py --part app \
      --model "${E_MODEL:-8b}" --out "$OUT/app.json"
    kill $sampler 2>/dev/null
    keep_log app
    report app; exit 0 ;;
  R)  # the steering ratios again on today's code (stock, ours, stock; one round each), in what a budget leaves
    BENCH_ROUNDS=1 job b06 0 "${R_LIMIT:-470}" "$((${R_LIMIT:-470} + 10))" bench/gpu.py --model 0.6b --runs stock,ours,stock --out "$OUT/b06.json"
    keep_log b06
    report b06; exit 0 ;;
  M)  # the worker's CaptureStore alone (no vLLM): correctness and host time per step; runs on a bare image too
    CUDA_VISIBLE_DEVICES=1 timeout 400 python3 bench/gpu_capture_step.py --out "$OUT/capture_step.json" >"/tmp/M.log" 2>&1
    echo "capture_step rc=$?"; tail -12 /tmp/M.log | cut -c1-400 >"$OUT/M.log"; exit 0 ;;
  P)
    # P_ROUNDS=3 alternates stock and ours three times (one round cannot resolve 1%: session 7's two stock
    # runs of one engine were 19% apart); P_LIMIT fits what the budget leaves
    BENCH_ROUNDS=${P_ROUNDS:-1} job b8 0 "${P_LIMIT:-560}" "$((${P_LIMIT:-560} + 10))" bench/gpu.py --model 8b --runs stock,ours \
      --out "$OUT/b8.json"
    report b8; exit 0 ;;
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
