"""The wheel, not the checkout (issue #17): build it, install it into a fresh virtualenv and
use it from there. The wheel once left ``radixfleet.engine.attention`` out and no test saw it,
because every other test imports the editable checkout.

The virtualenv has no system site-packages of its own: a ``.pth`` file puts the system
site-packages folders on its path for the dependencies (torch, transformers, ...), as plain
path entries, so their ``.pth`` files never run and the editable install's import hook
(``__editable__.radixfleet-*.pth``) cannot hand out modules from the checkout. Every command
runs from an empty working directory, and the tests assert where ``radixfleet`` came from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from server_process import free_port, server_process

ROOT = Path(__file__).resolve().parents[2]
# Top-level folders of the checkout that are not part of the package. Everything else that
# holds Python files must ship: a new folder is a package unless it is named here.
NOT_SHIPPED = {"tests", "benchmarks", "examples", "grafana", "charts", "crds", "build", "dist"}
NOT_SHIPPED_FILES = {"setup.py"}  # the build script, at the package's root
DOC_SUFFIXES = {".md"}
# Modules may fail to import with ModuleNotFoundError for these names only: they belong to
# the optional `gpu` extra, which CPU installs leave out.
OPTIONAL_IMPORTS = ["flashinfer"]


def _source_files() -> tuple[set[str], set[str]]:
    """(module files, data files) the wheel must hold, as paths under ``radixfleet/``."""
    modules, data = set(), set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = Path(dirpath).relative_to(ROOT)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                       and not d.endswith(".egg-info") and not (rel == Path(".") and d in NOT_SHIPPED)]
        for name in filenames:
            path = (rel / name).as_posix()
            if rel == Path(".") and (name in NOT_SHIPPED_FILES or not name.endswith(".py")):
                continue  # README, Dockerfile, pyproject.toml, ...
            if name.endswith(".py"):
                modules.add(f"radixfleet/{path}")
            elif Path(name).suffix not in DOC_SUFFIXES and not name.endswith(".pyc"):
                data.add(f"radixfleet/{path}")
    return modules, data


def _module_name(path: str) -> str:
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` (not editable) of a copy of the checkout, as a user builds it."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".whl", ".gpu", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)],
                   check=True, cwd=tmp, timeout=600)
    (built,) = (tmp / "dist").glob("radixfleet-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> dict:
    """A virtualenv with the wheel installed; the dependencies come from the system site-packages."""
    tmp = tmp_path_factory.mktemp("venv")
    root = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site_dirs = json.loads(subprocess.run(
        [sys.executable, "-I", "-c", "import json, site; print(json.dumps(site.getsitepackages() + "
         "[site.getusersitepackages()]))"], capture_output=True, text=True, check=True).stdout)
    venv_site = Path(subprocess.run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    deps = [d for d in site_dirs if os.path.isdir(d) and Path(d).resolve() != ROOT]
    (venv_site / "_system_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    # pip itself comes from the system folders; --ignore-installed: never touch the editable install.
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                    str(wheel)], check=True, cwd=tmp, timeout=600, env=_clean_env())
    work = tmp / "cwd"
    work.mkdir()
    return {"python": python, "bin": root / "bin", "site": venv_site, "cwd": work}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"  # the user site is on the .pth list already; never its .pth files
    return env


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules, data = _source_files()
    assert "radixfleet/engine/attention/__init__.py" in modules  # the folder issue #17 lost
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    assert not data - names, f"data files missing from the wheel (package-data): {sorted(data - names)}"
    extra = {n for n in names if n.startswith("radixfleet/") and n.endswith(".py")} - modules
    assert not extra, f"the wheel ships files that are not package modules: {sorted(extra)}"


def test_installed_wheel_imports_every_module(venv):
    """Every module imports from the virtualenv, and finds its package data there."""
    out = subprocess.run([str(venv["python"]), str(ROOT / ".ci" / "check_install.py"),
                          "--optional", *OPTIONAL_IMPORTS], cwd=venv["cwd"], env=_clean_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["radixfleet"] == str(venv["site"] / "radixfleet" / "__init__.py")
    expected = {_module_name(p) for p in _source_files()[0]}
    imported = set(report["modules"]) | set(report["failed"])
    assert not expected - imported, f"modules the installed package lacks: {sorted(expected - imported)}"


@pytest.mark.parametrize("role", ["router", "operator", "serve", "up", "model"])
def test_installed_command_prints_each_roles_help(venv, role):
    out = subprocess.run([str(venv["bin"] / "radixfleet"), role, "--help"], cwd=venv["cwd"], env=_clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("usage:"), out.stdout[:500]


def test_installed_server_answers_generate(venv, model_dir):
    """``radixfleet serve --model-path smollm2`` from the virtualenv answers /generate."""
    port = free_port()
    cmd = [str(venv["bin"] / "radixfleet"), "serve", "--model-path", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--max-total-tokens", "4096"]
    with server_process(cmd, port, timeout=300, env=_clean_env(), cwd=str(venv["cwd"])) as url:
        r = httpx.post(url + "/generate", timeout=120, trust_env=False, json={
            "text": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
            "sampling_params": {"temperature": 0, "max_new_tokens": 16}})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["text"], r.json()
