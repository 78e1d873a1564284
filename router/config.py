"""The router's configuration: one frozen dataclass, validated at construction.

The CLI flags of ``radixfleet router`` are generated from these fields (``cli_fields.py``),
so a field added here is a flag there.

cache_aware defaults are SGLang's first documented set, 0.5 / 32 / 1.0001 / 60 s / 2**24,
chosen over the second (0.3 / 64 / 1.5 / 120 s / 2**26) by ``benchmarks/router.py``
(``defaults`` lines): in a simulation of 8 skewed prefix groups over 2-8 workers at
concurrency 32-128 both keep every group on one worker where load allows, but 1.5's
tolerance lets 8 workers drift out of balance (1,336 vs 1,471 simulated req/s), so the first
set wins overall (3,039 vs 2,906). ``max_tree_size`` counts characters per worker: the tree
costs ~1.8 bytes per character, so 2**24 is ~29 MiB per worker, and 16 M characters (~4 M
tokens) is already more prompt than one worker's KV cache holds; a full eviction pass of
that size takes ~0.1 s in a thread, so 60 s between passes is plenty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from radixfleet.http_limits import DEFAULT_MAX_REQUEST_BYTES

from .worker import check_endpoint

POLICY_NAMES = ("auto", "precise", "cache_aware", "round_robin", "random", "power_of_two")


def _f(default, help_: str, **extra):
    return field(default=default, metadata={"help": help_, **extra})


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``radixfleet router`` can be told; each field is a ``--flag``."""

    host: str = _f("127.0.0.1", "Address to listen on.")
    port: int = _f(30000, "Port to listen on.")
    worker_urls: tuple[str, ...] = _f((), "Workers to start with, e.g. http://127.0.0.1:30001.")
    policy: str = _f("auto", "Routing policy (auto: precise when every worker publishes KV events, else "
                              "cache_aware).", choices=POLICY_NAMES)
    api_key: str = _f("", "If set, every route but /health requires 'Authorization: Bearer KEY'.")
    worker_api_key: str = _f("", "Bearer key the router sends to workers.")
    # cache_aware
    cache_threshold: float = _f(0.5, "cache_aware: minimum prefix-match ratio to follow the cache.")
    balance_abs_threshold: int = _f(32, "cache_aware: imbalanced if max-min in-flight exceeds this ...")
    balance_rel_threshold: float = _f(1.0001, "cache_aware: ... and max in-flight exceeds this times min.")
    eviction_interval: float = _f(60.0, "cache_aware: seconds between LRU eviction passes.")
    max_tree_size: int = _f(2**24, "cache_aware: characters kept per worker tree after eviction.")
    # precise (and auto)
    tokenizer_path: str = _f("", "precise/auto: the model's tokenizer folder (default: fetched from the first "
                                 "worker that publishes KV events).")
    chat_template: str = _f("", "precise/auto: the engines' --chat-template, if they were given one.")
    load_tokens: int = _f(32, "precise: prompt tokens that one request in flight on a worker is worth in its cost "
                              "(beyond the prefill it still owes).")
    uncached_weight: float = _f(2.0, "precise: weight of the prompt tokens a worker must compute for this request in "
                                     "its cost (1: this request's wait only; 2: also the work it adds in front of "
                                     "the worker's next requests).")
    placement_tolerance: float = _f(1.0, "precise: a new prefix (no worker holds more of it than another) goes, among the "
                                         "workers whose cost is within this many times its tokens of the cheapest, to the first "
                                         "in its rendezvous-hash order, so that router replicas place it alike.")
    placement_blocks: int = _f(4, "precise: KV blocks of a new prompt (past what some worker holds) hashed to place it.")
    peer_port: int = _f(0, "precise/auto: port on which this replica announces each routing decision to the other "
                           "replicas (ZMQ PUB on --host), so that they count a request it sent a moment ago before "
                           "the engine reports it (0: off).")
    peers: tuple[str, ...] = _f((), "precise/auto: the other replicas' announcement endpoints: tcp://host:port, or "
                                    "dns://name:port for every address of a name (a headless Service), re-resolved "
                                    "every few seconds. This replica's own announcements are ignored.")
    peer_hold: float = _f(0.003, "precise/auto with peers: seconds a request on a prompt no worker holds waits, once "
                                 "routed, for other replicas' announcements of the same prompt made at the same "
                                 "moment, after which the replicas agree on their order (only while another replica "
                                 "is heard from; 0: no wait and no ordering step). Measured in the README.")
    kv_events_stale_after: float = _f(5.0, "precise: seconds without a KV-event message (heartbeats come every second) "
                                           "after which a worker is scored by the approximate tree until it resyncs.")
    # fault tolerance
    max_worker_retries: int = _f(3, "Consecutive failures (requests or health checks) that remove a worker.")
    max_total_retries: int = _f(6, "Times one request is re-sent to another worker after a 5xx or connection error.")
    health_check_interval: float = _f(10.0, "Seconds between health checks of every worker.")
    health_check_timeout: float = _f(5.0, "Seconds a worker's /health may take.")
    worker_startup_timeout: float = _f(30.0, "Seconds add_worker waits for a new worker to become healthy.")
    circuit_breaker_failures: int = _f(2, "Consecutive request failures that open a worker's circuit.")
    circuit_breaker_cooldown: float = _f(5.0, "Seconds an open circuit waits before a half-open probe.")
    # limits
    queue_limit: int = _f(1024, "Requests in flight to the workers at once; more wait in the queue (0: no limit).")
    max_waiting: int = _f(1024, "Requests that may wait for a slot; past it 429 with Retry-After (0: refuse at once).")
    queue_timeout: float = _f(30.0, "Seconds a request may wait for a slot before a 408 with Retry-After.")
    rate_limit_rps: float = _f(0.0, "Requests per second allowed per API key (bearer token); 0: no limit.")
    rate_limit_burst: int = _f(0, "Requests a key may send at once (bucket size; 0: max(1, rate_limit_rps)).")
    rate_limit_tokens_per_s: float = _f(0.0, "Tokens (prompt + max_tokens) per second per API key; 0: no limit.")
    rate_limit_token_burst: int = _f(0, "Tokens a key may send at once (bucket size; 0: rate_limit_tokens_per_s).")
    request_timeout: float = _f(600.0, "Seconds an upstream request may take (read timeout).")
    max_connections: int = _f(1024, "Pooled upstream connections across all workers.")
    max_request_bytes: int = _f(DEFAULT_MAX_REQUEST_BYTES, "Largest accepted request body in bytes (413 above it).")
    log_level: str = _f("info", "Logging level.", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        checks = [
            (self.policy in POLICY_NAMES, f"policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}"),
            (0 < self.port < 65536, f"port must be in 1..65535, got {self.port}"),
            (0.0 <= self.cache_threshold <= 1.0, f"cache_threshold must be in [0, 1], got {self.cache_threshold}"),
            (self.balance_abs_threshold >= 0, "balance_abs_threshold must be >= 0"),
            (self.balance_rel_threshold >= 1.0, "balance_rel_threshold must be >= 1.0"),
            (self.eviction_interval > 0, "eviction_interval must be > 0 seconds"),
            (self.max_tree_size > 0, "max_tree_size must be > 0 characters"),
            (self.load_tokens >= 0, "load_tokens must be >= 0"),
            (self.placement_tolerance >= 0.0, f"placement_tolerance must be >= 0, got {self.placement_tolerance}"),
            (self.placement_blocks >= 1, f"placement_blocks must be >= 1, got {self.placement_blocks}"),
            (self.uncached_weight >= 1.0, f"uncached_weight must be >= 1, got {self.uncached_weight}"),
            (0 <= self.peer_port < 65536, f"peer_port must be in 0..65535 (0: off), got {self.peer_port}"),
            (not (self.peer_port or self.peers) or self.policy in ("auto", "precise"),
             f"peer_port and peers announce precise routing decisions: they need policy auto or precise, not {self.policy!r}"),
            (0.0 <= self.peer_hold <= 1.0, f"peer_hold must be in [0, 1] seconds, got {self.peer_hold}"),
            *((_peer_ok(p), f"peers: {p!r} is not tcp://host:port or dns://name:port") for p in self.peers),
            (self.kv_events_stale_after > 0, "kv_events_stale_after must be > 0 seconds"),
            (self.max_worker_retries >= 1, "max_worker_retries must be >= 1"),
            (self.max_total_retries >= 0, "max_total_retries must be >= 0"),
            (self.health_check_interval > 0, "health_check_interval must be > 0 seconds"),
            (self.health_check_timeout > 0, "health_check_timeout must be > 0 seconds"),
            (self.worker_startup_timeout >= 0, "worker_startup_timeout must be >= 0 seconds"),
            (self.circuit_breaker_failures >= 1, "circuit_breaker_failures must be >= 1"),
            (self.circuit_breaker_cooldown >= 0, "circuit_breaker_cooldown must be >= 0 seconds"),
            (self.queue_limit >= 0, "queue_limit must be >= 0 (0 disables it)"),
            (self.max_waiting >= 0, "max_waiting must be >= 0"),
            (self.queue_timeout > 0, "queue_timeout must be > 0 seconds"),
            (self.rate_limit_rps >= 0 and self.rate_limit_tokens_per_s >= 0, "rate limits must be >= 0 (0: off)"),
            (self.rate_limit_burst >= 0 and self.rate_limit_token_burst >= 0, "rate-limit bursts must be >= 0"),
            (self.request_timeout > 0, "request_timeout must be > 0 seconds"),
            (self.max_connections >= 1, "max_connections must be >= 1"),
            (self.max_request_bytes >= 1, "max_request_bytes must be >= 1"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("invalid router config: " + "; ".join(errors))


def _peer_ok(endpoint: str) -> bool:
    try:
        check_endpoint(endpoint, ("tcp", "dns"), "router peer")
    except ValueError:
        return False
    return 0 < int(endpoint.rsplit(":", 1)[1]) < 65536
