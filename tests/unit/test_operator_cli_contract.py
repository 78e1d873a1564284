"""The command lines the builders write are accepted by the engine's and the router's own
parsers, with the values the kubelet substitutes for `$(VAR)` references."""

from __future__ import annotations

import re

import pytest

from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.spec import parse_spec

SPEC = parse_spec({
    "metadata": {"name": "llama", "namespace": "ml"},
    "spec": {"model": {"pvc": {"claimName": "models"}, "servedName": "llama-3"}, "replicas": 2, "tensorParallelSize": 16,
             "nodesPerReplica": 2, "apiKeySecret": {"name": "key"}, "engineArgs": ["--chunked-prefill-size", "4096"],
             "router": {"policy": "power_of_two", "cacheThreshold": 0.3, "balanceAbsThreshold": 8, "balanceRelThreshold": 1.5}},
})
ENV = {"RADIXFLEET_API_KEY": "s3cret", "RADIXFLEET_NODE_RANK": "1"}


def containers(component: str) -> list[dict]:
    return [c for m in build_children(SPEC) if m["kind"] in ("Deployment", "StatefulSet")
            for c in m["spec"]["template"]["spec"]["containers"] if c["name"] == component]


def expand(args: list[str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: ENV[m.group(1)], a) for a in args]


def test_engine_accepts_its_command_line(monkeypatch):
    serve = pytest.importorskip("radixfleet.engine.server.serve")
    monkeypatch.setenv("RADIXFLEET_API_KEY", ENV["RADIXFLEET_API_KEY"])  # from the Secret, via env
    for container in containers("engine"):
        args = expand(container["args"])
        assert args[0] == "serve"
        ns = serve.build_parser().parse_args(args[1:])
        assert (ns.tp_size, ns.nnodes, ns.node_rank, ns.served_model_name) == (16, 2, 1, "llama-3")
        assert ns.dist_init_addr.endswith(".ml.svc:5000") and ns.api_key == "s3cret"
        assert ns.chunked_prefill_size == 4096 and ns.model_path == "/models"
        assert "s3cret" not in " ".join(args)  # the key stays out of argv


def test_router_accepts_its_command_line():
    cli = pytest.importorskip("radixfleet.router.cli")
    (container,) = containers("router")
    args = expand(container["args"])
    assert args[0] == "router"
    config = cli.parse_config(args[1:])
    assert (config.policy, config.cache_threshold, config.balance_abs_threshold, config.balance_rel_threshold) == (
        "power_of_two", 0.3, 8, 1.5)
    assert config.host == "0.0.0.0" and config.port == 30000
    assert config.api_key == "s3cret" and config.worker_api_key == "s3cret"


def test_router_accepts_the_peer_flags():
    """The default policy (auto) with KV events: replicas announce their decisions to every
    router pod through the headless Service."""
    cli = pytest.importorskip("radixfleet.router.cli")
    spec = parse_spec({"metadata": {"name": "llama", "namespace": "ml"}, "spec": {"model": {"path": "m"}}})
    (container,) = [c for m in build_children(spec) if m["kind"] == "Deployment"
                    for c in m["spec"]["template"]["spec"]["containers"] if c["name"] == "router"]
    config = cli.parse_config(expand(container["args"])[1:])
    assert (config.policy, config.peer_port, tuple(config.peers)) == ("auto", 5558, ("dns://llama-router-peers:5558",))
