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
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixfleet.engine.io_struct import EmbedReq, SingleReq, normalize_generate
from radixfleet.engine.metrics import CONTENT_TYPE, UNMETERED_RID_PREFIX, EngineMetrics
from radixfleet.engine.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
OPEN_PATHS = frozenset({"/health"})
RPC_TIMEOUT_S = 10.0
_HEALTH_GENERATE_TIMEOUT_S = 30.0
# Native /generate arguments (besides text/input_ids); anything else is a 400.
_GENERATE_ARGS = ("sampling_params", "stream", "rid", "return_logprob", "logprob_start_len",
                  "top_logprobs_num", "return_hidden_states")
# Passed on only when given, so that an engine without them answers a clear 400.
_OPTIONAL_GENERATE_ARGS = ("return_text_in_logprobs", "custom_logit_processor", "token_ids_logprob",
                           "lora_path", "session_params")
# meta_info lists with one entry per output token, concatenated over chunks for a whole answer.
LIST_META_KEYS = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")


# ---- errors ---------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
          503: "service_unavailable"}


def error_body(status: int, message: str, type_: str | None = None, param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else status}}


def error_response(status: int, message: str, **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message, **kw), status_code=status)


# ---- server state ---------------------------------------------------------------------------
@dataclass
class ServerState:
    engine: Any  # radixfleet.engine.engine.Engine
    api_key: str | None = None
    chat_template: str | None = None  # overrides the tokenizer's
    tool_call_parser: str | None = None  # None: detected from the chat template
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    metrics: EngineMetrics = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = EngineMetrics(self.tm.model_name)
        self.tm.listeners.append(self.metrics.on_output)

    @property
    def tm(self) -> Any:
        return self.engine.tokenizer_manager

    @property
    def model_name(self) -> str:
        return self.tm.model_name

    def check_alive(self) -> None:
        procs = getattr(self.engine, "_procs", None)
        if procs is not None and (not procs or any(p.poll() is not None for p in procs)):
            raise APIError(503, "an engine process has exited; restart the server")

    async def rpc(self, method: str) -> Any:
        self.check_alive()
        try:
            return await asyncio.wait_for(self.tm.rpc(method), RPC_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(503, f"the scheduler did not answer {method} within {RPC_TIMEOUT_S:.0f} s") from None


# ---- ASGI middleware: body size limit and API key --------------------------------------------
class GuardMiddleware:
    """Answers 401 without ``Authorization: Bearer <key>`` (except ``/health``) and 413 for
    bodies over the limit (by Content-Length, or counted while reading a chunked body)."""

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.state.api_key
        given = headers.get("authorization", "")
        if key and scope["path"] not in OPEN_PATHS and not hmac.compare_digest(given.encode(),
                                                                              f"Bearer {key}".encode()):
            resp = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
            return await resp(scope, receive, send)
        limit = self.state.max_request_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _too_large(limit)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the body here (the handlers read all of it anyway), then replay it.
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _too_large(limit)(scope, receive, send)
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for http.disconnect

        await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"the request body is larger than {limit} bytes", code="request_too_large")


# ---- generation helpers -----------------------------------------------------------------------
async def stream_outputs(state: ServerState, reqs: list[SingleReq]) -> AsyncIterator[tuple[int, dict]]:
    """Engine chunks ``(index, chunk)``; closing this generator aborts what is unfinished."""
    state.check_alive()
    for r in reqs:
        r.stream = True
    async with contextlib.aclosing(state.tm.stream_async(reqs)) as it:
        async for item in it:
            yield item


def merge_chunk(acc: dict, chunk: dict) -> None:
    """Fold an incremental chunk into the accumulated answer ``acc`` (same shape as a chunk)."""
    acc["text"] = acc.get("text", "") + chunk["text"]
    acc.setdefault("output_ids", []).extend(chunk["output_ids"])
    meta = dict(chunk["meta_info"])
    old = acc.get("meta_info", {})
    for key in LIST_META_KEYS:
        if key in meta:
            meta[key] = list(old.get(key) or []) + chunk_entries(chunk, key)
    acc["meta_info"] = meta


def chunk_entries(chunk: dict, key: str) -> list:
    """The ``key`` entries (one per output token) of this chunk's new tokens.

    Taking the last ``len(output_ids)`` entries is right whether the engine sends these
    lists per chunk or cumulatively.
    """
    entries = list(chunk["meta_info"].get(key) or [])
    k = len(chunk["output_ids"])
    return entries[-k:] if k else []


