"""What every route module of the engine server shares: the OpenAI-shaped error type,
the per-server state, JSON body checks, running requests to completion or as a stream, and
server-sent events. Route modules import from here, never from each other or from
``http_server`` (which only assembles the app)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from radixfleet.engine.managers.io_struct import ControlReq, SingleReq
from radixfleet.engine.server.metrics import EngineMetrics
from radixfleet.http_limits import DEFAULT_MAX_REQUEST_BYTES

RPC_TIMEOUT_S = 10.0
ENGINE_EXITED = "an engine process has exited; restart the server"
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


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
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

    def engine_alive(self) -> bool:
        procs = getattr(self.engine, "_procs", None)
        return procs is None or (bool(procs) and all(p.poll() is None for p in procs))

    def check_alive(self) -> None:
        if not self.engine_alive():
            raise APIError(503, ENGINE_EXITED)

    async def rpc(self, req: ControlReq) -> Any:
        """The result of a control call; 503 when the scheduler does not answer in time."""
        self.check_alive()
        try:
            return await asyncio.wait_for(self.tm.rpc(req), RPC_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(503, f"the scheduler did not answer {req.call_name} within "
                                f"{RPC_TIMEOUT_S:.0f} s") from None


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


async def first_or_error(gen: AsyncIterator[Any]) -> Any:
    """The first item, so that a refused request is a 400 before the 200 stream starts."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await gen.aclose()
        raise


