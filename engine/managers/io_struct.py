"""User-facing request normalisation: one ``generate`` call → a list of single requests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from radixfleet.engine.sampling.params import SamplingParams


@dataclass
class SingleReq:
    rid: str
    text: str | None
    input_ids: list[int] | None
    params: SamplingParams
    stream: bool
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_hidden_states: bool = False
    return_text_in_logprobs: bool = False
    custom_logit_processor: str | None = None
    token_ids_logprob: list[int] | None = None
    lora_path: str | None = None  # the name of a loaded LoRA adapter
    session_params: dict | None = None  # continue a session's turn (engine/managers/session.py)


def _is_int_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _inputs(prompt: Any, input_ids: Any) -> tuple[list[str | None], list[list[int] | None], bool]:
    """A call's ``prompt`` or ``input_ids`` → (texts, id lists, is_batch), one entry per
    request (the other list holds None). Raises ValueError naming the problem."""
    if prompt is not None and input_ids is not None:
        raise ValueError("pass either prompt or input_ids, not both")
    if prompt is None and input_ids is None:
        raise ValueError("pass a prompt or input_ids")
    if prompt is not None:
        is_batch = isinstance(prompt, list)
        texts = prompt if is_batch else [prompt]
        if is_batch and not texts:
            raise ValueError("the prompt list is empty")
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"prompt must be a string or a list of strings, got {type(t).__name__}")
            if t == "":
                raise ValueError("the prompt is empty")
        return list(texts), [None] * len(texts), is_batch
    if _is_int_list(input_ids):
        is_batch, ids_list = False, [input_ids]
    elif isinstance(input_ids, list) and input_ids and all(_is_int_list(x) for x in input_ids):
        is_batch, ids_list = True, list(input_ids)
    else:
        raise ValueError("input_ids must be a list of token ids or a list of such lists")
    if any(len(x) == 0 for x in ids_list):
        raise ValueError("input_ids is empty")
    return [None] * len(ids_list), ids_list, is_batch


def normalize_generate(prompt: str | list[str] | None, input_ids: Any, sampling_params: Any,
                       stream: bool, rid: str | list[str] | None = None,
                       return_logprob: bool | list[bool] = False, logprob_start_len: int = -1,
                       top_logprobs_num: int = 0, return_hidden_states: bool = False,
                       return_text_in_logprobs: bool = False,
                       custom_logit_processor: str | list[str | None] | None = None,
                       token_ids_logprob: list[int] | list[list[int]] | None = None,
                       lora_path: str | list[str | None] | None = None,
                       session_params: dict | None = None,
                       ) -> tuple[list[SingleReq], bool]:
    """Return (requests, is_batch). Raises ValueError naming the problem."""
    texts_list, ids_list, is_batch = _inputs(prompt, input_ids)
    n = len(texts_list)
    if isinstance(sampling_params, list):
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} sampling_params for {n} prompts")
        params = [SamplingParams.from_dict(p) for p in sampling_params]
    else:
        one = SamplingParams.from_dict(sampling_params)
        params = [one] + [SamplingParams.from_dict(sampling_params) for _ in range(n - 1)]
    if rid is None:
        rids = [uuid.uuid4().hex for _ in range(n)]
    else:
        rids = rid if isinstance(rid, list) else [rid]
        if len(rids) != n:
            raise ValueError(f"got {len(rids)} rids for {n} prompts")
    logprob_flags = return_logprob if isinstance(return_logprob, list) else [return_logprob] * n
    processors = (custom_logit_processor if isinstance(custom_logit_processor, list)
                  else [custom_logit_processor] * n)
    if len(processors) != n:
        raise ValueError(f"got {len(processors)} custom_logit_processor entries for {n} prompts")
    token_ids = _token_ids_per_prompt(token_ids_logprob, n)
    if token_ids_logprob is not None and not all(logprob_flags):
        raise ValueError("token_ids_logprob needs return_logprob=True")
    adapters = lora_path if isinstance(lora_path, list) else [lora_path] * n
    if len(adapters) != n or not all(a is None or (isinstance(a, str) and a) for a in adapters):
        raise ValueError(f"lora_path must be an adapter name, or a list of {n} names (or nulls), one per prompt")
    if session_params is not None and (n != 1 or params[0].n != 1):
        raise ValueError("session_params continue one request: one prompt, n = 1")
    reqs = [SingleReq(rids[i], texts_list[i], ids_list[i], params[i], stream, bool(logprob_flags[i]),
                      logprob_start_len, top_logprobs_num, return_hidden_states,
                      return_text_in_logprobs, processors[i], token_ids[i], adapters[i], session_params)
            for i in range(n)]
    return reqs, is_batch


def _token_ids_per_prompt(value: Any, n: int) -> list[list[int] | None]:
    """``token_ids_logprob``: one id list for every prompt, or one list per prompt."""
    if value is None:
        return [None] * n
    if _is_int_list(value) and value:
        return [list(value)] * n
    if isinstance(value, list) and len(value) == n and all(_is_int_list(v) and v for v in value):
        return [list(v) for v in value]
    raise ValueError(f"token_ids_logprob must be a non-empty list of token ids, or {n} such lists "
                     "(one per prompt)")


GENERATE_REFUSED = "this engine serves an embedding model: use encode (/encode, /v1/embeddings)"
ENCODE_REFUSED = ("encode needs an embedding model (e.g. model_path='all-minilm-l6-v2'); this "
                  "engine serves a generation model")


@dataclass
class EmbedReq:
    rid: str
    text: str | None
    input_ids: list[int] | None


def normalize_encode(prompt: str | list[str] | None, input_ids: Any = None,
                     rid: str | list[str] | None = None) -> tuple[list[EmbedReq], bool]:
    """One ``encode`` call → (requests, is_batch). Raises ValueError naming the problem."""
    texts, id_lists, is_batch = _inputs(prompt, input_ids)
    items = list(zip(texts, id_lists, strict=True))
    rids = [uuid.uuid4().hex for _ in items] if rid is None else (rid if isinstance(rid, list) else [rid])
    if len(rids) != len(items):
        raise ValueError(f"got {len(rids)} rids for {len(items)} inputs")
    return [EmbedReq(r, t, ids) for r, (t, ids) in zip(rids, items, strict=True)], is_batch
