"""HTTP + handle ingress. Python clients call the same methods through ``serve.get_app_handle``.

Bodies are JSON or msgpack (``Content-Type: application/msgpack``; vectors as float32 LE bytes +
shape). Bad input is a 4xx with ``{"error": message}``; nothing changes on the engines.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from steer_actors import wire
from steer_actors.control.coordinator import ReplicaUnavailableError
from steer_actors.specs import SteeringSpec, is_index, plain_value_errors

from steer_actors.serve.http_models import ChatRequest, GenerateRequest, OpBody, PopBody, SpecBody

MSGPACK = "application/msgpack"
api = FastAPI(title="steer-actors", version="0.1.0",
              description="Steer and read the residual stream of vLLM-served models.")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


@api.exception_handler(HTTPError)
async def _http_error(_req: Request, exc: HTTPError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


def _body_doc(model) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          MSGPACK: {"schema": schema}}}}


def _spec_json(wire_spec: dict[str, Any]) -> dict[str, Any]:
    return SteeringSpec.from_wire(wire_spec).model_dump(mode="json")


@serve.ingress(api)
class SteerIngress:
    def __init__(self, coordinator, max_body_bytes: int):
        self.coordinator = coordinator
        self.max_body_bytes = max_body_bytes

    # ---- the Python surface (handles) -----------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        return await self.coordinator.info.remote()

    async def generate(self, prompts: list[Any], sampling: dict[str, Any] | None = None,
                       capture_layers: int | list[int] | None = None,
                       steering_spec: Any = None) -> list[dict[str, Any]]:
        """One result dict per prompt (see :mod:`steer_actors.results`); ``capture_layers``: one or several."""
        if is_index(capture_layers):
            capture_layers = [int(capture_layers)]
        return await self.coordinator.generate.remote(prompts, sampling, capture_layers, steering_spec)

    async def chat(self, conversations: list[Any], sampling: dict[str, Any] | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return await self.coordinator.chat.remote(conversations, sampling, chat_template_kwargs)

    async def get_spec(self) -> dict[str, Any]:
        return await self.coordinator.get_spec.remote()

    async def edit(self, edit: dict[str, Any]) -> dict[str, Any]:
        return await self.coordinator.edit.remote(edit)

    async def push(self, spec_wire: dict[str, Any]) -> dict[str, Any]:
        return await self.coordinator.push.remote(spec_wire)

    async def pop(self, push_id: int | None = None) -> dict[str, Any]:
        return await self.coordinator.pop.remote(push_id)

    async def get_capture(self, capture_id: str) -> dict[str, Any]:
        return await self.coordinator.get_capture.remote(capture_id)

    async def release_captures(self, capture_ids: list[str]) -> int:
        return await self.coordinator.release_captures.remote(capture_ids)

    async def replica_states(self) -> list[Any]:
        return await self.coordinator.replica_states.remote()

    # ---- HTTP ---------------------------------------------------------------------------------
    async def _body(self, request: Request, model=None) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise HTTPError(413, f"body of {length} bytes exceeds the limit of {self.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no length to check first
            size += len(chunk)
            if size > self.max_body_bytes:
                raise HTTPError(413, f"body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
        try:
            if ctype == MSGPACK:
                data = wire.unpackb(raw)
            elif ctype in ("application/json", ""):
                import json

                data = json.loads(raw or b"null")
            else:
                raise HTTPError(415, f"unsupported content type {ctype!r}; use application/json or {MSGPACK}")
            if model is not None:
                with plain_value_errors():
                    # the validated values travel on ("3" in capture_layers becomes 3, or is refused here)
                    data = model.model_validate(data).model_dump(exclude_unset=True)
        except (ValueError, TypeError, RecursionError) as e:
            raise HTTPError(400, f"invalid body: {str(e)[:500]}") from None
        return data

    async def _call(self, coro) -> Any:
        try:
            return await coro
        except ValueError as e:  # user error raised by the coordinator or an engine
            msg = str(getattr(e, "cause", None) or e).strip()
            # a capture released, expired or never made (its text is all that crosses the actors)
            raise HTTPError(404 if re.search(r"unknown capture ['\"]", msg) else 400, msg) from None
        except ReplicaUnavailableError as e:  # an engine died or is restarting: the client may retry
            raise HTTPError(503, str(getattr(e, "cause", None) or e).strip()) from None

    def _reply(self, request: Request, payload: dict[str, Any]) -> Response:
        if MSGPACK in request.headers.get("accept", ""):
            return Response(wire.packb(payload), media_type=MSGPACK)
        if "spec" in payload:
            payload = {**payload, "spec": _spec_json(payload["spec"])}
        return JSONResponse(payload)

    @api.get("/v1/info")
    async def http_info(self) -> dict[str, Any]:
        return await self.info()

    @api.post("/v1/generate", openapi_extra=_body_doc(GenerateRequest))
    async def http_generate(self, request: Request) -> Response:
        body = await self._body(request, GenerateRequest)
        results = await self._call(self.generate(body["prompts"], body.get("sampling"), body.get("capture_layers"),
                                                 body.get("steering_spec")))
        for r in results:  # object refs stay in the cluster; HTTP clients download by capture_id
            if r.get("captures"):
                r["captures"] = {k: v for k, v in r["captures"].items() if k not in ("owner", "ref")}
        return self._reply(request, {"results": results})

    @api.get("/v1/captures/{capture_id}")
    async def http_get_capture(self, capture_id: str, format: str = "msgpack") -> Response:
        data = await self._call(self.get_capture(capture_id))
        layers = {str(k): v for k, v in data["layers"].items()}
        if format == "safetensors":
            import torch
            from safetensors.torch import save

            tensors = {f"layer_{k}": v.contiguous() for k, v in layers.items()}
            tensors["positions"] = torch.tensor(data["positions"], dtype=torch.int64)
            tensors["token_ids"] = torch.tensor(data["token_ids"], dtype=torch.int64)
            return Response(save(tensors), media_type="application/octet-stream")
        if format != "msgpack":
            raise HTTPError(400, f"unknown format {format!r}; use msgpack or safetensors")
        payload = {"positions": data["positions"], "token_ids": data["token_ids"],
                   "layers": {k: wire.encode_tensor(v) for k, v in layers.items()}}
        return Response(wire.packb(payload), media_type=MSGPACK)

    @api.delete("/v1/captures/{capture_id}")
    async def http_release_capture(self, capture_id: str) -> dict[str, Any]:
        released = await self._call(self.release_captures([capture_id]))
        if not released:
            raise HTTPError(404, f"unknown capture {capture_id!r}")
        return {"released": released}

    @api.post("/v1/chat", openapi_extra=_body_doc(ChatRequest))
    async def http_chat(self, request: Request) -> Response:
        body = await self._body(request, ChatRequest)
        results = await self._call(self.chat(body["conversations"], body.get("sampling"),
                                             body.get("chat_template_kwargs")))
        return self._reply(request, {"results": results})

    @api.get("/v1/steering")
    async def http_get_spec(self, request: Request) -> Response:
        return self._reply(request, await self.get_spec())

    @api.put("/v1/steering", openapi_extra=_body_doc(SpecBody))
    async def http_put_spec(self, request: Request) -> Response:
        body = await self._body(request)
        return self._reply(request, await self._call(self.edit({"action": "replace", "spec": body})))

    @api.delete("/v1/steering")
    async def http_clear(self, request: Request) -> Response:
        return self._reply(request, await self._call(self.edit({"action": "clear"})))

    @api.post("/v1/steering/push", openapi_extra=_body_doc(SpecBody))
    async def http_push(self, request: Request) -> Response:
        body = await self._body(request)
        if not isinstance(body, dict):
            raise HTTPError(400, "invalid body: a steering spec map is required")
        return self._reply(request, await self._call(self.push(body)))

    @api.post("/v1/steering/pop", openapi_extra=_body_doc(PopBody))
    async def http_pop(self, request: Request) -> Response:
        """No body: end the newest push; ``{"push_id": n}`` (from the push's reply): end that one."""
        body = await self._body(request, PopBody) if await request.body() else {}
        return self._reply(request, await self._call(self.pop(body.get("push_id"))))

    @api.put("/v1/steering/layers/{layer}/{kind}", openapi_extra=_body_doc(OpBody))
    async def http_set_op(self, layer: int, kind: str, request: Request) -> Response:
        body = await self._body(request, OpBody)
        op = {k: v for k, v in body.items() if v is not None}
        return self._reply(request, await self._call(self.edit({"action": "set", "layer": layer,
                                                                "op": {**op, "kind": kind}})))

    @api.delete("/v1/steering/layers/{layer}/{kind}")
    async def http_clear_op(self, layer: int, kind: str, request: Request) -> Response:
        return self._reply(request, await self._call(self.edit({"action": "clear", "layer": layer, "kind": kind})))

    @api.delete("/v1/steering/layers/{layer}")
    async def http_clear_layer(self, layer: int, request: Request) -> Response:
        return self._reply(request, await self._call(self.edit({"action": "clear", "layer": layer})))
