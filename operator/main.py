"""`radixfleet operator`: run the InferenceService operator (kopf).

With more than one operator replica, run with peering (the chart's default): every
instance takes a random priority, the highest one works and the others stand by, and a
stand-by takes over when the active one's peering heartbeat stops (kopf peering acting
as leader election). `--standalone` runs without peering (one replica only).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
from dataclasses import fields

import kopf

from radixfleet.operator.config import OperatorConfig
from radixfleet.operator.handlers import build_registry
from radixfleet.operator.runtime import Runtime


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="radixfleet operator", description=__doc__.splitlines()[0])
    p.add_argument("-n", "--namespace", action="append", default=[], help="watch only this namespace (repeatable); default: all")
    p.add_argument("--standalone", action="store_true", help="no peering: run as the only operator instance")
    p.add_argument("--peering", default="radixfleet", help="kopf peering object shared by the replicas")
    p.add_argument("--priority", type=int, default=None, help="peering priority (default: random, i.e. leader election)")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL ('' to disable)")
    p.add_argument("--verbose", action="store_true")
    for f in fields(OperatorConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=float if f.type in ("float", float) else str, default=f.default, dest=f.name)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    kopf.configure(verbose=args.verbose)
    config = OperatorConfig(**{f.name: getattr(args, f.name) for f in fields(OperatorConfig)})
    rt = Runtime(config=config)
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    logging.getLogger(__name__).info("starting operator (peering=%s, priority=%s)", None if args.standalone else args.peering, priority)
    asyncio.run(kopf.operator(
        registry=build_registry(rt),
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=priority,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    ))
    return 0
