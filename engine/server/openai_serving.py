"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Each request becomes a ``GenerateReqInput`` (``openai_protocol`` maps the fields);
answers are assembled from the engine's incremental chunks. With tools, a choice's text is
held back while it may be a tool call and parsed when the choice ends.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from radixfleet.engine.managers.io_struct import GENERATE_REFUSED, GenerateReqInput, SingleReq
from radixfleet.engine.managers.scoring import SCORE_SAMPLING, score_prompts, score_result
from radixfleet.engine.server.chat_template import render_chat
from radixfleet.engine.server.common import (
    LIST_META_KEYS,
    SSE_DONE,
    APIError,
    ServerState,
    chunk_entries,
    collect,
    first_or_error,
    json_body,
    json_object,
    sse,
    sse_response,
    stream_error,
    stream_outputs,
    until_disconnect,
)
from radixfleet.engine.server.openai_protocol import (
    IGNORED_FIELDS,
    ChatRequest,
    CompletionRequest,
    InvalidParam,
    chat_logprobs,
    completion_logprobs,
    forced_tool_schema,
    parse_request,
    sampling_params,
)
from radixfleet.engine.server.tool_parser import (
    ToolCall,
    ToolParser,
    detect_tool_parser,
    get_tool_parser,
)

_SCORE_FIELDS = frozenset({"query", "items", "label_token_ids", "apply_softmax", "item_first", "model"})


def register_openai_routes(app: FastAPI, state: ServerState) -> None:
    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "radixfleet", "root": state.engine.model_path,
                "max_model_len": state.tm.context_length}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != state.model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves "
                                f"{state.model_name!r}", param="model", code="model_not_found")
        return model_card()

    def refuse_on_embedding_model() -> None:
        if state.tm.is_embedding:
            raise APIError(400, GENERATE_REFUSED)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        refuse_on_embedding_model()
        req = parse_request(CompletionRequest, await json_body(request))
        return await _serve(request, state, _CompletionJob.build(state, req))

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        """SGLang's scoring route: ``{"query", "items", "label_token_ids", "apply_softmax",
        "item_first"}`` → ``{"scores": [[p, ...], ...], "usage", ...}``."""
        refuse_on_embedding_model()
        body = await json_object(request, _SCORE_FIELDS | IGNORED_FIELDS)
        label_ids = body.get("label_token_ids")
        texts, ids = score_prompts(body.get("query"), body.get("items"), label_ids,
                                   bool(body.get("item_first", False)))
        reqs, _ = GenerateReqInput(text=texts, input_ids=ids,
                                   sampling_params=[dict(SCORE_SAMPLING) for _ in texts or ids],
                                   return_logprob=True, token_ids_logprob=label_ids).normalize()
        outs = await until_disconnect(request, collect(state, reqs))
        result = score_result(outs, label_ids, bool(body.get("apply_softmax", False)))
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": 0,
                 "total_tokens": result.prompt_tokens}
        return JSONResponse({"object": "scoring", "model": state.model_name, "scores": result.scores,
                             "usage": usage})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        refuse_on_embedding_model()
        req = parse_request(ChatRequest, await json_body(request))
        return await _serve(request, state, _ChatJob.build(state, req))


async def _serve(request: Request, state: ServerState, job: _Job) -> Response:
    if job.stream:
        gen = stream_outputs(state, job.reqs)
        first = await first_or_error(gen)
        return sse_response(_stream(job, gen, first))
    outs = await until_disconnect(request, collect(state, job.reqs))
    return JSONResponse(job.response(outs))


async def _stream(job: _Job, gen: AsyncIterator[tuple[int, dict]], first: Any) -> AsyncIterator[bytes]:
    finals: dict[int, dict] = {}
    async with contextlib.aclosing(gen):
        try:
            for index in range(job.num_choices):
                for obj in job.start_chunks(index):
                    yield sse(obj)
            item = first
            while item is not None:
                index, chunk = item
                if chunk["meta_info"].get("finish_reason") is not None:
                    finals[index] = chunk
                for obj in job.stream_chunks(index, chunk):
                    yield sse(obj)
                item = await anext(gen, None)
            if job.include_usage:
                yield sse({**job.envelope(), "choices": [], "usage": job.usage([finals[i] for i in sorted(finals)])})
        except (ValueError, RuntimeError) as e:
            yield sse(stream_error(e))
    yield SSE_DONE


def _finish_reason(meta: dict) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else str(reason.get("type"))


def _matched_stop(meta: dict) -> Any:
    reason = meta.get("finish_reason") or {}
    return reason.get("matched")


@dataclass
class _Job:
    state: ServerState
    reqs: list[SingleReq]
    model: str
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs asked for
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def num_choices(self) -> int:
        return len(self.reqs) * self.n

    def usage(self, outs: list[dict]) -> dict:
        # A prompt sampled n times is counted once, as OpenAI does.
        prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs[::self.n])
        completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
        if self.n == 1:
            usage["prompt_tokens_details"] = {
                "cached_tokens": sum(o["meta_info"].get("cached_tokens", 0) for o in outs)}
        return usage

    def envelope(self) -> dict:
        raise NotImplementedError

    def start_chunks(self, index: int) -> list[dict]:
        return []

    def stream_chunks(self, index: int, chunk: dict) -> list[dict]:
        raise NotImplementedError

    def response(self, outs: list[dict]) -> dict:
        raise NotImplementedError


