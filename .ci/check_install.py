"""Checks an installed radixfleet from the outside: a wheel in a virtualenv
(tests/integration/test_wheel_install.py) or the container image (.ci/build-images).

    python check_install.py [--optional MODULE ...] [--require MODULE ...]

Imports every module of the installed package (pkgutil.walk_packages), and finds the package
data (shipped model configs, the CPU kernels' C source) where the package is installed.
A module may fail to import only with ModuleNotFoundError for an ``--optional`` name (the
`gpu` extra's ``flashinfer`` on CPU installs); every ``--require`` module must import.
Prints one JSON line (the report); exits 1 with the reasons when a check fails.
Run it from a folder that holds no radixfleet checkout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import shutil
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optional", nargs="*", default=[], help="top-level modules that may be missing")
    parser.add_argument("--require", nargs="*", default=[], help="modules that must import")
    args = parser.parse_args()

    import radixfleet

    package_dir = os.path.dirname(os.path.abspath(radixfleet.__file__))
    failed: dict[str, str] = {}

    def onerror(name: str) -> None:
        failed[name] = repr(sys.exc_info()[1])

    for info in pkgutil.walk_packages(radixfleet.__path__, "radixfleet.", onerror=onerror):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:
            failed[info.name] = f"missing:{e.name}"
        except Exception as e:  # any other import error is a failure, reported below
            failed[info.name] = repr(e)
    for name in args.require:
        try:
            importlib.import_module(name)
        except Exception as e:  # reported below
            failed[name] = repr(e)

    from radixfleet.engine.models.configs import NAMES, config_dir

    modules = {k: getattr(m, "__file__", None) for k, m in sys.modules.items()
               if k == "radixfleet" or k.startswith("radixfleet.")}
    cpu_ops = next(m for k, m in sys.modules.items() if k.startswith("radixfleet.") and k.endswith(".cpu_ops"))
    report = {
        "radixfleet": radixfleet.__file__,
        "modules": modules,
        "failed": failed,
        "finders": [f"{type(f).__module__}.{type(f).__qualname__}" for f in sys.meta_path],
        "configs": {n: config_dir(n) for n in NAMES},
        "cpu_kernels_built": cpu_ops.load() is not None,
    }
    print(json.dumps(report))

    problems = []
    optional = set(args.optional)
    for name, why in failed.items():
        if not (why.startswith("missing:") and why.removeprefix("missing:").split(".")[0] in optional):
            problems.append(f"{name} does not import: {why}")
    outside = {k: f for k, f in modules.items() if f and not f.startswith(package_dir + os.sep)}
    if outside:
        problems.append(f"modules imported from outside {package_dir}: {outside}")
    if any("editable" in f for f in report["finders"]):
        problems.append(f"an editable install's import hook is active: {report['finders']}")
    for name, folder in report["configs"].items():
        if not (folder.startswith(package_dir) and os.path.isfile(os.path.join(folder, "config.json"))):
            problems.append(f"shipped config {name!r} not found in the installed package ({folder})")
    if (shutil.which("cc") or shutil.which("gcc")) and not report["cpu_kernels_built"]:
        problems.append("the CPU kernels' C source was not found or did not build")
    for p in problems:
        print(f"check_install: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
