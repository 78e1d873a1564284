"""Messages between the engine's processes, pickled over pyzmq.

Flow: TokenizerManager ──TokenizedGenerateReq/AbortReq/RpcReq──► Scheduler
      Scheduler ──BatchTokenOut──► Detokenizer ──BatchTextOut──► TokenizerManager
      Scheduler ──RpcReply──► TokenizerManager (control answers and errors)
Embedding models: TokenizerManager ──TokenizedEmbeddingReq──► EmbeddingScheduler
      ──EmbeddingOut──► TokenizerManager (nothing to detokenize)
"""

from __future__ import annotations

import os
import pickle
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq

from radixfleet.engine.sampling.params import SamplingParams


@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_hidden_states: bool = False
    arrival_time: float = 0.0
    return_text_in_logprobs: bool = False
    custom_logit_processor: str | None = None  # CustomLogitProcessor.to_str()
    token_ids_logprob: list[int] | None = None
    lora_path: str | None = None  # a loaded adapter's name


@dataclass
class TokenizedEmbeddingReq:
    rid: str
    input_ids: list[int]
    arrival_time: float = 0.0


@dataclass
class EmbeddingOut:
    rids: list[str]
    embeddings: list[list[float]]
    prompt_tokens: list[int]
    queue_times: list[float]  # seconds from arrival to the forward


@dataclass
class AbortReq:
    rid: str  # "" aborts every request


@dataclass
class RpcReq:
    """A control call answered with one ``RpcReply`` carrying the same ``call_id``."""

    call_id: str
    method: str  # "flush_cache" | "get_internal_state"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class RpcReply:
    call_id: str
    result: Any = None
    error: str | None = None


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
class ReqError:
    """A request the scheduler refused; fails only that request."""

    rid: str
    message: str


def new_ipc_names() -> dict[str, str]:
    base = os.path.join(tempfile.gettempdir(), f"radixfleet-{uuid.uuid4().hex[:12]}")
    return {name: f"ipc://{base}-{name}" for name in ("scheduler", "detokenizer", "tokenizer")}


def bind_pull(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.bind(addr)
    return sock


def connect_push(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    return sock


def send(sock: zmq.Socket, obj: Any) -> None:
    sock.send(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv(sock: zmq.Socket, flags: int = 0) -> Any:
    return pickle.loads(sock.recv(flags))
