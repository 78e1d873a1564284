"""The folders that control calls may read: ``update_weights_from_disk`` and
``load_lora_adapter`` take a path from a client, so they read only under allowed roots.

Roots, all compared after ``os.path.realpath`` (so ``..`` and symlinks cannot leave them):
the model's folder (for a Hub snapshot, the repo's whole cache folder, so another revision
may be swapped in), ``<model folder>/adapters``, the ``lora_paths`` given at start (the
server's operator chose them) and ``allowed_local_paths``. Hub repo ids are not downloaded
by these calls: a path must already be a local folder under a root.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from radixfleet.engine.models.model_prep import ALIASES, EMBEDDING_ALIASES, resolve_model_path

ADAPTERS_DIR = "adapters"


class PathNotAllowed(ValueError):
    """A path outside the allowed roots (HTTP 403)."""


class LocalPathPolicy:
    def __init__(self, roots: Iterable[str]):
        self.roots = tuple(dict.fromkeys(os.path.realpath(r) for r in roots))

    @classmethod
    def for_engine(cls, model_dir: str, lora_paths: Iterable[str] = (),
                   allowed: Iterable[str] = ()) -> LocalPathPolicy:
        """``lora_paths`` entries are ``name=path`` or ``path`` (``EngineConfig.lora_paths``)."""
        real = os.path.realpath(model_dir)
        adapters = [entry.partition("=")[2] or entry for entry in lora_paths]
        roots = [real, os.path.join(model_dir, ADAPTERS_DIR), *adapters, *allowed]
        parent = os.path.dirname(real)
        if os.path.basename(parent) == "snapshots":  # <hub cache>/models--org--name/snapshots/<rev>
            roots.append(os.path.dirname(parent))
        return cls(roots)

    def check(self, path: str, what: str) -> str:
        """``path`` (an alias resolved to its folder) if it lies under a root; else PathNotAllowed."""
        if path in ALIASES or path in EMBEDDING_ALIASES:
            path = resolve_model_path(path)
        real = os.path.realpath(path)
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots):
            raise PathNotAllowed(f"{what} {path!r} is outside the allowed folders (the model's folder, "
                                 f"its {ADAPTERS_DIR}/ folder, lora_paths and allowed_local_paths)")
        return path
