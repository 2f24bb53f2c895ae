"""Why a GPU engine has no steerable layers: plugin discovery, class patching, and a tiny engine's layers.

    python bench/diag_patch.py      (prints one JSON line per check)
"""

from __future__ import annotations

import json
import os
import traceback


def check(name, fn):
    try:
        out = fn()
    except BaseException as e:  # noqa: BLE001 - a diagnostic reports everything
        out = {"error": repr(e), "trace": traceback.format_exc()[-1500:]}
    print(json.dumps({name: out}, default=str), flush=True)


def _probe(worker) -> dict:
    """Runs in a worker: what it built and what the patch saw."""
    import vllm.plugins as plugins

    from steer_actors import vllm_compat
    from steer_actors.worker.layer_patch import _PATCHED_ATTR

    model = vllm_compat.worker_model(worker)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return {
        "plugins_loaded": getattr(plugins, "plugins_loaded", None),
        "patched": {c.__qualname__: bool(c.__dict__.get(_PATCHED_ATTR)) for c in vllm_compat.decoder_layer_classes()},
        "model": type(model).__module__ + "." + type(model).__name__,
        "layer_types": sorted({type(m).__module__ + "." + type(m).__qualname__ for m in layers}),
        "with_steerer": sum("steerer" in m._modules for m in layers),
        "additional_config": worker.vllm_config.additional_config,
        "init_wrapped": [getattr(type(m).__init__, "__wrapped__", None) is not None for m in layers[:1]],
    }


def main() -> None:
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # a local diagnostic sends a function to the workers
    from importlib.metadata import entry_points

    check("entry_points", lambda: [(e.name, e.value) for e in entry_points(group="vllm.general_plugins")])
    check("env", lambda: {k: v for k, v in os.environ.items() if k.startswith(("VLLM", "PYTHONPATH"))})

    def imports():
        import importlib

        from steer_actors.vllm_compat import DECODER_LAYERS
        out = {}
        for mod, cls in DECODER_LAYERS:
            try:
                getattr(importlib.import_module(mod), cls)
                out[cls] = "ok"
            except BaseException as e:  # noqa: BLE001
                out[cls] = repr(e)[:300]
        return out

    def plugins():
        from vllm.plugins import load_general_plugins

        from steer_actors.worker.layer_patch import _PATCHED_ATTR
        from steer_actors.vllm_compat import decoder_layer_classes
        load_general_plugins()
        return {c.__qualname__: bool(c.__dict__.get(_PATCHED_ATTR)) for c in decoder_layer_classes()}

    check("plugins_then_patched", plugins)
    check("imports", imports)

    def engine():
        import asyncio

        from steer_actors.engine.actor import SteerEngine
        from steer_actors.testing import build_tiny_model

        eng = SteerEngine(dict(model_name=build_tiny_model("qwen3"), dtype="float32", max_model_len=256,
                               gpu_memory_utilization=0.2, enforce_eager=True))

        async def go():
            info = await eng.info()
            return {"layers": info["steerable_layers"], "worker": await eng.engine.collective_rpc(_probe)}

        try:
            return asyncio.run(go())
        finally:
            eng.engine.shutdown()

    check("engine", engine)


if __name__ == "__main__":
    main()
