"""GPU tests: kernels against plain-torch references, the triton backend against a reference backend.

Every module here skips itself with the reason "needs a CUDA GPU" when torch sees no CUDA
device (CI), and every item gets the ``gpu`` marker. ``_reference.py`` (shared references)
is importable from the test modules.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
sys.path.insert(0, str(_HERE))
# flashinfer JIT-compiles its kernels on first use into $FLASHINFER_WORKSPACE_BASE/.cache;
# keep that under /tmp unless the caller chose a place (read when flashinfer is imported).
os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/radixfleet-flashinfer")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.gpu)
