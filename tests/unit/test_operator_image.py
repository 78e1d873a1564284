"""The Dockerfile agrees with what the operator and the chart run (`.ci/build-images` builds and runs it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import tomllib
import yaml

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


def test_the_image_installs_the_package_from_the_whole_context():
    """``COPY . ./`` and ``pip install .``: what the image holds is what the wheel holds, and
    .dockerignore leaves out nothing the build needs (issue #17: folder lists written by hand,
    in pyproject.toml and here, missed packages)."""
    assert ". ./" in instructions("COPY")
    assert any("pip install --no-deps ." in run for run in instructions("RUN"))
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    needed = packages | {p.name for p in ROOT.glob("*.py")} | {"pyproject.toml", "README.md"}
    assert not needed & ignored, f".dockerignore leaves out {sorted(needed & ignored)}"
    for src in instructions("COPY"):
        for path in src.split()[:-1]:
            assert (ROOT / path).exists(), path


def test_the_image_user_matches_the_charts_security_context():
    (user,) = instructions("USER")
    chart = (ROOT / "charts" / "radixfleet" / "templates" / "deployment.yaml").read_text()
    assert re.search(rf"runAsUser: {user}\b", chart)


def test_the_default_images_are_the_one_the_build_script_tags():
    """The chart's default image, and the one InferenceServices default to, are what
    ``.ci/build-images cpu`` builds: IMAGE's default, tagged with the package version."""
    script = (ROOT / ".ci" / "build-images").read_text()
    (repository,) = re.findall(r"^IMAGE=\$\{IMAGE:-([^}]+)\}$", script, re.M)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart_dir = ROOT / "charts" / "radixfleet"
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    assert values["image"]["repository"] == repository and values["image"]["tag"] == ""
    assert yaml.safe_load((chart_dir / "Chart.yaml").read_text())["appVersion"] == version
    spec = parse_spec({"metadata": {"name": "x", "namespace": "d"}, "spec": {"model": {"path": "smollm2"}}})
    assert spec.image == f"{repository}:{version}"
