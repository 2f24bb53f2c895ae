"""Plumbing of the client's calls to the app: argument forms, Serve responses, blocking calls."""

from __future__ import annotations

import operator
from typing import Any, Generator

from steer_actors.specs import SteeringSpec

SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop",
                   "stop_token_ids", "ignore_eos", "logprobs", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")


def sampling_dict(sampling_params: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """A ``vllm.SamplingParams`` or a dict, plus keyword overrides -> the fields the engine builds its
    ``SamplingParams`` from (an unknown keyword is refused there, by name)."""
    if sampling_params is None:
        base: dict[str, Any] = {}
    elif isinstance(sampling_params, dict):
        base = dict(sampling_params)
    else:  # a vllm.SamplingParams: keep the fields researchers set
        base = {f: getattr(sampling_params, f) for f in SAMPLING_FIELDS if hasattr(sampling_params, f)}
    base.update(overrides)
    return base


def layer_index(x: Any, what: str = "layer_idx") -> int:
    """An int (numpy's too) >= 0; never a bool, a float truncated or a string parsed."""
    if isinstance(x, bool):
        raise ValueError(f"{what} must be a layer index (an integer), got {x!r}")
    try:
        i = operator.index(x)
    except TypeError:
        raise ValueError(f"{what} must be a layer index (an integer), got {x!r}") from None
    if i < 0:
        raise ValueError(f"{what} must be >= 0, got {i}")
    return i


def capture_layer_list(capture_layers: Any) -> list[int] | None:
    """``capture_layers``: one index or a sequence of them (sorted, duplicates dropped); None/empty: none."""
    if capture_layers is None:
        return None
    if not isinstance(capture_layers, (list, tuple, set, frozenset, range)):
        return [layer_index(capture_layers, "capture_layers")]
    return sorted({layer_index(x, "capture_layers") for x in capture_layers}) or None


def _plain(e: ValueError) -> ValueError:
    cause = getattr(e, "cause", None)
    return ValueError(str(cause if cause is not None else e))


async def unwrap(response: Any) -> Any:
    """Await a Serve response; user errors come back as the plain ValueError the app raised."""
    try:
        return await response
    except ValueError as e:
        raise _plain(e) from None


def blocking(fn):
    """Run a blocking Serve call; from inside a running event loop (``await``-style scripts that
    construct the client) it runs on a helper thread, which Serve allows."""
    import asyncio
    import concurrent.futures

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def call_blocking(method: Any, *args: Any) -> Any:
    """``handle.method.remote(*args).result()``, with user errors as plain ValueErrors."""
    def run() -> Any:
        try:
            return method.remote(*args).result()
        except ValueError as e:
            raise _plain(e) from None

    return blocking(run)


class ExportedSteeringSpec(SteeringSpec):
    """A :class:`SteeringSpec` that may also be awaited (``await model.export_steering_spec()``), which
    returns it at once: chatspace's call was synchronous, async code may still write ``await``."""

    def __await__(self) -> Generator[Any, None, "ExportedSteeringSpec"]:
        return self
        yield  # pragma: no cover  (makes this a generator: awaiting it finishes at once)
