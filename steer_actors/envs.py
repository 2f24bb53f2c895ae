"""Every environment variable steer-actors reads: its type, default and meaning, in one table (:data:`VARIABLES`).

Read them as attributes of this module (``envs.STEER_CAPTURE_DIRECT``): each access parses the environment
anew, so code reads a value once, where the object that uses it is built, and keeps it; nothing reads the
environment per step. What an engine is started with belongs in :class:`~steer_actors.config.VLLMSteeringConfig`
(its ``env`` field sets variables for the engine's processes, these included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    STEER_ACTORS_DUMP_STACKS: bool
    STEER_CAPTURE_DIRECT: str
    STEER_ACTORS_CACHE: str
    TRITON_INTERPRET: bool
    NCCL_NVLS_ENABLE: str | None
    STEER_TEST_RAY_PORT: int


def _flag(raw: str) -> bool:
    return raw not in ("", "0")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(f"must be one of {list(allowed)}, not {raw!r}")
        return raw

    return parse


@dataclass(frozen=True)
class EnvVar:
    name: str
    type: Any
    default: Any
    doc: str
    parse: Callable[[str], Any] = str

    def read(self, env: Mapping[str, str] | None = None) -> Any:
        raw = (os.environ if env is None else env).get(self.name)
        if raw is None:
            return self.default
        try:
            return self.parse(raw)
        except ValueError as e:
            raise ValueError(f"environment variable {self.name}: {e}") from None


VARIABLES: dict[str, EnvVar] = {v.name: v for v in (
    EnvVar("STEER_ACTORS_DUMP_STACKS", bool, False,
           "Set (not 0): ``kill -USR1 <pid>`` makes a vLLM process of a steering engine write every thread's "
           "stack to stderr (what a hung engine process is doing, where no debugger can attach). Read when the "
           "worker plugin loads.", _flag),
    EnvVar("STEER_CAPTURE_DIRECT", str, "1",
           "How a worker writes captured rows. ``1``: on a GPU the device writes them straight into the capture "
           "arena's host pages (registered with CUDA) where the driver allows it; ``0``: always the host path (a "
           "copy thread), for comparison or a driver that misbehaves with registered shared memory; ``always``: "
           "the direct path's logic on a CPU engine too (tests). Read when a worker builds its capture buffer.",
           _choice("0", "1", "always")),
    EnvVar("STEER_ACTORS_CACHE", str, os.path.join(os.path.expanduser("~"), ".cache", "steer_actors"),
           "Where the tiny test models (``tiny:qwen3``, ``tiny:llama``) are built and cached."),
    EnvVar("TRITON_INTERPRET", bool, False,
           "Triton's own: ``1`` runs Triton kernels in its interpreter. The steering op (and the capture "
           "scatter kernel) then take their Triton form on a CPU too (tests). Read when those modules load.",
           lambda raw: raw == "1"),
    EnvVar("NCCL_NVLS_ENABLE", str, None,
           "NCCL's own: ``0`` (NVLink multicast off) also keeps vLLM's all-reduce fusion off multicast (see "
           ":func:`steer_actors.vllm_compat.keep_off_multicast`). Read when an engine starts."),
    EnvVar("STEER_TEST_RAY_PORT", int, 6390,
           "Tests only: the port of the local Ray cluster the test fixtures start (:mod:`steer_actors.testing`).",
           int),
)}


def __getattr__(name: str) -> Any:
    var = VARIABLES.get(name)
    if var is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return var.read()


def __dir__() -> list[str]:
    return sorted([*globals(), *VARIABLES])
