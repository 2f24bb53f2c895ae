"""Worker extension (``worker_extension_cls``): the ``steer_*`` methods reached by ``collective_rpc``.

Every TP rank runs the same calls. A change is two-phase so that it lands on every rank of every
replica or on none: ``steer_stage`` takes the host rows of a version (built by the engine actor, or built
here from a spec) and packs what changed (nothing visible changes); ``steer_commit`` copies them into the
layer buffers between two forward launches (over the side channel, see :mod:`.channel`; through
``collective_rpc``, between two engine steps).
Arguments and replies are those of :mod:`.protocol`.
"""

from __future__ import annotations

from typing import Any

from steer_actors import vllm_compat
from steer_actors.ops.change import ChangeRows, rows_from_payload
from steer_actors.ops.rows import ops_to_flat
from steer_actors.specs import SteeringSpec
from steer_actors.worker.layer_patch import LayerSteerer, install as install_patch, pack_rows, steerers
from steer_actors.worker.plugin import dump_stacks_on_signal
from steer_actors.worker.protocol import CaptureRequest, CaptureTaken
from steer_actors.worker.runtime import WorkerRuntime

# vLLM imports this class in every worker before the worker builds its model, so the decoder layers are
# patched here whether or not the ``vllm.general_plugins`` entry point was discovered (on the GPU host an
# editable install's entry point was not, and every engine came up with no steerable layer).
install_patch()
dump_stacks_on_signal()


