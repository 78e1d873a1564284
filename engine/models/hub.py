"""Models from the Hugging Face Hub: a ``model_path`` of the form ``org/name`` names a repo.

``download_model`` fetches what the engine reads (safetensors weights, config, tokenizer and
chat-template files; never ``.bin``/``.pth``/``.gguf``/ONNX copies) through huggingface_hub,
with its progress bar, into the Hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``) or a
``cache_dir``, and returns the snapshot folder. Downloads resume: a file cut off part-way
continues from where it stopped, and files already in the cache are never fetched again, so
running it twice (or in several processes at once: huggingface_hub locks each file) is safe.

``HF_TOKEN`` authenticates, ``HF_ENDPOINT`` points at a mirror, and ``HF_HUB_OFFLINE=1``
answers from the cache alone. They are read at each call, not at import as huggingface_hub
does, so that a process can set them after importing it.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
CONFIG_PATTERNS = ["*.json", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken"]
WEIGHT_PATTERNS = ["*.safetensors"]
# Llama and Mistral repos also carry their original checkpoints next to the HF ones.
IGNORE_PATTERNS = ["original/*", "consolidated*.safetensors"]


class HubError(OSError):
    """A Hub model that cannot be had; the message names the repo and what to do."""


def is_repo_id(path: str) -> bool:
    """``org/name`` (that is not a local path, which the caller checks first)."""
    return bool(REPO_ID_RE.match(path)) and not path.startswith((".", "/"))


def hub_cache_dir() -> str:
    explicit = os.environ.get("HF_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def allow_patterns(weights: bool = True) -> list[str]:
    return CONFIG_PATTERNS + (WEIGHT_PATTERNS if weights else [])


def download_model(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                   weights: bool = True) -> str:
    """The local snapshot folder of ``repo_id`` at ``revision`` (default ``main``), downloaded
    into ``cache_dir`` (default: the Hub cache) if needed; ``weights=False`` skips the weights.
    Raises ``HubError``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not is_repo_id(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id (org/name)")
    revision = revision or DEFAULT_REVISION
    cache = cache_dir or hub_cache_dir()
    if not offline():
        logger.info("fetching %s (revision %s) from %s into %s", repo_id, revision, endpoint(), cache)
    try:
        return snapshot_download(
            repo_id, revision=revision, cache_dir=cache, endpoint=endpoint(),
            token=os.environ.get("HF_TOKEN") or None, local_files_only=offline(),
            allow_patterns=allow_patterns(weights), ignore_patterns=IGNORE_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        raise HubError(_explain(e, repo_id, revision, cache)) from e


def _explain(err: Exception, repo: str, revision: str, cache: str) -> str:
    """What went wrong, and what to do about it."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo} (revision {revision})"
    if offline() and isinstance(err, LocalEntryNotFoundError):
        return (f"HF_HUB_OFFLINE is set and {where} is not complete in the cache {cache}: download it "
                f"first with network access (radixfleet model download {repo} --revision {revision} "
                f"--cache-dir {cache}), or unset HF_HUB_OFFLINE")
    cause = err.__cause__ if isinstance(err, LocalEntryNotFoundError) and err.__cause__ else err
    if isinstance(cause, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r} on {endpoint()}: name a branch, tag or commit that exists"
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        status = cause.response.status_code
        if status in (401, 403):
            return (f"{endpoint()} refused access to {repo} ({status}) with {token_source()}: the repo is "
                    "gated or private (or does not exist); set HF_TOKEN to a token that has access to it "
                    "(and accept the model's terms on its Hub page)")
        if status == 404:
            return (f"{repo} was not found on {endpoint()} (404): check the repo id, or set HF_TOKEN if "
                    "it is private")
    if isinstance(err, LocalEntryNotFoundError):
        return (f"could not reach {endpoint()} for {where} ({cause.__class__.__name__}: {cause}), and it "
                f"is not in the cache {cache}")
    return f"downloading {where} from {endpoint()} failed: {err}"


def token_source() -> str:
    """Which token a request carries, masked: for messages."""
    token = os.environ.get("HF_TOKEN")
    if token:
        shown = f"{token[:3]}...{token[-4:]}" if len(token) > 10 else "***"
        return f"the token in HF_TOKEN ({shown})"
    from huggingface_hub import get_token

    return "the token saved by `hf auth login`" if get_token() else "no token (HF_TOKEN is not set)"
