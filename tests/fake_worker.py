"""A fake SGLang-compatible worker: fixed latency, says which worker served, streams SSE.

For the router's tests and benchmark, without a model. It answers the engine's
HTTP surface (``/health``, ``/generate``, ``/v1/*``, ``/get_model_info``,
``/get_server_info``, ``/flush_cache``) and has a few ``/_fake/*`` controls: make
``/health`` fail, fail the next N requests with a status (0: drop the connection right
after the headers), read its counters.

    python tests/fake_worker.py --port 30001 --name w1 --latency 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from radixfleet.http_auth import BearerKey

ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/embeddings")


@dataclass
class FakeState:
    name: str
    latency: float
    chunks: int
    chunk_interval: float
    served: int = 0
    flushes: int = 0
    healthy: bool = True
    fail_status: int = 500
    fail_remaining: int = 0


def _answer(state: FakeState, route: str, body: dict) -> dict:
    prompt = body.get("text") or body.get("prompt") or body.get("messages") or body.get("input") or ""
    meta = {"prompt_tokens": len(str(prompt)) // 4, "completion_tokens": 4, "cached_tokens": 0, "finish_reason": {"type": "length"}}
    text = f"served by {state.name}"
    if route == "/v1/chat/completions":
        return {"object": "chat.completion", "model": "fake", "worker": state.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": 4, "total_tokens": meta["prompt_tokens"] + 4}}
    if route == "/v1/completions":
        return {"object": "text_completion", "model": "fake", "worker": state.name,
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}]}
    if route == "/v1/embeddings":
        return {"object": "list", "worker": state.name, "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}]}
    return {"text": text, "worker": state.name, "output_ids": [1, 2, 3, 4], "meta_info": meta}


async def _sse(state: FakeState, route: str):
    for i in range(state.chunks):
        if i:
            await asyncio.sleep(state.chunk_interval)
        yield f"data: {json.dumps({'worker': state.name, 'index': i, 'text': f'chunk{i} '})}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def _broken_stream():
    raise ConnectionAbortedError("fake worker: stream broken before the first byte")
    yield b""  # pragma: no cover - makes this an async generator


def build_fake_worker(name: str = "fake", latency: float = 0.0, chunks: int = 4, chunk_interval: float = 0.05,
                      api_key: str = "") -> FastAPI:
    """The fake worker app; with ``api_key`` its generation routes require that bearer key."""
    state = FakeState(name, latency, chunks, chunk_interval)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fake = state
    key = BearerKey(api_key) if api_key else None

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # Like the engine: an OpenAI-shaped error that names the route (the router passes it on).
        message = f"no route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse({"error": {"message": message}}, status_code=e.status_code)

    async def handle(request: Request) -> Response:
        route = request.url.path
        if key is not None and key.refusal(request.scope) is not None:
            return JSONResponse({"error": {"message": f"{name}: bad or missing API key"}}, status_code=401)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return JSONResponse({"error": {"message": "invalid JSON body"}}, status_code=400)
        if isinstance(body, dict) and body.get("fake_status"):
            return JSONResponse({"error": {"message": f"fake status from {name}"}, "worker": name}, status_code=int(body["fake_status"]))
        if state.fail_remaining > 0:
            state.fail_remaining -= 1
            if state.fail_status == 0:  # 200 and headers, then the connection drops before any byte
                return StreamingResponse(_broken_stream(), media_type="text/event-stream")
            return JSONResponse({"error": {"message": f"injected failure on {name}"}}, status_code=state.fail_status)
        state.served += 1
        if state.latency:
            await asyncio.sleep(state.latency)
        if isinstance(body, dict) and body.get("stream"):
            return StreamingResponse(_sse(state, route), media_type="text/event-stream")
        return JSONResponse(_answer(state, route, body if isinstance(body, dict) else {}))

    for route in ROUTES:
        app.add_api_route(route, handle, methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        return PlainTextResponse("OK" if state.healthy else "unhealthy", status_code=200 if state.healthy else 503)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": name}], "worker": name})

    @app.get("/get_model_info")
    async def model_info() -> Response:
        return JSONResponse({"model_path": "fake", "is_generation": True, "worker": name})

    @app.get("/get_server_info")
    async def server_info() -> Response:
        return JSONResponse({"model_path": "fake", "worker": name})

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        state.flushes += 1
        return PlainTextResponse("Cache flushed.")

    @app.post("/_fake/health")
    async def set_health(ok: int = 1) -> Response:
        state.healthy = bool(ok)
        return PlainTextResponse("ok")

    @app.post("/_fake/fail")
    async def set_fail(status: int = 500, count: int = 1) -> Response:
        state.fail_status, state.fail_remaining = status, count
        return PlainTextResponse("ok")

    @app.get("/_fake/stats")
    async def stats() -> Response:
        return JSONResponse({"name": name, "served": state.served, "flushes": state.flushes})

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/fake_worker.py", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    p.add_argument("--chunks", type=int, default=4, help="SSE chunks per streamed answer")
    p.add_argument("--chunk-interval", type=float, default=0.05, help="seconds between SSE chunks")
    p.add_argument("--api-key", default="", help="require this bearer key on the generation routes")
    p.add_argument("--model-path", default="fake", help="ignored (accepted like the engine's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    app = build_fake_worker(args.name or f"worker-{args.port}", args.latency, args.chunks, args.chunk_interval, args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
