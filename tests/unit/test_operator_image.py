"""The Dockerfile agrees with what the operator and the chart run (no Docker here to build it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import tomllib

from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]


def test_entrypoint_is_the_command_the_manifests_run():
    (entrypoint,) = instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == ["radixfleet"]
    spec = parse_spec({"metadata": {"name": "x", "namespace": "d"}, "spec": {"model": {"path": "smollm2"}}})
    for m in build_children(spec):
        for c in m.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert c["command"] == ["radixfleet"] and c["args"][0] in ("serve", "router")
    chart = (ROOT / "charts" / "radixfleet" / "templates" / "deployment.yaml").read_text()
    assert 'command: ["radixfleet"]' in chart and "- operator" in chart
    (cmd,) = instructions("CMD")
    assert json.loads(cmd)[:3] == ["serve", "--model-path", "smollm2"]


def test_every_package_folder_is_copied_into_the_image():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    top = {p.split(".")[1] for p in packages if p.count(".") >= 1}
    copied = {src.split()[0].rstrip("/") for src in instructions("COPY")}
    assert top <= copied, f"not copied: {sorted(top - copied)}"
    for src in instructions("COPY"):
        for path in src.split()[:-1]:
            assert (ROOT / path).exists(), path


def test_the_image_user_matches_the_charts_security_context():
    (user,) = instructions("USER")
    chart = (ROOT / "charts" / "radixfleet" / "templates" / "deployment.yaml").read_text()
    assert re.search(rf"runAsUser: {user}\b", chart)
