"""Decoder layers are patched in a worker even when vLLM's plugin entry point is not discovered.

On the GPU host an editable install's ``vllm.general_plugins`` entry point was invisible to the workers
and every engine came up with no steerable layer. vLLM imports ``worker_extension_cls`` in each worker
(after loading plugins, before building the model), so importing the extension must patch by itself.
A fresh interpreter with plugins disabled stands in for such a worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json
from vllm.plugins import load_general_plugins
load_general_plugins()  # VLLM_PLUGINS="": our entry point is skipped, as if it were never found
from steer_actors.worker.layer_patch import _PATCHED_ATTR
from steer_actors.vllm_compat import decoder_layer_classes
before = {c.__qualname__: bool(c.__dict__.get(_PATCHED_ATTR)) for c in decoder_layer_classes()}
from vllm.utils.import_utils import resolve_obj_by_qualname
resolve_obj_by_qualname("steer_actors.worker.extension.SteerWorkerExtension")  # what a worker does next
after = {c.__qualname__: bool(c.__dict__.get(_PATCHED_ATTR)) for c in decoder_layer_classes()}
print("RESULT=" + json.dumps({"before": before, "after": after}))
"""


def test_worker_extension_patches_without_the_plugin():
    env = {**os.environ, "VLLM_PLUGINS": ""}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=240)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT=")]
    assert line, out.stderr[-3000:]
    res = json.loads(line[-1][7:])
    assert not any(res["before"].values())  # the plugin really was off
    assert res["after"]["Qwen3DecoderLayer"] and res["after"]["LlamaDecoderLayer"] and all(res["after"].values())
