"""The two-node scenarios (tests/multinode/), run by a pytest process of their own: a
``ray.cluster_utils.Cluster`` needs that process's Ray driver, while this process's driver belongs to the
local Ray its engines run on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
HERE = Path(__file__).parent


def test_two_simulated_nodes():
    env = {**os.environ, "STEER_MULTINODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           str(HERE / "multinode")], env=env, capture_output=True, text=True, timeout=1800,
                          cwd=HERE.parent)
    summary = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASSED", "FAILED", "ERROR"))]
    assert proc.returncode == 0, "\n".join(summary) + "\n" + proc.stdout[-8000:]
    assert len([ln for ln in summary if ln.startswith("PASSED")]) == 7, summary
