"""Build script for the ``radixfleet`` distribution.

The repository root *is* the ``radixfleet`` package (``package-dir`` in pyproject.toml), so the
package list is derived here instead of being written by hand: every folder with an
``__init__.py`` ships, except the folders in ``NOT_SHIPPED``. (A hand-written list once left
``radixfleet.engine.attention`` out of the wheel: issue #17.)
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

NOT_SHIPPED = ("tests", "benchmarks", "examples", "grafana", "charts", "crds", "build", "dist")


class BuildPy(build_py):
    """Keeps this script out of the wheel: it sits in the package's own folder."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir)
                if (m[0], m[1]) != ("radixfleet", "setup")]


setup(
    packages=["radixfleet", *(f"radixfleet.{name}" for name in find_packages(
        ".", exclude=[p for top in NOT_SHIPPED for p in (top, f"{top}.*")]))],
    cmdclass={"build_py": BuildPy},
)
