"""Settings in one place: every environment variable the package reads is in ``steer_actors.envs``, typed, with
its default, and a bad value is a clear error naming the variable."""

from __future__ import annotations

import pathlib
import re

import pytest

from steer_actors import envs


def test_values_are_parsed_with_their_defaults():
    var = envs.VARIABLES
    assert var["STEER_CAPTURE_DIRECT"].read({}) == "1"
    assert var["STEER_CAPTURE_DIRECT"].read({"STEER_CAPTURE_DIRECT": "always"}) == "always"
    assert var["STEER_ACTORS_DUMP_STACKS"].read({}) is False
    assert var["STEER_ACTORS_DUMP_STACKS"].read({"STEER_ACTORS_DUMP_STACKS": "1"}) is True
    assert var["STEER_ACTORS_DUMP_STACKS"].read({"STEER_ACTORS_DUMP_STACKS": "0"}) is False
    assert var["TRITON_INTERPRET"].read({"TRITON_INTERPRET": "1"}) is True
    assert var["STEER_TEST_RAY_PORT"].read({"STEER_TEST_RAY_PORT": "7001"}) == 7001
    assert var["NCCL_NVLS_ENABLE"].read({}) is None


def test_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("STEER_CAPTURE_DIRECT", "sometimes")
    with pytest.raises(ValueError, match="STEER_CAPTURE_DIRECT: must be one of"):
        envs.STEER_CAPTURE_DIRECT
    with pytest.raises(AttributeError):
        envs.NOT_A_SETTING


def test_every_variable_read_in_the_package_is_in_the_table():
    """Environment reads outside ``envs`` name a variable of the table (writes, e.g. the engine's ``env``
    setting, are not reads)."""
    root = pathlib.Path(envs.__file__).parent
    read = re.compile(r"""(?:environ\.get\(|getenv\(|environ\[)\s*["']([A-Z0-9_]+)["'](?!\]\s*=[^=])""")
    found = {}
    for path in root.rglob("*.py"):
        if path.name != "envs.py":
            for name in read.findall(path.read_text()):
                found.setdefault(name, []).append(str(path.relative_to(root)))
    assert set(found) <= set(envs.VARIABLES), {k: v for k, v in found.items() if k not in envs.VARIABLES}