async def collect(state: ServerState, reqs: list[SingleReq]) -> list[dict]:
    """Run ``reqs`` to completion; the answers in index order."""
    answers: dict[int, dict] = {}
    async with contextlib.aclosing(stream_outputs(state, reqs)) as it:
        async for index, chunk in it:
            merge_chunk(answers.setdefault(index, {}), chunk)
    return [answers[i] for i in sorted(answers)]


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work`` unless the client disconnects first; then cancel it (which aborts)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise APIError(499, "the client disconnected")
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def stream_error(e: Exception) -> dict:
    """The error event of a stream that fails after it started: 400 for a refused request,
    503 for an engine failure (a ``RuntimeError``)."""
    return error_body(400, str(e)) if isinstance(e, ValueError) else error_body(503, str(e))


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def sse_response(gen: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


async def json_object(request: Request, allowed: frozenset[str] | None = None) -> dict:
    """The body as a JSON object: 400 when it is not one, or (given ``allowed``) when it
    has a field outside ``allowed``."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed) if allowed is not None else []
    if unknown:
        raise APIError(400, f"unknown parameter {unknown[0]!r}", param=unknown[0])
    return body


# ---- app ---------------------------------------------------------------------------------------
def build_app(state: ServerState) -> FastAPI:
    from radixfleet.engine.admin_serving import register_admin_routes
    from radixfleet.engine.embedding_serving import register_embedding_routes
    from radixfleet.engine.openai_serving import register_openai_routes

    # (A dead engine process fails pending requests in the TokenizerManager's receiver thread.)
    app = FastAPI(title="radixfleet engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _register_error_handlers(app)
    _register_native_routes(app, state)
    register_openai_routes(app, state)
    register_embedding_routes(app, state)
    register_admin_routes(app, state)
    app.add_middleware(GuardMiddleware, state=state)
    return app


def _register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, type_=e.type, param=e.param, code=e.code)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, e: ValueError) -> JSONResponse:
        return error_response(400, str(e) or type(e).__name__, param=getattr(e, "param", None))

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
            from radixfleet.engine.embedding_serving import embed

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
        state.metrics.set_internal_state(await state.rpc("get_internal_state"))
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/get_model_info")
    async def get_model_info() -> dict:
        engine = state.engine
        return {"model_path": engine.model_path,
                "tokenizer_path": engine.config.tokenizer_path or engine.model_path,
                "is_generation": not state.tm.is_embedding}

    @app.get("/get_server_info")
    async def get_server_info() -> dict:
        engine = state.engine
        info: dict[str, Any] = {f: getattr(engine.config, f) for f in engine.config.__dataclass_fields__}
        info.update(state.tm.server_info)
        info["model_path"] = engine.model_path
        info["served_model_name"] = state.model_name
        info["internal_states"] = [await state.rpc("get_internal_state")]
        return info

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> dict:
        try:
            await state.rpc("flush_cache")
        except RuntimeError as e:
            raise APIError(400, f"cache not flushed: {e}") from None
        return {"success": True, "message": "Cache flushed."}

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
        args = dict(await json_object(request))
        prompt, input_ids = args.pop("text", None), args.pop("input_ids", None)
        unknown = sorted(set(args) - set(_GENERATE_ARGS) - set(_OPTIONAL_GENERATE_ARGS))
        if unknown:
            raise APIError(400, f"unsupported generate argument(s): {', '.join(unknown)}", param=unknown[0])
        stream = bool(args.get("stream", False))
        optional = {k: args[k] for k in _OPTIONAL_GENERATE_ARGS if k in args}
        try:
            reqs, is_batch = normalize_generate(
                prompt, input_ids, args.get("sampling_params"), stream, args.get("rid"),
                args.get("return_logprob", False), args.get("logprob_start_len", -1),
                args.get("top_logprobs_num", 0), args.get("return_hidden_states", False), **optional)
        except TypeError as e:
            raise APIError(400, f"this engine does not support {', '.join(optional)}: {e}") from None
        with_index = is_batch or any(r.params.n > 1 for r in reqs)
        if stream:
            gen = stream_outputs(state, reqs)
            first = await _first_or_error(gen)
            return sse_response(_native_sse(gen, first, with_index))
        outs = await until_disconnect(request, collect(state, reqs))
        return JSONResponse(outs if with_index or len(outs) != 1 else outs[0])


async def _first_or_error(gen: AsyncIterator[Any]) -> Any:
    """The first item, so that a refused request is a 400 before the 200 stream starts."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await gen.aclose()
        raise


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
