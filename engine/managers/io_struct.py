"""The engine's messages: plain dataclasses, pickled over pyzmq between its processes
(the sockets are ``ipc.py``'s).

A generate call is one ``GenerateReqInput`` (from ``Engine.generate``, the native
``/generate`` body or an OpenAI route); ``normalize()`` makes one ``SingleReq`` per prompt,
whose ``GenerateOptions`` travel unchanged to the scheduler inside ``TokenizedGenerateReq``.

Flow: TokenizerManager ──TokenizedGenerateReq / AbortReq / ControlReq──► Scheduler
      Scheduler ──BatchTokenOut──► Detokenizer ──BatchTextOut──► TokenizerManager
      Scheduler ──ControlReply / ReqError──► TokenizerManager
Embedding models: TokenizerManager ──TokenizedEmbeddingReq──► EmbeddingScheduler
      ──EmbeddingOut──► TokenizerManager (nothing to detokenize)

Control calls are one ``ControlReq`` subclass each, dispatched by type; each is answered by
one ``ControlReply`` with its ``call_id`` (``ShutdownReq`` by none).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from radixfleet.engine.sampling.params import SamplingParams

GENERATE_REFUSED = "this engine serves an embedding model: use encode (/encode, /v1/embeddings)"
MAX_TOP_LOGPROBS_NUM = 100
ENCODE_REFUSED = ("encode needs an embedding model (e.g. model_path='all-minilm-l6-v2'); this "
                  "engine serves a generation model")


# ---- generate: the user's call ------------------------------------------------------------
@dataclass(kw_only=True)
class GenerateOptions:
    """What one generate request asks for besides its prompt and sampling parameters. Carried
    unchanged from the call to the scheduler, which consumes it (``Req``, ``ReqOutputs``,
    request validation): a new per-request option is a field here plus its use there."""

    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_hidden_states: bool = False
    return_text_in_logprobs: bool = False
    custom_logit_processor: str | None = None  # CustomLogitProcessor.to_str()
    token_ids_logprob: list[int] | None = None
    lora_path: str | None = None  # the name of a loaded LoRA adapter


class UnsupportedArgument(ValueError):
    """A generate argument that is not a ``GenerateReqInput`` field (``param`` names it)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(kw_only=True)
class GenerateReqInput(GenerateOptions):
    """One generate call (SGLang's ``GenerateReqInput``); the native ``/generate`` body has
    exactly these fields, and ``Engine.generate`` takes them as keyword arguments (the text
    as ``prompt``).

    A batch is a list of prompts (``text``) or of id lists (``input_ids``); ``sampling_params``,
    ``rid``, ``return_logprob``, ``custom_logit_processor``, ``lora_path`` (one entry per
    prompt) and ``token_ids_logprob`` (one id list per prompt) may then differ per prompt."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    session_params: dict | None = None  # continue a session's turn (engine/managers/session.py)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], **given: Any) -> GenerateReqInput:
        """``cls(**given, **kwargs)``; ``UnsupportedArgument`` for a key of ``kwargs`` that is
        not a field, or is one of ``given``."""
        unknown = sorted(set(kwargs) - (cls.field_names() - set(given)))
        if unknown:
            raise UnsupportedArgument(f"unsupported generate argument(s): {', '.join(unknown)}", unknown[0])
        return cls(**given, **kwargs)

    def normalize(self) -> tuple[list[SingleReq], bool]:
        """(one request per prompt, whether the call was a batch). Raises ValueError naming
        the problem."""
        texts, id_lists, is_batch = _inputs(self.text, self.input_ids)
        self._check_logprob_options()
        n = len(texts)
        if isinstance(self.sampling_params, list):
            if len(self.sampling_params) != n:
                raise ValueError(f"got {len(self.sampling_params)} sampling_params for {n} prompts")
            params = [SamplingParams.from_dict(p) for p in self.sampling_params]
        else:
            params = [SamplingParams.from_dict(self.sampling_params) for _ in range(n)]
        rids = _rids(self.rid, n, "prompts")
        varying = self._options_per_prompt(n)
        if self.session_params is not None and (n != 1 or params[0].n != 1):
            raise ValueError("session_params continue one request: one prompt, n = 1")
        same = {f.name: getattr(self, f.name) for f in fields(GenerateOptions) if f.name not in varying}
        reqs = [SingleReq(rids[i], texts[i], id_lists[i], params[i], bool(self.stream),
                          GenerateOptions(**same, **{k: v[i] for k, v in varying.items()}),
                          self.session_params) for i in range(n)]
        return reqs, is_batch

    def _check_logprob_options(self) -> None:
        # Regression (issue #20 fuzz): a negative or huge top_logprobs_num reached torch.topk in
        # the scheduler and killed the engine. Each entry is sent for every token: keep it modest.
        for name in ("top_logprobs_num", "logprob_start_len"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not 0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS_NUM:
            raise ValueError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS_NUM}], got {self.top_logprobs_num}")

    def _options_per_prompt(self, n: int) -> dict[str, list]:
        """The options that may differ between prompts: {name: one value per prompt}."""
        logprob_flags = [bool(x) for x in _per_prompt(self.return_logprob, n, "return_logprob")]
        processors = _per_prompt(self.custom_logit_processor, n, "custom_logit_processor")
        token_ids = _token_ids_per_prompt(self.token_ids_logprob, n)
        if self.token_ids_logprob is not None and not all(logprob_flags):
            raise ValueError("token_ids_logprob needs return_logprob=True")
        adapters = self.lora_path if isinstance(self.lora_path, list) else [self.lora_path] * n
        if len(adapters) != n or not all(a is None or (isinstance(a, str) and a) for a in adapters):
            raise ValueError(f"lora_path must be an adapter name, or a list of {n} names (or nulls), one per prompt")
        return {"return_logprob": logprob_flags, "custom_logit_processor": processors,
                "token_ids_logprob": token_ids, "lora_path": adapters}


@dataclass
class SingleReq:
    """One prompt of a generate call, as the TokenizerManager takes it."""

    rid: str
    text: str | None
    input_ids: list[int] | None
    params: SamplingParams
    stream: bool
    options: GenerateOptions = field(default_factory=GenerateOptions)
    session_params: dict | None = None  # read by the TokenizerManager (engine/managers/session.py)


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


def _rids(rid: str | list[str] | None, n: int, what: str) -> list[str]:
    """Given request ids (one, or one per input), or fresh ones."""
    if rid is None:
        return [uuid.uuid4().hex for _ in range(n)]
    rids = rid if isinstance(rid, list) else [rid]
    if len(rids) != n:
        raise ValueError(f"got {len(rids)} rids for {n} {what}")
    return rids


def _per_prompt(value: Any, n: int, name: str) -> list:
    """One value for every prompt, or a list of one value per prompt."""
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"got {len(value)} {name} entries for {n} prompts")
    return list(value)


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


# ---- encode: the user's call --------------------------------------------------------------
@dataclass
class EmbedReq:
    rid: str
    text: str | None
    input_ids: list[int] | None


def normalize_encode(prompt: str | list[str] | None, input_ids: Any = None,
                     rid: str | list[str] | None = None) -> tuple[list[EmbedReq], bool]:
    """One ``encode`` call → (requests, is_batch). Raises ValueError naming the problem."""
    texts, id_lists, is_batch = _inputs(prompt, input_ids)
    rids = _rids(rid, len(texts), "inputs")
    return [EmbedReq(r, t, ids) for r, t, ids in zip(rids, texts, id_lists, strict=True)], is_batch


# ---- TokenizerManager → schedulers ------------------------------------------------------------
@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    stream: bool = False
    arrival_time: float = 0.0
    options: GenerateOptions = field(default_factory=GenerateOptions)


@dataclass
class TokenizedEmbeddingReq:
    rid: str
    input_ids: list[int]
    arrival_time: float = 0.0


@dataclass
class AbortReq:
    rid: str  # "" aborts every request


# ---- control calls ------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ControlReq:
    """A control call to the scheduler, answered with one ``ControlReply`` of its ``call_id``."""

    call_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def call_name(self) -> str:
        """The call's name for messages: ``LoadLoRAAdapterReq`` → ``load_lora_adapter``."""
        return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", type(self).__name__.removesuffix("Req")).lower()

    def reply(self, result: Any = None, error: str | None = None) -> ControlReply:
        return ControlReply(self.call_id, result, error)


