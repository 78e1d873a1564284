"""Control routes of the engine's HTTP server: weight updates, LoRA adapters, sessions.

Each changes or reads the engine's state rather than generating; the ones that go through
the scheduler answer ``{"success", "message"}``, 200 on success and 400 with the reason
otherwise. Malformed bodies are 400 error objects, as on every other route; a folder
outside the allowed ones (``engine/managers/local_paths.py``) is a 403.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from radixfleet.engine.managers.io_struct import (
    ControlReq,
    GetWeightsByNameReq,
    LoadLoRAAdapterReq,
    UnloadLoRAAdapterReq,
    UpdateWeightsFromDiskReq,
)
from radixfleet.engine.server.common import RPC_TIMEOUT_S, APIError, ServerState, json_object

_CALL_TIMEOUT_S = 600.0  # a weight update waits for the running requests to finish


async def _outcome(state: ServerState, req: ControlReq) -> tuple[JSONResponse, bool]:
    """Run a scheduler call answering (success, message); its response and success."""
    state.check_alive()
    ok, message = await asyncio.wait_for(state.tm.rpc(req), _CALL_TIMEOUT_S)
    return JSONResponse({"success": ok, "message": message}, status_code=200 if ok else 400), ok


def register_admin_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> JSONResponse:
        body = await json_object(request)
        if not isinstance(body.get("model_path"), str):
            raise APIError(400, "pass {\"model_path\": \"<folder>\"}", param="model_path")
        path = state.tm.weights_update_path(state.engine.local_paths.check(body["model_path"], "model_path"),
                                            body.get("load_format"))
        state.check_alive()
        response, ok = await _outcome(state, UpdateWeightsFromDiskReq(path))
        if ok:
            state.engine.model_path = path
        return response

    @app.post("/open_session")
    async def open_session(request: Request) -> JSONResponse:
        body = await json_object(request, frozenset({"capacity_of_str_len", "session_id", "streaming", "timeout"}))
        return JSONResponse(state.tm.sessions.open(body.get("capacity_of_str_len"), body.get("session_id"),
                                                   bool(body.get("streaming", False)), body.get("timeout")))

    @app.post("/close_session")
    async def close_session(request: Request) -> Response:
        body = await json_object(request, frozenset({"session_id"}))
        state.tm.sessions.close(body.get("session_id"))
        return Response(status_code=200)

    @app.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> JSONResponse:
        body = await json_object(request)
        if not all(isinstance(body.get(k), str) for k in ("lora_name", "lora_path")):
            raise APIError(400, "pass {\"lora_name\": ..., \"lora_path\": \"<peft folder>\"}")
        path = state.engine.local_paths.check(body["lora_path"], "lora_path")
        return (await _outcome(state, LoadLoRAAdapterReq(body["lora_name"], path)))[0]

    @app.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> JSONResponse:
        body = await json_object(request)
        if not isinstance(body.get("lora_name"), str):
            raise APIError(400, "pass {\"lora_name\": ...}", param="lora_name")
        return (await _outcome(state, UnloadLoRAAdapterReq(body["lora_name"])))[0]

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(request: Request) -> JSONResponse:
        body = await json_object(request)
        if not isinstance(body.get("name"), str):
            raise APIError(400, "pass {\"name\": \"<parameter>\"}", param="name")
        truncate = body.get("truncate_size", 100)
        if not isinstance(truncate, int) or truncate < 1:
            raise APIError(400, "truncate_size must be a positive integer", param="truncate_size")
        state.check_alive()
        try:
            values = await asyncio.wait_for(state.tm.rpc(GetWeightsByNameReq(body["name"], truncate)),
                                            RPC_TIMEOUT_S)
        except RuntimeError as e:
            raise APIError(400, str(e), param="name") from None
        return JSONResponse(values)
