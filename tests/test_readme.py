"""README.md's code blocks run as written.

Every fenced block in README.md is preceded by a marker line that says what this test does with it:

* ``<!-- readme-test: run NAME -->``: a ```python block, run as a script in a process of its own (real Ray,
  Serve and vLLM engine); the checker ``CHECKS[NAME]`` asserts on what it printed;
* ``<!-- readme-test: exempt (why) -->``: a block that is not Python (set-up or cluster commands);
* ``<!-- test-command -->``: the test command that ``.ci/run`` reads (the line after the fence).

A block without a marker, a Python block marked exempt, or a ``run`` block without a checker fails here,
so a new example is never silently skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"^<!-- (?:readme-test: (run|exempt)\b\s*(.*?)|(test-command)) -->$")

SETUP_COMMANDS = {
    "./scripts/setup.sh && python -m steer_actors.demo",
    "./scripts/setup.sh && python -m pytest -q -p no:cacheprovider tests",
}


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # the marker line just above the fence, if any


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README.md:{i + 1}: unclosed code fence"
        above = lines[i - 1].strip() if i > 0 else ""
        blocks.append(Block(i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n",
                            above if MARKER.match(above) else None))
        i = end + 1
    return blocks


def _kind(block: Block) -> tuple[str, str]:
    m = MARKER.match(block.marker or "")
    assert m, f"README.md:{block.line}: a ```{block.lang} block without a readme-test marker on the line above"
    return ("exempt", "test-command") if m.group(3) else (m.group(1), m.group(2))


# ---- what each runnable block must print ------------------------------------------------------------------
def _printed(stdout: str, label: str) -> str:
    found = [ln.split(":", 1)[1].strip() for ln in stdout.splitlines() if ln.startswith(label + ":")]
    assert len(found) == 1, f"expected one line starting {label + ':'!r} in:\n{stdout}"
    return found[0]


def check_quickstart(stdout: str) -> None:
    baseline, steered, cleared = (_printed(stdout, k) for k in ("baseline", "steered", "cleared"))
    steered_text = steered.rsplit(" (spec version", 1)[0]
    assert steered_text != baseline, "the steering vector changed nothing"
    assert re.search(r"\(spec version [1-9]\d*\)$", steered), steered  # ran under a committed change
    assert cleared == baseline, "clearing the vector did not restore the unsteered output"


def check_steering_and_capture(stdout: str) -> None:
    plain = _printed(stdout, "unsteered")
    assert _printed(stdout, "per-request, steered") != plain
    assert _printed(stdout, "per-request, unsteered") == plain, "a per-request spec leaked into another request"
    assert _printed(stdout, "in context") == _printed(stdout, "per-request, steered"), (
        "the same spec applied globally and per request steered differently")
    assert _printed(stdout, "after context") == plain, "the context did not restore the previous spec"
    rows, hidden = (int(x) for x in re.fullmatch(r"\((\d+), (\d+)\)", _printed(stdout, "captured shape")).groups())
    prompt_len, generated = (int(x) for x in _printed(stdout, "prompt, generated tokens").split())
    assert rows == prompt_len + generated - 1 and hidden > 0
    assert _printed(stdout, "released") == "2"


CHECKS = {"quickstart": check_quickstart, "steering-and-capture": check_steering_and_capture}


# ---- tests -----------------------------------------------------------------------------------------------
def test_every_block_is_marked_and_python_blocks_run():
    blocks = readme_blocks()
    assert blocks, "README.md has no code blocks?"
    names = []
    for b in blocks:
        kind, arg = _kind(b)
        if b.lang == "python":
            assert kind == "run", f"README.md:{b.line}: python blocks must run (marked {kind})"
        if kind == "run":
            assert b.lang == "python", f"README.md:{b.line}: only python blocks can run"
            assert arg in CHECKS, f"README.md:{b.line}: no checker named {arg!r} in tests/test_readme.py"
            names.append(arg)
        else:
            assert b.lang != "python"
    assert "quickstart" in names
    assert len(names) == len(set(names)), "two blocks share a checker"


def test_setup_commands_are_unchanged():
    setup = [b.code.strip() for b in readme_blocks() if b.code.strip() in SETUP_COMMANDS]
    assert sorted(setup) == sorted(SETUP_COMMANDS)
    # .ci/run runs the line after the fence that follows the marker
    out = subprocess.run(["awk", "/<!-- test-command -->/{getline; getline; print; exit}", str(README)],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "./scripts/setup.sh && python -m pytest -q -p no:cacheprovider tests"


def _runnable() -> list[pytest.param]:
    out = []
    for b in readme_blocks():
        m = MARKER.match(b.marker or "")
        if m and m.group(1) == "run":
            out.append(pytest.param(b, id=m.group(2)))
    return out


@pytest.mark.engine
@pytest.mark.parametrize("block", _runnable())
def test_readme_python_block_runs_as_written(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block.code)
    # A new local Ray for the script, as on a fresh machine: never the test session's cluster, which
    # ``ray.init()`` would otherwise find and attach to.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README.md:{block.line} exited {proc.returncode}\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-8000:]}"
    CHECKS[_kind(block)[1]](proc.stdout)
