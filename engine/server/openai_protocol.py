"""OpenAI request models and their mapping onto SGLang-named sampling parameters.

Requests are validated by pydantic; unknown fields are an error (a 400 naming the field),
except a few OpenAI fields that carry no meaning for a single engine (``user``, ``store``...).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from radixfleet.engine.sampling.params import MAX_N

# Accepted for compatibility; they do not change generation.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                            "reasoning_effort", "modalities", "prediction"})
# SGLang request fields that sglang-router 0.3.2 always sends, accepted at SGLang's defaults
# (no reasoning parser, no hidden states here): any other value is still a 400.
DEFAULTED_FIELDS = {"separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints; the last group are SGLang's extensions."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | None = None
    rid: str | None = None
    lora_path: str | None = None  # a loaded LoRA adapter's name

    def check_extra(self) -> None:
        extra = self.model_extra or {}
        unknown = sorted(k for k in set(extra) - IGNORED_FIELDS
                         if k not in DEFAULTED_FIELDS or extra[k] != DEFAULTED_FIELDS[k])
        if unknown:
            raise InvalidParam(f"unknown parameter(s): {', '.join(unknown)}", unknown[0])


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False


class InvalidParam(ValueError):
    """A 400 whose OpenAI error object names the offending parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def parse_request(model: type[_SamplingFields], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InvalidParam("the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise InvalidParam(f"unknown parameter {loc!r}", loc) from None
        raise InvalidParam(f"invalid {loc!r}: {err['msg']}", loc or None) from None
    req.check_extra()
    return req


# ---- mapping to sampling params -----------------------------------------------------------
_DIRECT = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k",
           "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos", "skip_special_tokens",
           "no_stop_trim", "regex", "ebnf", "json_schema", "logit_bias", "n")


def sampling_params(req: _SamplingFields, max_new_tokens: int | None,
                    forced_schema: dict | None = None) -> dict[str, Any]:
    """SGLang ``sampling_params`` for an OpenAI request; only the fields the user set."""
    params: dict[str, Any] = {k: getattr(req, k) for k in _DIRECT if getattr(req, k) is not None}
    params["max_new_tokens"] = max_new_tokens
    if req.min_tokens is not None:
        params["min_new_tokens"] = req.min_tokens
    grammar = _response_format_schema(req.response_format)
    if forced_schema is not None:
        if grammar is not None:
            raise InvalidParam("response_format cannot be combined with a forced tool_choice", "response_format")
        grammar = forced_schema
    if grammar is not None:
        if any(k in params for k in ("json_schema", "regex", "ebnf")):
            raise InvalidParam("response_format cannot be combined with json_schema, regex or ebnf",
                               "response_format")
        params["json_schema"] = json.dumps(grammar)
    return params


def _response_format_schema(fmt: ResponseFormat | None) -> dict | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidParam("response_format json_schema needs json_schema.schema",
                           "response_format.json_schema")
    return fmt.json_schema.schema_


def forced_tool_schema(tools: list[Tool] | None, tool_choice: Any) -> tuple[dict | None, str | None]:
    """(JSON schema the output must follow, the named function or None).

    ``tool_choice`` a named function: the output is that function's arguments object.
    ``"required"``: the output is ``[{"name": ..., "parameters": {...}}, ...]`` (at least one).
    ``"auto"``/``None``: no constraint; the tool parser reads calls from free text.
    """
    if tool_choice in (None, "auto", "none"):
        return None, None
    if not tools:
        raise InvalidParam("tool_choice needs tools", "tool_choice")
    if tool_choice == "required":
        alternatives = [{"type": "object",
                         "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                        "parameters": t.function.parameters or {"type": "object"}},
                         "required": ["name", "parameters"]} for t in tools]
        return {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}, None
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidParam("tool_choice must be none, auto, required or "
                               '{"type": "function", "function": {"name": ...}}', "tool_choice")
        match = [t for t in tools if t.function.name == name]
        if not match:
            raise InvalidParam(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
        return match[0].function.parameters or {"type": "object"}, name
    raise InvalidParam(f"invalid tool_choice {tool_choice!r}", "tool_choice")


# ---- logprobs -------------------------------------------------------------------------------
def _entries(meta: dict, key: str) -> list:
    return list(meta.get(key) or [])


def _token_text(tokenizer: Any, entry: Any) -> str:
    # SGLang entries are (logprob, token_id, text-or-None).
    if len(entry) > 2 and entry[2] is not None:
        return entry[2]
    return tokenizer.decode([entry[1]]) if tokenizer is not None else str(entry[1])


def chat_logprobs(tokenizer: Any, meta: dict, top_n: int) -> dict:
    """OpenAI chat ``choice.logprobs`` from SGLang's ``output_token_logprobs``/``output_top_logprobs``."""
    tops = _entries(meta, "output_top_logprobs")
    content = []
    for i, entry in enumerate(_entries(meta, "output_token_logprobs")):
        text = _token_text(tokenizer, entry)
        item = {"token": text, "logprob": float(entry[0]), "bytes": list(text.encode("utf-8")),
                "top_logprobs": []}
        if top_n and i < len(tops) and tops[i]:
            for alt in tops[i][:top_n]:
                alt_text = _token_text(tokenizer, alt)
                item["top_logprobs"].append({"token": alt_text, "logprob": float(alt[0]),
                                             "bytes": list(alt_text.encode("utf-8"))})
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Any, meta: dict, top_n: int, offset: int = 0) -> dict:
    """OpenAI legacy completions ``choice.logprobs`` (tokens, token_logprobs, top_logprobs, text_offset)."""
    tops = _entries(meta, "output_top_logprobs")
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, entry in enumerate(_entries(meta, "output_token_logprobs")):
        text = _token_text(tokenizer, entry)
        out["tokens"].append(text)
        out["token_logprobs"].append(float(entry[0]))
        out["text_offset"].append(offset)
        offset += len(text)
        alts = tops[i] if i < len(tops) and tops[i] else []
        out["top_logprobs"].append({_token_text(tokenizer, a): float(a[0]) for a in alts[:top_n]}
                                   if top_n else None)
    return out
