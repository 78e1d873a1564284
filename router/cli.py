"""``radixfleet router``: parse flags (generated from RouterConfig) and serve the app."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from .app import build_app
from .cli_fields import add_dataclass_flags, from_namespace
from .config import RouterConfig


def parse_config(argv: list[str]) -> RouterConfig:
    parser = argparse.ArgumentParser(prog="radixfleet router", description="Cache-aware router for radixfleet/SGLang workers.")
    add_dataclass_flags(parser, RouterConfig)
    ns = parser.parse_args(argv)
    try:
        return from_namespace(RouterConfig, ns)
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


# Idle keep-alive connections are kept this long: longer than the clients and proxies in front
# of the router keep theirs (httpx 5 s, cloud load balancers and nginx 60 s), so that none
# sends a request on a connection the router is closing at that moment (a reset). uvicorn's
# default is 5 s.
KEEP_ALIVE_S = 75


def main(argv: list[str]) -> int:
    """Run the router until interrupted; returns the exit code."""
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(config)
    # loop/http "auto": uvloop and httptools are used when installed, asyncio and h11 otherwise.
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, access_log=False,
                timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=5)
    return 0
