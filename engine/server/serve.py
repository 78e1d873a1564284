"""``radixfleet serve``: one engine behind its HTTP server (also ``python -m radixfleet.engine.server.serve``).

The engine flags come from ``EngineConfig``; the server adds ``--host``, ``--port``,
``--api-key``, ``--chat-template``, ``--tool-call-parser``, ``--max-request-bytes`` and
``--drain-timeout`` (SIGTERM drains requests in flight before exiting: ``drain.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from radixfleet import env_vars
from radixfleet.engine.config import ConfigError, EngineConfig
from radixfleet.engine.server.common import DEFAULT_MAX_REQUEST_BYTES
from radixfleet.engine.server.tool_parser import TOOL_PARSERS

logger = logging.getLogger("radixfleet.serve")
DEFAULT_DRAIN_TIMEOUT_S = 120.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixfleet serve", description=__doc__.splitlines()[0])
    server = parser.add_argument_group("HTTP server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=30000, help="port to bind (default 30000)")
    server.add_argument("--api-key", default=env_vars.API_KEY.get(),
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $RADIXFLEET_API_KEY)")
    server.add_argument("--chat-template", default=None,
                        help="Jinja chat template file (default: the tokenizer's)")
    server.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                        help="tool-call format in model output (default: guessed from the chat template)")
    server.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="largest accepted request body (413 above it)")
    server.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                        help="on SIGTERM, seconds to let requests in flight finish before exiting "
                             f"(default {DEFAULT_DRAIN_TIMEOUT_S:.0f}; /health answers 503 meanwhile)")
    EngineConfig.add_cli_args(parser.add_argument_group("engine"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from radixfleet.engine.engine import Engine
    from radixfleet.engine.models.hub import HubError
    from radixfleet.engine.server.chat_template import load_chat_template
    from radixfleet.engine.server.common import ServerState
    from radixfleet.engine.server.drain import Drain, DrainingServer
    from radixfleet.engine.server.http_server import build_app

    try:
        if args.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
        config = EngineConfig.from_cli_args(args)
        chat_template = load_chat_template(args.chat_template)
    except ValueError as e:
        print(f"radixfleet serve: {e}", file=sys.stderr)
        return 2
    try:
        engine = Engine(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    except ConfigError as e:  # e.g. --device cuda without a GPU
        print(f"radixfleet serve: {e}", file=sys.stderr)
        return 2
    except HubError as e:  # a Hub model that cannot be downloaded: the message says why
        print(f"radixfleet serve: {e}", file=sys.stderr)
        return 1
    if config.node_rank > 0:
        return _serve_worker_node(engine)
    try:
        state = ServerState(engine, api_key=args.api_key or None, chat_template=chat_template,
                            tool_call_parser=args.tool_call_parser, max_request_bytes=args.max_request_bytes)
        drain = Drain(args.drain_timeout)
        app = build_app(state, drain)
        logger.info("serving %s on http://%s:%d", state.model_name, args.host, args.port)
        # The drain already waited for requests in flight: what is left at shutdown is idle keep-alives.
        server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                               timeout_keep_alive=30, timeout_graceful_shutdown=10), drain,
                                alive=state.engine_alive)
        server.run()
    finally:
        engine.shutdown()
    return 1 if server.engine_exited is not None else 0


def _serve_worker_node(engine) -> int:
    """A node > 0 of a multi-node TP group serves no HTTP: it runs its ranks until rank 0
    stops them (or until it is killed)."""
    cfg = engine.config
    logger.info("node %d of %d: running tensor-parallel ranks for the engine at %s; send requests to node 0",
                cfg.node_rank, cfg.nnodes, cfg.dist_init_addr)
    try:
        code = engine.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        engine.shutdown()
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
