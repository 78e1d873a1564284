"""Embedding routes: SGLang's native ``/encode`` and OpenAI's ``/v1/embeddings``.

Both answer 400 with a reason on a generation model, and on bad input. OpenAI's
``encoding_format="base64"`` (what the official client asks for by default) is the
little-endian float32 bytes of each vector, base64-encoded.
"""

from __future__ import annotations

import base64
import contextlib
import struct
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from radixfleet.engine.managers.io_struct import EmbedReq, normalize_encode
from radixfleet.engine.server.common import APIError, ServerState, json_object, until_disconnect
from radixfleet.engine.server.openai_protocol import IGNORED_FIELDS

_OPENAI_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions"})


async def embed(state: ServerState, reqs: list[EmbedReq]) -> list[dict]:
    """Run ``reqs``; the answers (``{"embedding", "meta_info"}``) in input order."""
    state.check_alive()
    answers: dict[int, dict] = {}
    async with contextlib.aclosing(state.tm.stream_async(reqs)) as it:
        async for index, out in it:
            answers[index] = out
    return [answers[i] for i in sorted(answers)]


def _check_dimensions(state: ServerState, dimensions: Any) -> None:
    dim = state.tm.server_info.get("embedding_dim")
    if dimensions is not None and dimensions != dim:
        raise APIError(400, f"dimensions={dimensions!r}: this model has no reduced-dimension embeddings "
                            f"(it gives {dim})", param="dimensions")


def _openai_inputs(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """OpenAI's ``input``: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value], None
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value), None
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return None, [value]
        if all(isinstance(v, list) for v in value):
            return None, value
    raise APIError(400, "'input' must be a non-empty string, list of strings, list of token ids "
                        "or list of token-id lists", param="input")


def register_embedding_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/encode")
    async def encode(request: Request) -> JSONResponse:
        body = await json_object(request)
        unknown = sorted(set(body) - {"text", "input_ids", "rid", "dimensions"})
        if unknown:
            raise APIError(400, f"unsupported encode argument(s): {', '.join(unknown)}", param=unknown[0])
        _check_dimensions(state, body.get("dimensions"))
        reqs, is_batch = normalize_encode(body.get("text"), body.get("input_ids"), body.get("rid"))
        outs = await until_disconnect(request, embed(state, reqs))
        return JSONResponse(outs if is_batch else outs[0])

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = await json_object(request, _OPENAI_FIELDS | IGNORED_FIELDS)
        if "input" not in body:
            raise APIError(400, "'input' is required", param="input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}",
                           param="encoding_format")
        _check_dimensions(state, body.get("dimensions"))
        texts, ids = _openai_inputs(body["input"])
        reqs, _ = normalize_encode(texts, ids)
        outs = await until_disconnect(request, embed(state, reqs))
        data = [{"object": "embedding", "index": i, "embedding": _encoded(o["embedding"], fmt)}
                for i, o in enumerate(outs)]
        tokens = sum(o["meta_info"]["prompt_tokens"] for o in outs)
        return JSONResponse({"object": "list", "data": data, "model": state.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encoded(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
