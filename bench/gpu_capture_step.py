"""GPU micro-benchmark of what capture costs the thread that launches forwards (no vLLM, no Ray: runs on the
bare GPU image). The worker's real :class:`~steer_actors.worker.capture.store.CaptureStore` sees the steps a serving engine
would give it: 128 requests capturing all 28 layers of a 1024-wide model, two prefill steps of 64 prompts x 128
tokens, then 256 decode steps; a stand-in forward (a bf16 matmul chain plus the capture op's row writes)
runs on the main stream.

* correctness: every request's rows, positions and tokens, read back from the arena as the engine would,
  equal what the stand-in op wrote;
* cost: the store's own host time per step on the runner's thread (``runner_us_per_step``), and the loop's
  wall time per step against the same loop without capture;
* variants: the row writes by ``index_copy_``, by the Triton kernel, or skipped (``STEER_CAPTURE_SCATTER``);
  ``--pkg`` runs another checkout of the package (an earlier commit) for a before/after in one run.

    python bench/gpu_capture_step.py --out $OUT/capture_step.json [--pkg /path/to/old/steer_actors]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types

FORWARD_CYCLES = int(os.environ.get("BENCH_FORWARD_CYCLES", 6_000_000))  # ~3.5 ms at an H100's clock
CHURN = int(os.environ.get("BENCH_CHURN", "0"))  # every CHURN decode steps another request registers and drops
MODES = os.environ.get("BENCH_MODES", "default,torch,triton,skip").split(",")
L, H, N_REQ, PROMPT, GEN = (28, 1024, 128, 128, 256) if os.environ.get("SMOKE") != "1" else (4, 64, 8, 16, 6)
if os.environ.get("BENCH_SHAPE"):  # layers,hidden,requests,prompt,gen: e.g. the CPU box at 28,64,128,32,64
    L, H, N_REQ, PROMPT, GEN = (int(x) for x in os.environ["BENCH_SHAPE"].split(","))


def child(pkg: str, capture: bool) -> dict:
    import numpy as np
    import torch

    # the package's __init__ pulls in pydantic, and wire msgpack (absent on the GPU image): neither is used here
    mod = types.ModuleType("steer_actors")
    mod.__path__ = [pkg]
    sys.modules["steer_actors"] = mod
    sys.modules.setdefault("msgpack", types.ModuleType("msgpack"))
    from steer_actors.worker.capture.store import CaptureStore

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")  # the CPU: a smoke test of this script
    if cuda:
        torch.cuda.set_device(dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    store = CaptureStore()
    max_tokens = 8192
    with torch.device(dev):
        store.buffers(L, max_tokens, H, max_tokens + 512)
    buf = store.buf
    max_rows = PROMPT + GEN
    ids = [f"req{i}" for i in range(N_REQ)]
    if capture:
        for rid in ids:
            store.register(rid, list(range(L)), max_rows, "/dev/shm", 64 << 30)
    w = torch.randn(2048, 2048, device=dev, dtype=torch.bfloat16) / 45
    lay = torch.arange(L, device=dev, dtype=torch.float32) * 1000
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 150000, size=(N_REQ, max_rows)).astype(np.int64)

    def step(reqs: list[int], start: int, count: int) -> None:
        """Requests ``reqs`` each run positions ``start .. start + count - 1``."""
        n = len(reqs) * count
        qsl = np.arange(len(reqs) + 1, dtype=np.int32) * count
        pos_np = np.tile(np.arange(start, start + count), len(reqs))
        req_np = np.repeat(np.asarray(reqs), count)
        positions = torch.from_numpy(pos_np).to(dev, non_blocking=True)
        input_ids = torch.from_numpy(tokens[req_np, pos_np].astype(np.int32)).to(dev, non_blocking=True)
        code = torch.from_numpy((req_np * 100000 + pos_np).astype(np.float32)).to(dev, non_blocking=True)
        store.begin_step([ids[r] for r in reqs], qsl, positions, input_ids, n)
        x = torch.randn(max(n, 64), 2048, device=dev, dtype=torch.bfloat16)
        for _ in range(4):  # the forward's stand-in: a few kernels, then the GPU busy for a 0.6B step's time
            x = x @ w
        if cuda:
            torch.cuda._sleep(FORWARD_CYCLES * (6 if count > 1 else 1))
        if capture:  # what the capture op writes into the buffer during the forward (every token captured)
            buf[:, :n] = code[None, :, None] + lay[:, None, None]
        store.end_step()

    def run() -> tuple[float, int]:
        sync()
        t = time.perf_counter()
        steps = 0
        for half in (range(0, N_REQ // 2), range(N_REQ // 2, N_REQ)):
            step(list(half), 0, PROMPT)
            steps += 1
        for k in range(GEN - 1):  # the last token is sampled, never fed
            step(list(range(N_REQ)), PROMPT + k, 1)
            steps += 1
            if capture and CHURN and k % CHURN == 0:  # a request of no step here starts and stops capturing,
                # as they come and go beside a decoding batch in a serving engine (register, later take)
                store.register(f"other{k}", list(range(L)), max_rows, "/dev/shm", 64 << 30)
                store.drop(f"other{k}")
        sync()
        return time.perf_counter() - t, steps

    wall, steps = run()  # warm-up: first-use kernels, the caching allocators
    res: dict = {}
    if capture:
        ok_pos = ok_tok = ok_rows = True
        for i, rid in enumerate(ids):
            out = store.take(rid)
            n_pos = PROMPT + GEN - 1
            ok_pos &= out["positions"] == list(range(n_pos))
            ok_tok &= out["token_ids"] == tokens[i, :n_pos].tolist()
            rows = np.asarray(store.arena.get(out["region"]).segment.array[out["offset_rows"]:][:L * max_rows])
            want = (i * 100000 + np.arange(n_pos))[None, :] + np.arange(L)[:, None] * 1000
            ok_rows &= bool(np.array_equal(rows.reshape(L, max_rows, H)[:, :n_pos, :].min(-1), want)) and \
                bool(np.array_equal(rows.reshape(L, max_rows, H)[:, :n_pos, :].max(-1), want))
            store.free([out["region"]])
            store.register(rid, list(range(L)), max_rows, "/dev/shm", 64 << 30)
        res["correct"] = {"positions": ok_pos, "tokens": ok_tok, "rows": bool(ok_rows)}
    before = dict(store.stats())
    walls = []
    for _ in range(3):
        w_s, steps = run()
        walls.append(w_s)
        if capture:
            for rid in ids:  # released and registered again, as requests come and go
                out = store.take(rid)
                store.free([out["region"]])
                store.register(rid, list(range(L)), max_rows, "/dev/shm", 64 << 30)
    after = store.stats()
    res["ms_per_step"] = round(min(walls) / steps * 1e3, 3)
    if capture:
        k = after["capture_steps"] - before.get("capture_steps", 0)
        for key in ("runner_us_per_step", "copy_thread_us_per_step"):
            if key in after:
                res[key] = round((after[key] * after["capture_steps"] - before[key] * before["capture_steps"]) / k, 1)
        res["mapped_segments"] = after.get("mapped_segments")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--pkg", action="append", default=[], help="name=path of another checkout's steer_actors")
    ap.add_argument("--child", nargs=3)  # pkg, capture(0|1), scatter mode
    args = ap.parse_args()
    if args.child:
        pkg, cap, mode = args.child
        if mode != "default":
            os.environ["STEER_CAPTURE_SCATTER"] = mode
        print("RESULT=" + json.dumps(child(pkg, cap == "1")), flush=True)
        return
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "steer_actors")
    pkgs = [("head", here)] + [tuple(p.split("=", 1)) for p in args.pkg]
    out: dict = {"what": __doc__.split("\n\n")[0], "shape": {"layers": L, "hidden": H, "requests": N_REQ,
                                                             "prompt": PROMPT, "gen": GEN}, "churn_every": CHURN}
    import torch

    out["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke test)"

    def spawn(pkg: str, cap: bool, mode: str) -> dict:
        p = subprocess.run([sys.executable, __file__, "--out", "-", "--child", pkg, "1" if cap else "0", mode],
                           capture_output=True, text=True, timeout=240)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT=")]
        return json.loads(line[-1][7:]) if line else {"error": p.stderr[-600:]}

    out["no_capture"] = spawn(here, False, "default")
    for name, pkg in pkgs:
        for mode in MODES:
            out[f"{name}:{mode}"] = r = spawn(pkg, True, mode)
            if "ms_per_step" in r and "ms_per_step" in out["no_capture"]:
                r["ratio_vs_no_capture"] = round(out["no_capture"]["ms_per_step"] / r["ms_per_step"], 3)
            print(name, mode, json.dumps(r), flush=True)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
