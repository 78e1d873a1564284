"""No module or folder that lands on ``sys.path`` takes the import name of an installed
distribution. Regression (issue 24): ``benchmarks/kernels.py`` (first on ``sys.path`` when a
benchmark runs as ``python benchmarks/X.py``) hid Hugging Face's ``kernels``, which
transformers imports: ``ImportError: cannot import name 'CUDAProperties' from 'kernels'``.

The checkout root is the ``radixfleet`` package; its folders are the project's fixed layout
and only ever imported as ``radixfleet.<folder>``. One of them, ``kernels/``, has the name of
HF's distribution: the root lands on ``sys.path`` under ``python -m``/``python -c`` from the
checkout, and ``radixfleet/__init__.py`` takes it off again. The last test runs that case."""


from __future__ import annotations

from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the checkout root is the ``radixfleet`` package
# Folders that land on sys.path: benchmarks/ (python benchmarks/X.py), tests/ (pytest's
# pythonpath; benchmarks/router.py; tests/fake_worker.py), and the checkout root (below).
SEARCHED = (ROOT, ROOT / "benchmarks", ROOT / "tests")
OURS = "radixfleet"
# Top-level folders the project's layout fixes (the design card: engine/, router/, kernels/,
# operator/, ...), allowed to share a name because ``radixfleet`` takes the root off sys.path.
FIXED_LAYOUT = {"kernels"}


def import_names(folder: Path) -> set[str]:
    """What ``import NAME`` can find in ``folder`` when it is on ``sys.path``: its
    subfolders (packages, or namespace packages without ``__init__.py``) and modules."""
    names = set()
    for entry in folder.iterdir():
        if entry.name.startswith((".", "__")) or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def clashes(names: set[str], distributions: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each of ``names`` that a distribution other than radixfleet installs, with those
    distributions."""
    found = {name: sorted(set(distributions.get(name, ())) - {OURS}) for name in sorted(names)}
    return {name: dists for name, dists in found.items() if dists}


@pytest.mark.parametrize("folder", SEARCHED, ids=lambda p: p.relative_to(ROOT).as_posix() or "root")
def test_no_name_on_sys_path_shadows_an_installed_distribution(folder):
    names = import_names(folder) - (FIXED_LAYOUT if folder == ROOT else set())
    assert not clashes(names, packages_distributions()), (
        f"rename these in {folder}: they hide installed packages of the same import name")


def test_a_clash_is_reported():
    fake = {"kernels": ["kernels"], "radixfleet": ["radixfleet"], "yaml": ["PyYAML"]}
    assert clashes({"kernels", "kernel_bench", "radixfleet", "yaml"}, fake) == {
        "kernels": ["kernels"], "yaml": ["PyYAML"]}


def test_the_old_benchmark_name_clashes_with_the_installed_kernels():
    installed = packages_distributions()
    if "kernels" not in installed:
        pytest.skip("Hugging Face's kernels is not installed here")
    assert clashes({"kernels", "kernel_bench"}, installed) == {"kernels": ["kernels"]}