def _token_budget(state: ServerState, prompt_len: int, asked: int | None) -> int:
    room = max(state.tm.context_length - prompt_len, 1)
    return room if asked is None else min(asked, room)


# ---- /v1/completions --------------------------------------------------------------------------
@dataclass
class _CompletionJob(_Job):
    echo_texts: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, state: ServerState, req: CompletionRequest) -> _CompletionJob:
        if req.suffix:
            raise InvalidParam("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidParam("best_of must equal n (no server-side ranking)", "best_of")
        if req.echo and req.logprobs is not None:
            raise InvalidParam("echo with logprobs is not supported", "echo")
        prompt = req.prompt
        texts: list[str] | None = None
        ids: list[list[int]] | None = None
        if isinstance(prompt, str):
            texts = [prompt]
        elif prompt and all(isinstance(p, str) for p in prompt):
            texts = list(prompt)
        elif prompt and all(isinstance(p, int) for p in prompt):
            ids = [list(prompt)]
        elif prompt and all(isinstance(p, list) for p in prompt):
            ids = [list(p) for p in prompt]
        else:
            raise InvalidParam("prompt must be a string, a list of strings, token ids or lists of token ids",
                               "prompt")
        vocab = state.tm.vocab_size
        if any(not 0 <= t < vocab for x in ids or () for t in x):
            # Regression (issue #20 fuzz): echo decoded huge ids first, a 500 (OverflowError).
            raise InvalidParam(f"prompt token ids must be in [0, {vocab})", "prompt")
        tok = state.tm.tokenizer
        params = sampling_params(req, req.max_tokens)
        reqs, _ = GenerateReqInput(text=texts, input_ids=ids, sampling_params=params, stream=req.stream,
                                   return_logprob=req.logprobs is not None, top_logprobs_num=req.logprobs or 0,
                                   lora_path=req.lora_path).normalize()
        echo: list[str] = []
        if req.echo:
            echo = texts if texts is not None else [tok.decode(x) if tok else "" for x in ids or []]
        return cls(state, reqs, req.model or state.model_name, req.n, req.stream,
                   bool(req.stream_options and req.stream_options.include_usage), req.logprobs,
                   echo_texts=echo)

    def envelope(self) -> dict:
        return {"id": f"cmpl-{self.id}", "object": "text_completion", "created": self.created,
                "model": self.model}

    def _logprobs(self, meta: dict) -> dict | None:
        if self.top_logprobs is None:
            return None
        return completion_logprobs(self.state.tm.tokenizer, meta, self.top_logprobs)

    def start_chunks(self, index: int) -> list[dict]:
        if not self.echo_texts:
            return []
        return [{**self.envelope(), "choices": [{"index": index, "text": self.echo_texts[index // self.n],
                                                 "logprobs": None, "finish_reason": None}]}]

    def stream_chunks(self, index: int, chunk: dict) -> list[dict]:
        meta = chunk["meta_info"]
        lp = None
        if self.top_logprobs is not None:
            lp = self._logprobs({k: chunk_entries(chunk, k) for k in LIST_META_KEYS})
        reason = _finish_reason(meta)
        if not chunk["text"] and reason is None and lp is None:
            return []
        return [{**self.envelope(), "choices": [{"index": index, "text": chunk["text"], "logprobs": lp,
                                                 "finish_reason": reason,
                                                 "matched_stop": _matched_stop(meta) if reason else None}]}]

    def response(self, outs: list[dict]) -> dict:
        choices = []
        for i, out in enumerate(outs):
            meta = out["meta_info"]
            text = (self.echo_texts[i // self.n] if self.echo_texts else "") + out["text"]
            choices.append({"index": i, "text": text, "logprobs": self._logprobs(meta),
                            "finish_reason": _finish_reason(meta), "matched_stop": _matched_stop(meta)})
        return {**self.envelope(), "choices": choices, "usage": self.usage(outs)}


# ---- /v1/chat/completions ----------------------------------------------------------------------
@dataclass
class _Choice:
    """Streaming state of one chat choice while tool calls may be held back."""

    held: str = ""
    held_logprobs: dict = field(default_factory=lambda: {k: [] for k in LIST_META_KEYS})


@dataclass
class _ChatJob(_Job):
    tool_names: set[str] | None = None  # None: tools off
    forced_name: str | None = None  # tool_choice named this function
    required: bool = False  # tool_choice "required"
    parser: ToolParser | None = None
    choices: dict[int, _Choice] = field(default_factory=dict)

    @classmethod
    def build(cls, state: ServerState, req: ChatRequest) -> _ChatJob:
        tok = state.tm.tokenizer
        if tok is None:
            raise APIError(400, "chat needs a tokenizer; this server was started with skip_tokenizer_init")
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidParam("top_logprobs needs logprobs: true", "top_logprobs")
        tools_on = bool(req.tools) and req.tool_choice != "none"
        forced_schema, forced_name = forced_tool_schema(req.tools, req.tool_choice)
        template = state.chat_template
        prompt = render_chat(tok, req.messages, template,
                             tools=[t.model_dump(by_alias=True, exclude_none=True) for t in req.tools]
                             if tools_on and req.tools else None,
                             continue_final_message=req.continue_final_message,
                             **(req.chat_template_kwargs or {}))
        ids = tok(prompt, add_special_tokens=False).input_ids
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params(req, _token_budget(state, len(ids), asked), forced_schema)
        reqs, _ = GenerateReqInput(input_ids=ids, sampling_params=params, stream=req.stream, rid=req.rid,
                                   return_logprob=req.logprobs, top_logprobs_num=req.top_logprobs or 0,
                                   lora_path=req.lora_path).normalize()
        parser = None
        if tools_on:
            name = state.tool_call_parser or detect_tool_parser(template or getattr(tok, "chat_template", None))
            parser = get_tool_parser(name)
        return cls(state, reqs, req.model or state.model_name, req.n, req.stream,
                   bool(req.stream_options and req.stream_options.include_usage),
                   (req.top_logprobs or 0) if req.logprobs else None,
                   tool_names={t.function.name for t in req.tools} if tools_on and req.tools else None,
                   forced_name=forced_name, required=req.tool_choice == "required", parser=parser)

    def envelope(self) -> dict:
        return {"id": f"chatcmpl-{self.id}", "object": "chat.completion.chunk" if self.stream
                else "chat.completion", "created": self.created, "model": self.model}

    def _logprobs(self, meta: dict) -> dict | None:
        if self.top_logprobs is None:
            return None
        return chat_logprobs(self.state.tm.tokenizer, meta, self.top_logprobs)

    def _tool_calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished choice's text."""
        if self.tool_names is None:
            return text, []
        if self.forced_name is not None:
            try:
                args = json.loads(text)
            except json.JSONDecodeError:
                return text, []  # cut short (length): hand back what there is
            return None, [ToolCall(self.forced_name, json.dumps(args, ensure_ascii=False))]
        if self.required:
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return text, []
            calls = [ToolCall(it["name"], json.dumps(it.get("parameters", {}), ensure_ascii=False))
                     for it in items if isinstance(it, dict) and it.get("name") in self.tool_names]
            return (None, calls) if calls else (text, [])
        assert self.parser is not None, "tools on means a parser was chosen"
        content, calls = self.parser.parse(text, self.tool_names)
        return (content or None) if calls else content, calls

    def _reason(self, meta: dict, calls: list[ToolCall]) -> str | None:
        reason = _finish_reason(meta)
        return "tool_calls" if calls and reason == "stop" else reason

    def response(self, outs: list[dict]) -> dict:
        choices = []
        for i, out in enumerate(outs):
            meta = out["meta_info"]
            content, calls = self._tool_calls(out["text"])
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [c.to_openai() for c in calls]
            choices.append({"index": i, "message": message, "logprobs": self._logprobs(meta),
                            "finish_reason": self._reason(meta, calls), "matched_stop": _matched_stop(meta)})
        return {**self.envelope(), "choices": choices, "usage": self.usage(outs)}

    # ---- streaming ----
    def _chunk(self, index: int, delta: dict, reason: str | None = None, logprobs: dict | None = None,
               matched: Any = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        if reason is not None:
            choice["matched_stop"] = matched
        return {**self.envelope(), "choices": [choice]}

    def start_chunks(self, index: int) -> list[dict]:
        self.choices[index] = _Choice()
        return [self._chunk(index, {"role": "assistant", "content": ""})]

    def stream_chunks(self, index: int, chunk: dict) -> list[dict]:
        st = self.choices[index]
        meta = chunk["meta_info"]
        st.held += chunk["text"]
        for k in LIST_META_KEYS:
            st.held_logprobs[k] += chunk_entries(chunk, k)
        reason = _finish_reason(meta)
        out: list[dict] = []
        if reason is None:
            if self.tool_names is not None and (self.forced_name or self.required or
                                                self.parser.may_contain_call(st.held)):
                return out  # may be a tool call: hold until the choice ends
            if st.held or self.top_logprobs is not None:
                out.append(self._chunk(index, {"content": st.held}, logprobs=self._release_logprobs(st)))
                st.held = ""
            return out
        content, calls = self._tool_calls(st.held)
        st.held = ""
        lp = self._release_logprobs(st)
        if content:
            out.append(self._chunk(index, {"content": content}, logprobs=lp))
            lp = None
        if calls:
            out.append(self._chunk(index, {"tool_calls": [c.to_openai(k) for k, c in enumerate(calls)]},
                                   logprobs=lp))
            lp = None
        out.append(self._chunk(index, {}, self._reason(meta, calls), lp, _matched_stop(meta)))
        return out

    def _release_logprobs(self, st: _Choice) -> dict | None:
        lp = self._logprobs(st.held_logprobs)
        st.held_logprobs = {k: [] for k in LIST_META_KEYS}
        return lp
