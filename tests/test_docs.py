"""The reference docs cover what the code has: every ``VLLMSteeringConfig`` field (with its real default) in
docs/configuration.md, every HTTP route of the ingress in docs/http-api.md, working links between the docs,
and no text that narrates the project's own development."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _config_rows() -> dict[str, list[str]]:
    """``field -> [type, default, meaning]`` from the tables of docs/configuration.md."""
    rows = {}
    for line in (DOCS / "configuration.md").read_text().splitlines():
        m = re.match(r"^\| `([a-z_]+)` \|(.*)\|\s*$", line)
        if m:
            # a literal "\|" inside a cell is part of a type such as ``int \| None``
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
            assert m.group(1) not in rows, f"{m.group(1)} is documented twice"
            rows[m.group(1)] = cells
    return rows


def test_every_config_field_is_documented_and_nothing_else():
    from steer_actors.config import VLLMSteeringConfig

    rows = _config_rows()
    fields = set(VLLMSteeringConfig.model_fields)
    assert sorted(fields - set(rows)) == [], "fields missing from docs/configuration.md"
    assert sorted(set(rows) - fields) == [], "docs/configuration.md documents fields the config does not have"


def test_documented_defaults_are_the_real_defaults():
    from pydantic_core import PydanticUndefined

    from steer_actors.config import VLLMSteeringConfig

    for name, (typ, default, meaning) in _config_rows().items():
        field = VLLMSteeringConfig.model_fields[name]
        assert typ and meaning, f"{name}: type and meaning must be filled in"
        if field.is_required():
            assert default == "required", f"{name} is required, documented default {default!r}"
            continue
        real = field.default_factory() if field.default_factory is not None else field.default
        assert real is not PydanticUndefined
        documented = ast.literal_eval(default.strip("`"))
        assert documented == real and type(documented) is type(real), (
            f"{name}: documented default {default} but the code has {real!r}")


def test_every_environment_variable_is_documented():
    from steer_actors import envs

    text = (DOCS / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", text, re.M))
    assert set(envs.VARIABLES) <= documented, sorted(set(envs.VARIABLES) - documented)
    assert documented <= set(envs.VARIABLES), sorted(documented - set(envs.VARIABLES))


def _routes() -> set[tuple[str, str]]:
    from steer_actors.serve.ingress import api

    out = set()
    for route in api.routes:
        methods = getattr(route, "methods", None) or set()
        if route.path in (api.openapi_url, api.docs_url, api.redoc_url, api.docs_url + "/oauth2-redirect"):
            continue
        for m in methods - {"HEAD", "OPTIONS"}:
            out.add((m, route.path))
    return out


def test_every_http_route_is_documented():
    text = (DOCS / "http-api.md").read_text()
    headings = set(re.findall(r"^### `(GET|POST|PUT|DELETE) (/[^`]*)`", text, re.M))
    routes = _routes()
    assert routes, "the ingress has no routes?"
    assert sorted(routes - headings) == [], "routes without a section in docs/http-api.md"
    assert sorted(headings - routes) == [], "docs/http-api.md documents routes the ingress does not have"


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(path):
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


# Wording that narrates the project's own history rather than describing the system.
_HISTORY = [
    r"\bsession\s*\d+", r"\bround (one|two|three|\d+)\b", r"\bissue\s*#?\d+", r"\bwas [\d.]+\s*(ms|s|x|%)",
    r"\bpreviously\b", r"\bno longer\b", r"\bused to\b", r"\(was\b",
]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_no_development_history_in_docs(path):
    text = path.read_text()
    for pattern in _HISTORY:
        m = re.search(pattern, text, re.I)
        context = text[max(0, m.start() - 80):m.end() + 80] if m else ""
        assert m is None, f"{path.name}: {m.group(0)!r} narrates development history: {context!r}"


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_serve_configs_are_valid(path):
    """Each example passes Serve's own schema (as `serve deploy` checks) and its args are a valid config."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from steer_actors.config import VLLMSteeringConfig

    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    assert config["http_options"]["host"] == "127.0.0.1", "the HTTP API has no authentication: bind loopback"
    for app in config["applications"]:
        assert app["import_path"] == "steer_actors.serve:build_app"
        VLLMSteeringConfig.model_validate(app["args"])