@dataclass
class ControlReply:
    call_id: str
    result: Any = None
    error: str | None = None  # the caller raises RuntimeError with it


@dataclass
class FlushCacheReq(ControlReq):
    """Drop the radix cache. Result True; an error while requests are in flight."""


@dataclass
class GetInternalStateReq(ControlReq):
    """Result: the scheduler's load, cache and throughput figures (a dict)."""


@dataclass
class UpdateWeightsFromDiskReq(ControlReq):
    """Load the weights of ``model_path`` once nothing runs. Result: (success, message)."""

    model_path: str


@dataclass
class GetWeightsByNameReq(ControlReq):
    """Result: the first ``truncate_size`` values of parameter ``name``; an error if none."""

    name: str
    truncate_size: int = 100


@dataclass
class LoadLoRAAdapterReq(ControlReq):
    """Result: (success, message)."""

    lora_name: str
    lora_path: str


@dataclass
class UnloadLoRAAdapterReq(ControlReq):
    """Result: (success, message); refused while a request uses the adapter."""

    lora_name: str


@dataclass
class KVEventsSnapshotReq(ControlReq):
    """Result: every resident KV-event block and the current ``seq`` (``radixfleet/kv_events.py``
    ``Snapshot.to_json``); an error when KV events are off."""


@dataclass
class ShutdownReq(ControlReq):
    """Stop the TP followers and leave the event loop; not answered."""


# ---- schedulers → detokenizer → TokenizerManager -------------------------------------------------
@dataclass
class BatchTokenOut:
    """New output tokens of a step, for the requests that produced one (or finished)."""

    rids: list[str]
    new_token_ids: list[list[int]]  # tokens produced since the last message, per request
    finished_reasons: list[dict | None]  # None while running
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    skip_special_tokens: list[bool]
    spaces_between_special_tokens: list[bool]
    no_stop_trim: list[bool]
    stop_strs: list[list[str]]  # for holding back partial stop strings while streaming
    meta: list[dict | None]  # extra per-request meta_info (logprobs, ...) accumulated deltas


@dataclass
class BatchTextOut:
    rids: list[str]
    text_deltas: list[str]
    new_token_ids: list[list[int]]
    finished_reasons: list[dict | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    meta: list[dict | None]


@dataclass
class EmbeddingOut:
    rids: list[str]
    embeddings: list[list[float]]
    prompt_tokens: list[int]
    queue_times: list[float]  # seconds from arrival to the forward


@dataclass
class ReqError:
    """A request the scheduler refused; fails only that request."""

    rid: str
    message: str
