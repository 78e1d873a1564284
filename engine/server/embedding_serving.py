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
from radixfleet.engine.models import embedding_options
from radixfleet.engine.server.common import APIError, ServerState, json_object, until_disconnect
from radixfleet.engine.server.openai_protocol import IGNORED_FIELDS

# `prompt_name` (one of the model's instruction prefixes) is ours, not OpenAI's.
_OPENAI_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "prompt_name"})


async def embed(state: ServerState, reqs: list[EmbedReq], dims: int | None = None) -> list[dict]:
    """Run ``reqs``; the answers (``{"embedding", "meta_info"}``) in input order, each vector
    cut to ``dims`` (and renormalised) when that is set."""
    state.check_alive()
    answers: dict[int, dict] = {}
    async with contextlib.aclosing(state.tm.stream_async(reqs)) as it:
        async for index, out in it:
            answers[index] = out
    normalize = bool(state.tm.server_info.get("normalize"))
    return [{**answers[i], "embedding": embedding_options.truncate(answers[i]["embedding"], dims, normalize)}
            for i in sorted(answers)]


def _check_dimensions(state: ServerState, dimensions: Any) -> int | None:
    try:
        return embedding_options.check_dimensions(state.tm.server_info, dimensions)
    except ValueError as e:
        raise APIError(400, str(e), param="dimensions") from None


def _with_prompt(state: ServerState, texts: Any, prompt_name: Any) -> Any:
    """``texts`` (a string, a list of strings, or None) with the model's instruction prefix."""
    if prompt_name is not None and not isinstance(prompt_name, str):
        raise APIError(400, "'prompt_name' must be a string", param="prompt_name")
    try:
        if isinstance(texts, str):
            return embedding_options.apply_prompt(state.tm.server_info, [texts], prompt_name)[0]
        if texts is None or (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            return embedding_options.apply_prompt(state.tm.server_info, texts, prompt_name)
    except ValueError as e:
        raise APIError(400, str(e), param="prompt_name") from None
    return texts  # malformed: normalize_encode says why


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
        unknown = sorted(set(body) - {"text", "input_ids", "rid", "dimensions", "prompt_name"})
        if unknown:
            raise APIError(400, f"unsupported encode argument(s): {', '.join(unknown)}", param=unknown[0])
        dims = _check_dimensions(state, body.get("dimensions"))
        text = _with_prompt(state, body.get("text"), body.get("prompt_name"))
        reqs, is_batch = normalize_encode(text, body.get("input_ids"), body.get("rid"))
        outs = await until_disconnect(request, embed(state, reqs, dims))
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
        dims = _check_dimensions(state, body.get("dimensions"))
        texts, ids = _openai_inputs(body["input"])
        reqs, _ = normalize_encode(_with_prompt(state, texts, body.get("prompt_name")), ids)
        outs = await until_disconnect(request, embed(state, reqs, dims))
        data = [{"object": "embedding", "index": i, "embedding": _encoded(o["embedding"], fmt)}
                for i, o in enumerate(outs)]
        tokens = sum(o["meta_info"]["prompt_tokens"] for o in outs)
        return JSONResponse({"object": "list", "data": data, "model": state.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encoded(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
