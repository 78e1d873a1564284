"""The engine's HTTP server: SGLang's native routes, the OpenAI routes and ``/metrics``.

FastAPI in the main process, in front of the ``TokenizerManager`` of an ``Engine``. Every
request is streamed from the engine (even when the client asked for one JSON answer): the
per-token timing feeds the TTFT/ITL metrics, and a client that goes away is noticed
between tokens. Leaving early closes ``stream_async``, which aborts the request in the
scheduler and frees its KV slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixfleet.engine.managers.io_struct import (
    EmbedReq,
    FlushCacheReq,
    GenerateReqInput,
    GetInternalStateReq,
    KVEventsSnapshotReq,
    SingleReq,
)
from radixfleet.engine.managers.local_paths import PathNotAllowed
from radixfleet.engine.sampling.params import MAX_N, SamplingParams
from radixfleet.engine.server.admin_serving import register_admin_routes
from radixfleet.engine.server.common import (
    SSE_DONE,
    APIError,
    ServerState,
    collect,
    error_response,
    first_or_error,
    json_object,
    sse,
    sse_response,
    stream_error,
    stream_outputs,
    until_disconnect,
)
from radixfleet.engine.server.drain import Drain, DrainMiddleware
from radixfleet.engine.server.embedding_serving import embed, register_embedding_routes
from radixfleet.engine.server.metrics import CONTENT_TYPE, UNMETERED_RID_PREFIX
from radixfleet.engine.server.openai_serving import register_openai_routes
from radixfleet.engine.server.tokenizer_files import tokenizer_files
from radixfleet.http_auth import BearerKey
from radixfleet.http_limits import BodyLimit, too_large_message

logger = logging.getLogger(__name__)

_HEALTH_GENERATE_TIMEOUT_S = 30.0


# ---- ASGI middleware: body size limit and API key --------------------------------------------
class GuardMiddleware:
    """Answers 401 without ``Authorization: Bearer <key>`` (except ``/health``;
    ``radixfleet.http_auth``) and 413 for bodies over the limit (``radixfleet.http_limits``)."""

    def __init__(self, app: Any, state: ServerState):
        self.key = BearerKey(state.api_key) if state.api_key else None
        self.limited = BodyLimit(app, state.max_request_bytes, _too_large)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        refusal = self.key.refusal(scope) if self.key is not None else None
        if refusal is not None:
            resp = error_response(401, refusal, code="invalid_api_key")
            return await resp(scope, receive, send)
        await self.limited(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, too_large_message(limit), code="request_too_large")


# ---- app ---------------------------------------------------------------------------------------
def build_app(state: ServerState, drain: Drain | None = None) -> FastAPI:
    """The app; with ``drain``, requests are counted and SIGTERM drains them (``drain.py``)."""
    # (A dead engine process fails pending requests in the TokenizerManager's receiver thread.)
    app = FastAPI(title="radixfleet engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _register_error_handlers(app)
    _register_native_routes(app, state)
    register_openai_routes(app, state)
    register_embedding_routes(app, state)
    register_admin_routes(app, state)
    app.add_middleware(GuardMiddleware, state=state)
    if drain is not None:  # outermost: probes and refusals need no API key
        app.add_middleware(DrainMiddleware, drain=drain, alive=state.engine_alive)
    return app


def _register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, type_=e.type, param=e.param, code=e.code)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, e: ValueError) -> JSONResponse:
        return error_response(400, str(e) or type(e).__name__, param=getattr(e, "param", None))

    @app.exception_handler(PathNotAllowed)
    async def _path_not_allowed(_: Request, e: PathNotAllowed) -> JSONResponse:
        return error_response(403, str(e), code="path_not_allowed")

    @app.exception_handler(RuntimeError)
    async def _engine_error(_: Request, e: RuntimeError) -> JSONResponse:
        # The engine failed the request (a process died, the request was aborted...).
        return error_response(503, str(e) or type(e).__name__)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif e.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        return error_response(e.status_code, msg)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}")


def _register_native_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        state.check_alive()
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        """One token generated (or, on an embedding model, one input embedded) end to end."""
        tm = state.tm
        token = tm.tokenizer.bos_token_id if tm.tokenizer is not None else None
        rid = f"{UNMETERED_RID_PREFIX}{uuid.uuid4().hex}"
        if tm.is_embedding:
            work = embed(state, [EmbedReq(rid, None, [token or 0])])
        else:
            work = collect(state, [SingleReq(rid, None, [token or 0], SamplingParams.from_dict(
                {"max_new_tokens": 1, "temperature": 0}), True)])
        try:
            await asyncio.wait_for(work, _HEALTH_GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(503, f"no token generated within {_HEALTH_GENERATE_TIMEOUT_S:.0f} s") from None
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        # Scheduler-side gauges are read now, over the engine's IPC.
        state.metrics.set_internal_state(await state.rpc(GetInternalStateReq()))
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/get_model_info")
    async def get_model_info() -> dict:
        engine = state.engine
        return {"model_path": engine.model_path,
                "tokenizer_path": engine.config.tokenizer_path or engine.model_path,
                "is_generation": not state.tm.is_embedding}

    tokenizer_answer: dict[str, Any] = {}

    @app.get("/tokenizer_files")
    async def get_tokenizer_files() -> dict:
        """The tokenizer as files, for routers that tokenize as this engine does."""
        if not tokenizer_answer:
            try:
                tokenizer_answer.update(await asyncio.to_thread(tokenizer_files, state.tm.tokenizer, state.chat_template))
            except ValueError as e:
                raise APIError(400, str(e)) from None
        return tokenizer_answer

    @app.get("/get_server_info")
    async def get_server_info() -> dict:
        engine = state.engine
        info: dict[str, Any] = {f: getattr(engine.config, f) for f in engine.config.__dataclass_fields__}
        info.update(state.tm.server_info)
        info["model_path"] = engine.model_path
        info["served_model_name"] = state.model_name
        info["internal_states"] = [await state.rpc(GetInternalStateReq())]
        return info

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> dict:
        try:
            await state.rpc(FlushCacheReq())
        except RuntimeError as e:
            raise APIError(400, f"cache not flushed: {e}") from None
        return {"success": True, "message": "Cache flushed."}

    @app.get("/kv_events/snapshot")
    async def kv_events_snapshot() -> dict:
        """Every resident KV-event block and the current seq (``radixfleet/kv_events.py``)."""
        try:
            return await state.rpc(KVEventsSnapshotReq())
        except RuntimeError as e:
            raise APIError(400, f"no KV-event snapshot: {e}") from None

    @app.post("/abort_request")
    async def abort_request(request: Request) -> dict:
        body = await json_object(request)
        rid = body.get("rid", "")
        if body.get("abort_all"):
            rid = ""
        elif not isinstance(rid, str) or not rid:
            raise APIError(400, "pass a non-empty 'rid' or 'abort_all': true", param="rid")
        state.tm.abort(rid)
        return {"success": True}

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        """The body is a ``GenerateReqInput``: a field outside it is a 400."""
        req = GenerateReqInput.from_kwargs(await json_object(request))
        try:
            reqs, is_batch = req.normalize()
        except TypeError as e:  # a field of the wrong type
            raise APIError(400, str(e)) from None
        if any(r.params.n > MAX_N for r in reqs):
            raise APIError(400, f"n must be in [1, {MAX_N}]", param="n")
        with_index = is_batch or any(r.params.n > 1 for r in reqs)
        if req.stream:
            gen = stream_outputs(state, reqs)
            first = await first_or_error(gen)
            return sse_response(_native_sse(gen, first, with_index))
        outs = await until_disconnect(request, collect(state, reqs))
        return JSONResponse(outs if with_index or len(outs) != 1 else outs[0])


async def _native_sse(gen: AsyncIterator[tuple[int, dict]], first: Any, with_index: bool
                      ) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(gen):
        try:
            item = first
            while item is not None:
                index, chunk = item
                yield sse({**chunk, "index": index} if with_index else chunk)
                item = await anext(gen, None)
        except (ValueError, RuntimeError) as e:
            yield sse(stream_error(e))
    yield SSE_DONE
