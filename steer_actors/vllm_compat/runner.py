"""The model runner's batch layout and forward boundaries: the step probe that per-request routing, capture and
the double-buffered global rows hang on (V1 runner: vLLM 0.32 CPU; V2 runner: vLLM 0.26 GPU)."""

from __future__ import annotations

from typing import Any

import torch


def worker_model(worker: Any) -> torch.nn.Module:
    """The nn.Module a worker runs, unwrapped from CUDA-graph / ubatch wrappers (V1 and V2 runners)."""
    model = worker.model_runner.get_model()
    while not isinstance(model, torch.nn.Module) and hasattr(model, "unwrap"):
        model = model.unwrap()
    if not isinstance(model, torch.nn.Module):
        model = getattr(model, "runnable", model)
    return model


def tp_rank(worker: Any) -> int:
    return int(getattr(worker, "rank", 0))


def install_step_probe(worker: Any, runtime: Any, listener: Any = None) -> None:
    """Hook the model runner once, for ``runtime`` (the worker's
    :class:`~steer_actors.worker.runtime.WorkerRuntime`): every forward is enqueued under ``runtime.gate.lock``
    (so request-slot loads land between forwards; the jobs waiting for that gap run first) after switching to
    the newest committed copy of the global rows (``runtime.selector``, see
    :mod:`steer_actors.worker.double_buffer`), and ``listener`` learns the batch layout of each forward:
    ``begin_step(req_ids, query_start_loc, positions, input_ids, num_padded)`` after the runner built its
    inputs, ``end_step()`` once the forward is enqueued.

    * V1 runner (vLLM 0.32 CPU; 0.26 GPU with the V1 runner): ``_model_forward`` is the hook point
      vLLM documents for subclasses; the batch is ``input_batch`` + ``query_start_loc``.
    * V2 GPU runner (vLLM 0.26 default): ``prepare_inputs`` returns the step's ``InputBatch`` (request
      order, query start locations, device positions and input ids, padded size); ``execute_model``
      runs the forward (eager, piecewise or full graph) and returns before sampling.
    """
    runner = worker.model_runner
    listeners = runner.__dict__.get("_steer_listeners")
    if listeners is None:
        if hasattr(runner, "_model_forward") and hasattr(runner, "query_start_loc"):
            wrap = _probe_v1
        elif hasattr(runner, "prepare_inputs") and hasattr(runner, "execute_model"):
            wrap = _probe_v2
        else:
            raise RuntimeError(f"steer_actors does not know this model runner ({type(runner)})")
        listeners = runner._steer_listeners = []
        wrap(runner, runtime.gate, runtime.selector, listeners)
    if listener is not None and listener not in listeners:
        listeners.append(listener)


def _end(listeners: list) -> None:
    for lst in listeners:
        lst.end_step()


def _probe_v1(runner: Any, gate: Any, selector: Any, listeners: list) -> None:
    orig = runner._model_forward
    lock, note_forward_stream, run_pending, at_forward_start = (gate.lock, gate.note_forward_stream,
                                                               gate.run_pending, selector.at_forward_start)

    def probed(*args: Any, **kwargs: Any) -> Any:
        with lock:
            note_forward_stream()
            run_pending()  # changes waiting for a gap between forwards land before this one
            at_forward_start()  # the newest committed copy of the global rows
            n = runner.input_batch.num_reqs
            req_ids = list(runner.input_batch.req_ids[:n])
            qsl = runner.query_start_loc.np[: n + 1]
            positions, input_ids = kwargs.get("positions"), kwargs.get("input_ids")
            padded = positions.shape[-1] if positions is not None else None
            for lst in listeners:
                lst.begin_step(req_ids, qsl, positions, input_ids, padded)
            try:
                return orig(*args, **kwargs)
            finally:
                _end(listeners)

    runner._model_forward = probed


def _probe_v2(runner: Any, gate: Any, selector: Any, listeners: list) -> None:
    """The lock is taken once the step's inputs are prepared and released when the forward is enqueued:
    the rest of ``execute_model`` (request bookkeeping, which may wait for the previous step's results
    under async scheduling) runs without it, so a change waits for a forward's launch, not for a step."""
    orig_prepare, orig_execute = runner.prepare_inputs, runner.execute_model
    lock, note_forward_stream, run_pending, at_forward_start = (gate.lock, gate.note_forward_stream,
                                                               gate.run_pending, selector.at_forward_start)

    def prepare_inputs(*args: Any, **kwargs: Any) -> Any:
        batch = orig_prepare(*args, **kwargs)
        lock.acquire()
        runner._steer_locked = True
        note_forward_stream()
        run_pending()  # changes waiting for a gap between forwards land before this one
        at_forward_start()  # the newest committed copy of the global rows
        n = batch.num_reqs
        for lst in listeners:
            lst.begin_step(list(batch.req_ids[:n]), batch.query_start_loc_np[: n + 1], batch.positions,
                           batch.input_ids, batch.num_tokens_after_padding)
        return batch

    def execute_model(*args: Any, **kwargs: Any) -> Any:
        try:
            return orig_execute(*args, **kwargs)
        finally:
            try:
                _end(listeners)
            finally:
                if runner.__dict__.pop("_steer_locked", False):
                    lock.release()

    runner.prepare_inputs, runner.execute_model = prepare_inputs, execute_model

