"""How a host-side benchmark reports: the result as one JSON line, and as a file under bench/results/."""

from __future__ import annotations

import json


def emit(res: dict, out: str | None) -> None:
    print(json.dumps(res))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
