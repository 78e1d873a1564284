"""KV-cache events: the block hashing and the wire format shared by engine and router.

Standard library only: the router imports it without torch.

**Blocks.** A token sequence is cut into blocks of ``block_size`` tokens from its start
(``block_size`` is the engine's ``kv_events_block_size``, 16 by default); only full blocks
count, a shorter tail has no block. Block ``k`` covers tokens ``[k*B, (k+1)*B)`` and is
resident on an engine exactly when its radix cache holds the sequence's first ``(k+1)*B``
tokens (so a block whose tokens straddle two radix-tree nodes belongs to the node holding
its last token).

**Hashes.** Chained, so that one hash names the whole prefix up to the end of its block::

    parent(0)   = seed                                   (uint64, SEED = 0 unless told)
    hash(k)     = blake2b(parent(k) as 8 bytes little-endian
                          + tokens of block k as uint32 little-endian, digest_size=8)
                  read as a little-endian uint64
    parent(k+1) = hash(k)

Two engines holding the same prefix publish the same hashes; the router hashes a request's
token ids the same way (``prefix_hashes``) and asks which engine holds how many of its
leading blocks. ``block_size`` and ``seed`` travel in every snapshot, so a subscriber never
assumes them.

**Messages.** An engine publishes over ZMQ PUB (topic ``b"kv"``), one JSON object per
radix-cache operation that changed its resident blocks::

    {"engine": ID, "seq": N, "ts": UNIX_TIME, "events": [EVENT, ...]}
    EVENT = {"type": "stored", "hashes": [H, ...], "parent": H | null}
          | {"type": "removed", "hashes": [H, ...]}
          | {"type": "cleared"}
          | {"type": "queued", "rid": RID, "hashes": [H, ...]}
          | {"type": "settled", "rids": [RID, ...]}

``queued`` says that a request the engine has just received will hold these blocks once it
is prefilled (the full blocks of its prompt but the last token); ``settled`` that it no longer
will: it was prefilled (its blocks were published as ``stored`` by then) or it ended. The
engine caches a prompt as soon as it is prefilled, and a request sharing it that arrives
meanwhile waits for it, so a router that sees ``queued`` knows where a prefix is about to be
held: router replicas learn of each other's requests this way, within the time a request
takes to reach the engine, rather than when its prefill ends (seconds on a loaded CPU).

``seq`` counts messages with events from 1 per engine process (``ID`` is new at every
start); a heartbeat (``"events": []``, about once a second) repeats the last ``seq`` without
advancing it, so a subscriber sees a lost message at the next heartbeat at the latest. While
nobody subscribes the engine publishes nothing and ``seq`` stands still; when a subscriber
arrives ``seq`` skips one and a heartbeat carries it at once, so a subscriber that kept state
from before sees a gap (``engine/managers/kv_publisher.py``). A
snapshot (engine ``GET /kv_events/snapshot``) is ``{"engine", "seq", "block_size", "seed",
"blocks": [H, ...], "queued": {RID: [H, ...]}}``: every resident block and every queued
request as of message ``seq``; a subscriber that starts
late or sees a gap in ``seq`` loads it and applies only the messages after ``seq``.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BLOCK_SIZE = 16
SEED = 0
TOPIC = b"kv"
_MASK = (1 << 64) - 1

assert array("I").itemsize == 4, "token ids are hashed as uint32"


def hash_block(parent: int, tokens: Sequence[int]) -> int:
    """The hash of one block whose predecessor's hash (or the seed) is ``parent``."""
    data = (parent & _MASK).to_bytes(8, "little") + array("I", tokens).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def chain_hashes(token_ids: Sequence[int], block_size: int, first_block: int, last_block: int,
                 parent: int) -> list[int]:
    """Hashes of blocks ``first_block .. last_block - 1`` of ``token_ids``, chained from ``parent``
    (the hash of block ``first_block - 1``, or the seed when ``first_block`` is 0)."""
    # One conversion of the tokens to bytes, then one blake2b per block (same as hash_block).
    data = array("I", token_ids[first_block * block_size:last_block * block_size]).tobytes()
    step, out, blake = 4 * block_size, [], hashlib.blake2b
    for i in range(0, len(data) - step + 1, step):
        parent = int.from_bytes(blake((parent & _MASK).to_bytes(8, "little") + data[i:i + step], digest_size=8).digest(),
                                "little")
        out.append(parent)
    return out


def prefix_hashes(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, seed: int = SEED) -> list[int]:
    """The hashes of every full block of ``token_ids``, in order."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return chain_hashes(token_ids, block_size, 0, len(token_ids) // block_size, seed)


def prompt_hashes(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, seed: int = SEED) -> list[int]:
    """The hashes of the blocks of a prompt that a cache can hold for it: its full blocks but
    the last token's (an engine always computes the last token, so no block holding it is
    ever matched). What ``queued`` carries, and what a router looks up."""
    return prefix_hashes(token_ids[:max(len(token_ids) - 1, 0)], block_size, seed)


def stored(hashes: list[int], parent: int | None) -> dict:
    return {"type": "stored", "hashes": hashes, "parent": parent}


def removed(hashes: list[int]) -> dict:
    return {"type": "removed", "hashes": hashes}


def cleared() -> dict:
    return {"type": "cleared"}


def queued(rid: str, hashes: list[int]) -> dict:
    return {"type": "queued", "rid": rid, "hashes": hashes}


def settled(rids: list[str]) -> dict:
    return {"type": "settled", "rids": rids}


EVENT_TYPES = ("stored", "removed", "cleared", "queued", "settled")


@dataclass
class EventBatch:
    """One published message."""

    engine: str
    seq: int
    ts: float
    events: list[dict] = field(default_factory=list)

    def encode(self) -> bytes:
        return json.dumps({"engine": self.engine, "seq": self.seq, "ts": self.ts, "events": self.events},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> EventBatch:
        """Raises ValueError on anything that is not a well-formed message."""
        obj = json.loads(payload)
        if not (isinstance(obj, dict) and isinstance(obj.get("engine"), str) and isinstance(obj.get("seq"), int)
                and isinstance(obj.get("events"), list)):
            raise ValueError("not a KV event message")
        for ev in obj["events"]:
            if not isinstance(ev, dict) or ev.get("type") not in EVENT_TYPES:
                raise ValueError(f"unknown KV event {ev!r}")
        return cls(obj["engine"], obj["seq"], float(obj.get("ts", 0.0)), obj["events"])


@dataclass
class Snapshot:
    """Every resident block and queued request of an engine as of message ``seq``."""

    engine: str
    seq: int
    block_size: int
    seed: int
    blocks: list[int]
    queued: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "seq": self.seq, "block_size": self.block_size, "seed": self.seed,
                "blocks": self.blocks, "queued": self.queued}

    @classmethod
    def from_json(cls, obj: Any) -> Snapshot:
        keys = ("engine", "seq", "block_size", "seed", "blocks")
        if not isinstance(obj, dict) or any(k not in obj for k in keys):
            raise ValueError(f"not a KV snapshot (expected keys {', '.join(keys)})")
        queued = obj.get("queued") or {}  # absent from engines before queued events
        if not isinstance(queued, dict):
            raise ValueError("a KV snapshot's queued must map request ids to block hashes")
        return cls(str(obj["engine"]), int(obj["seq"]), int(obj["block_size"]), int(obj["seed"]),
                   [int(h) for h in obj["blocks"]], {str(r): [int(h) for h in hs] for r, hs in queued.items()})
