"""The multi-node engine probes are shell commands: run them as the kubelet would."""

from __future__ import annotations

import os
import subprocess

from kube_harness import router_process
from server_process import free_port

from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.spec import parse_spec


def probe_command(port: int) -> list[str]:
    spec = parse_spec({"metadata": {"name": "b", "namespace": "n"},
                       "spec": {"model": {"path": "m"}, "port": port, "tensorParallelSize": 2, "nodesPerReplica": 2}})
    (sts, *_) = [m for m in build_children(spec) if m["kind"] == "StatefulSet"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["exec"] == container["readinessProbe"]["exec"]
    # Liveness is the same check on /live, which stays up while the engine drains.
    live = container["livenessProbe"]["exec"]["command"]
    assert [c.replace("/live'", "/health'") for c in live] == container["readinessProbe"]["exec"]["command"]
    return container["readinessProbe"]["exec"]["command"]


def run(command: list[str], rank: str) -> int:
    env = {**os.environ, "RADIXFLEET_NODE_RANK": rank}
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


def test_rank_zero_probes_health_and_other_ranks_pass():
    port = free_port()
    command = probe_command(port)
    assert run(command, "1") == 0  # rank 1 serves no HTTP: its probe passes while it runs
    assert run(command, "0") != 0  # rank 0 with nothing listening fails
    server = router_process(port).start().wait(30)  # any process answering /health on the port
    try:
        assert run(command, "0") == 0
    finally:
        server.stop()
