"""``GET /tokenizer_files``: this engine's tokenizer as files, for a router that must tokenize
requests exactly as the engine does (the precise policy, ``router/prompt_tokens.py``) but
has no copy of the model (a router pod in Kubernetes).

The files are what ``save_pretrained`` writes for the loaded tokenizer (``tokenizer.json``,
``tokenizer_config.json``, the chat template), base64-encoded, plus the server's
``--chat-template`` override if any. Built once, then served from memory.
"""

from __future__ import annotations

import base64
import os
import tempfile
from typing import Any


def tokenizer_files(tokenizer: Any, chat_template: str | None) -> dict:
    """``{"files": {name: base64}, "chat_template": str | None}``; ValueError without a tokenizer."""
    if tokenizer is None:
        raise ValueError("this engine has no tokenizer (skip_tokenizer_init)")
    with tempfile.TemporaryDirectory(prefix="radixfleet-tok-") as folder:
        tokenizer.save_pretrained(folder)
        files = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                files[name] = base64.b64encode(f.read()).decode()
    return {"files": files, "chat_template": chat_template}
