"""radixfleet: LLM serving from a laptop to a Kubernetes fleet.

Subpackages: ``radixfleet.engine`` (SGLang-compatible inference engine),
``radixfleet.router`` (cache-aware load balancer), ``radixfleet.kernels`` (triton and C
kernels), ``radixfleet.operator`` (kopf operator for ``InferenceService``).
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _drop_repo_root_from_path() -> None:
    """This folder is the ``radixfleet`` package, never an import root. It lands on
    ``sys.path`` when Python runs from a checkout (``python -m pytest``, ``python -m
    radixfleet``), where its subfolders would shadow top-level packages of the same name:
    ``kernels/`` hides Hugging Face's ``kernels`` (which transformers imports) and
    ``operator/`` the standard library's ``operator``. Those two names are the project's fixed
    layout; ``tests/unit/test_import_names.py`` runs the shadowing case."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != here]


_drop_repo_root_from_path()


def __getattr__(name: str):
    # `radixfleet.Engine` without importing torch at package import time.
    if name == "Engine":
        from radixfleet.engine.engine import Engine

        return Engine
    raise AttributeError(name)