class SteerWorkerExtension:
    def _steer_layers(self) -> dict[int, LayerSteerer]:
        cached = self.__dict__.get("_steer_layer_cache")
        if cached is None:
            cached = self._steer_layer_cache = steerers(vllm_compat.worker_model(self))
        return cached

    def _steer_runtime(self) -> WorkerRuntime:
        """The runtime this worker's layers were built with (see :mod:`.runtime`); one of its own where the
        model has no steerable layer (nothing reads it then, and every change is refused)."""
        rt = self.__dict__.get("_steer_runtime_")
        if rt is None:
            layer = next(iter(self._steer_layers().values()), None)
            rt = self._steer_runtime_ = layer.runtime if layer is not None else WorkerRuntime()
        return rt

    def _steer_probe(self, listener: Any = None) -> WorkerRuntime:
        """The runtime, with the runner hooked (once) and ``listener`` told of every forward."""
        rt = self._steer_runtime()
        vllm_compat.install_step_probe(self, rt, listener)
        return rt

    def _steer_state(self) -> dict[str, Any]:
        st = self.__dict__.get("_steer_state_")
        if st is None:
            # loaded: what each copy of the global rows holds, per layer (see double_buffer)
            st = self._steer_state_ = {"staged": {}, "version": 0, "fingerprint": SteeringSpec().fingerprint(),
                                       "loaded": ({}, {})}
        return st

    def _no_layers(self) -> str:
        """Why a worker found no steerable layer: what it runs and what the patch covered."""
        from steer_actors.worker.layer_patch import _PATCHED_ATTR

        model = vllm_compat.worker_model(self)
        patched = [c.__qualname__ for c in vllm_compat.decoder_layer_classes() if c.__dict__.get(_PATCHED_ATTR)]
        kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")})
        return (f"this engine has no steerable layers (was it started by steer_actors?): it runs "
                f"{type(model).__name__} with layers {kinds}; patched here: {patched}")

    def steer_channel_open(self, switch_interval_s: float | None = None) -> dict[str, str]:
        """Start this worker's side channel (once): the address of each lane (see :mod:`.channel`).
        ``switch_interval_s``: see :meth:`steer_switch_interval`."""
        from steer_actors.worker.channel import WorkerChannel
        from steer_actors.worker.protocol import LANES

        gate = self._steer_probe().gate
        self.steer_switch_interval(switch_interval_s)
        chans = self.__dict__.get("_steer_channels")
        if chans is None:
            chans = self._steer_channels = {lane: WorkerChannel(self, gate, lane) for lane in LANES}
        return {lane: ch.address for lane, ch in chans.items()}

    def steer_switch_interval(self, seconds: float | None) -> float:
        """Set this worker process's GIL switch interval (None: leave it); returns the one in force. A channel
        thread copying a change waits up to one interval for the GIL each time the runner's thread holds it
        (H100, 8B under load: the worker's copy p50 0.22 ms, p99 6.3 ms at Python's 5 ms). It only matters
        while two threads want the GIL: idle channel threads wait in their sockets without it."""
        import sys

        if seconds is not None:
            if not 1e-5 <= float(seconds) <= 1.0:
                raise ValueError(f"switch interval must be within [1e-5, 1] s, got {seconds}")
            sys.setswitchinterval(float(seconds))
        return sys.getswitchinterval()

    def steer_info(self) -> dict[str, Any]:
        layers = self._steer_layers()
        any_layer = next(iter(layers.values()), None)
        return {
            "rank": vllm_compat.tp_rank(self),
            "layers": sorted(layers),
            "hidden_size": any_layer.hidden if any_layer else None,
            "max_ops_per_layer": any_layer.num_slots if any_layer else 0,
            "version": self._steer_state()["version"],
            "fingerprint": self._steer_state()["fingerprint"],
        }

    def _build_rows(self, spec_wire: dict[str, Any]):
        """Validate a spec against this worker's layers; host rows per layer (key "" = no ops)."""
        spec = SteeringSpec.from_wire(spec_wire)
        layers = self._steer_layers()
        if not layers:
            raise ValueError(self._no_layers())
        any_layer = next(iter(layers.values()))
        spec.validate_for(any_layer.hidden, num_layers=max(layers) + 1, steerable_layers=sorted(layers),
                          max_ops_per_layer=any_layer.num_slots)
        rows = {}
        for idx, layer in layers.items():
            ls = spec.layers.get(idx)
            rows[idx] = (ls.fingerprint() if ls else "", ops_to_flat(ls.to_ops() if ls else [], layer.num_slots,
                                                                     layer.hidden))
        return spec.fingerprint(), rows

    def _rows_from_engine(self, payload: ChangeRows):
        """Rows the engine actor built from a spec it validated: (fingerprint, {layer: (key, CompactRows or
        None)}), checked against this worker's layers (see :mod:`steer_actors.ops.change`)."""
        layers = self._steer_layers()
        if not layers:
            raise ValueError(self._no_layers())
        return rows_from_payload(payload, layers)

    def steer_stage(self, version: int, change: ChangeRows | dict[str, Any]) -> str:
        """``change``: a spec's wire form (validated and built here), or rows the engine actor built
        (:func:`steer_actors.ops.change.rows_payload`). Nothing visible changes."""
        fp, rows = (self._rows_from_engine(change) if isinstance(change, ChangeRows) else
                    self._build_rows(change))
        self._steer_state()["staged"][int(version)] = (fp, rows)
        return fp

    def steer_commit(self, version: int) -> str:
        """Write the staged rows into the copy of the global rows no forward reads; every forward that starts
        after this returns reads them (see :mod:`.double_buffer`). Never waits for a forward."""
        st = self._steer_state()
        try:
            fp, rows = st["staged"].pop(int(version))
        except KeyError:
            raise ValueError(f"no staged steering version {version}") from None
        rt = self._steer_probe()  # the switch happens at a forward's start
        selector = rt.selector
        layers = self._steer_layers()
        any_layer = next(iter(layers.values()), None)
        if any_layer is not None and selector.sel is not None and any_layer.sel.data_ptr() != selector.sel.data_ptr():
            # the layers would read a copy of the selector that never switches: half the changes would land in
            # the copy in use
            raise RuntimeError("the layers' steering selector is not the one commits switch (were buffers moved?)")

        def write(copy: int) -> None:
            loaded = st["loaded"][copy]  # only layers whose rows differ from what this copy holds
            changed = [(idx, key, r) for idx, (key, r) in rows.items() if loaded.get(idx) != key]
            try:
                rt.staging.load(pack_rows([(layers[idx], r, bool(key)) for idx, key, r in changed], ("global", copy)))
            except BaseException:
                loaded.clear()  # what this copy holds is unknown now: the next change rewrites every layer
                raise
            for idx, key, _ in changed:
                loaded[idx] = key

        with rt.gate.on_forward_stream():  # the copies and the event the switch waits for, on the forwards' stream
            selector.write(write)
        # Older staged versions can never commit after a newer one.
        for v in [v for v in st["staged"] if v < int(version)]:
            del st["staged"][v]
        st["version"], st["fingerprint"] = int(version), fp
        return fp

    def steer_apply(self, version: int, change: ChangeRows | dict[str, Any]) -> str:
        """Stage and commit in one RPC: one engine alone needs no two-phase round trip."""
        self.steer_stage(version, change)
        return self.steer_commit(version)

    def steer_abort(self, version: int) -> None:
        self._steer_state()["staged"].pop(int(version), None)

    # ---- activation capture (rank 0 only: every rank holds the same residual stream) ------------
    def steer_capture_register(self, requests: list[CaptureRequest], host: str | None = None,
                               shared_cap_bytes: int | None = None) -> dict[str, str] | None:
        """``requests``: each with its layers and rows at most (prompt + max_tokens). ``host``: the engine actor's
        :func:`~steer_actors.worker.capture.arena.shared_memory_key`; where it is this worker's too, the rows go
        straight into a region of a shared-memory segment the engine maps, as steps complete, while the
        segments' reserved shared memory stays within ``shared_cap_bytes`` (the engine's capture budget).
        Returns the requests that could not be registered, with why (the engine batches many callers'
        requests into one call: one failure must not fail the others)."""
        if vllm_compat.tp_rank(self) != 0:
            return None
        import os

        from steer_actors.worker.capture.arena import shared_memory_key

        store = self._steer_probe(self._steer_runtime().store).store
        if store.rows_per_step == 0:
            raise ValueError("this engine was started with capture disabled (capture_rows_per_step=0)")
        to_dir = "/dev/shm" if host == shared_memory_key() and os.access("/dev/shm", os.W_OK) else None
        failed = {}
        for req in requests:
            try:
                store.register(req.request_id, req.layers, int(req.max_rows), to_dir, shared_cap_bytes)
            except Exception as e:
                failed[req.request_id] = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        return failed

    def steer_capture_take(self, request_ids: list[str]) -> dict[str, CaptureTaken | None] | None:
        """Captured rows of finished requests (each a segment path and region on the engine's host, which
        the engine frees with :meth:`steer_capture_free` once it copied them out; else inline)."""
        if vllm_compat.tp_rank(self) != 0:
            return None
        store, out = self._steer_runtime().store, {}
        for rid in request_ids:  # take every request, so none is left behind when one failed
            try:
                out[rid] = store.take(rid)
            except Exception as e:  # this request's error; the others' files still reach the engine
                out[rid] = CaptureTaken(error=str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
        return out

    def steer_capture_drop(self, request_ids: list[str]) -> None:
        store = self._steer_runtime().store
        for rid in request_ids:
            store.drop(rid)

    def steer_capture_free(self, region_ids: list[int]) -> int:
        """Regions handed over by :meth:`steer_capture_take`, once the engine has copied their rows."""
        if vllm_compat.tp_rank(self) != 0:
            return 0
        return self._steer_runtime().store.free(region_ids)

    def steer_capture_stats(self) -> dict[str, int] | None:
        if vllm_compat.tp_rank(self) != 0:
            return None
        return self._steer_runtime().store.stats()

    # ---- per-request steering ---------------------------------------------------------------------
    def _slot_build(self, slot: int, spec_wire: dict[str, Any]):
        """Validate a request spec and build its rows (host work, no forward waits for it)."""
        layers = self._steer_layers()
        capacity = next(iter(layers.values())).request_slots if layers else 0
        if not 1 <= int(slot) <= capacity:
            raise ValueError(f"request slot {slot} out of range 1..{capacity}")
        return self._build_rows(spec_wire)

    def _slot_write(self, slot: int, built) -> str:
        fp, rows = built
        layers = self._steer_layers()
        self._steer_runtime().staging.load(pack_rows([(layers[idx], r, True) for idx, (_, r) in rows.items()],
                                                     ("request", int(slot))))
        return fp

    def steer_slot_load(self, slot: int, spec_wire: dict[str, Any]) -> str:
        """Write a request spec into table ``slot`` of every layer (slot 0 is the identity)."""
        return self._slot_write(slot, self._slot_build(slot, spec_wire))

    def steer_route(self, pairs: list[tuple[str, int]]) -> None:
        router = self._steer_runtime().router
        self._steer_probe(router)
        router.bind(pairs)

    def steer_unroute(self, request_ids: list[str]) -> None:
        self._steer_runtime().router.unbind(request_ids)

