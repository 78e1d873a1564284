"""Per-request sampling parameters with SGLang's names, defaults and ranges."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

_TOP_K_ALL = -1  # top_k = -1 means "no top-k cut"
# Limits on what one request may ask for (400 above them): every stop string is searched for
# in the output's tail after each token. MAX_N (n copies are n requests in the batch) bounds
# the HTTP routes; Python callers are trusted with more (a sampling test draws 2,000).
MAX_N = 128
MAX_STOP_STRS = 1024
MAX_STOP_STR_CHARS = 256
# Keys SGLang takes from the model's generation_config.json when the user omits them.
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def load_generation_defaults(model_path: str) -> dict[str, Any]:
    """Sampling defaults from ``generation_config.json`` (only the keys SGLang uses)."""
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        gen = json.load(f)
    if gen.get("do_sample") is False:
        return {}  # the model asks for greedy decoding by default: keep SGLang's defaults
    return {k: gen[k] for k in GENERATION_DEFAULT_KEYS if gen.get(k) is not None}


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = _TOP_K_ALL
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    logit_bias: dict[str, float] | None = None
    custom_params: dict[str, Any] | None = None
    stream_interval: int | None = None
    # Filled by the tokenizer manager, not by users.
    stop_strs: list[str] = field(default_factory=list, repr=False)
    # Names the user set explicitly; the others may take the model's generation defaults.
    explicit: frozenset[str] = field(default_factory=frozenset, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        d = dict(d or {})
        known = {f.name for f in fields(cls)} - {"stop_strs", "explicit"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(known))}")
        if "sampling_seed" in d:  # SGLang's alias
            d["seed"] = d.pop("sampling_seed")
        params = cls(**d, explicit=frozenset(d))
        params.normalize()
        params.verify()
        return params

    def normalize(self) -> None:
        if self.stop is None:
            self.stop_strs = []
        elif isinstance(self.stop, str):
            self.stop_strs = [self.stop]
        else:
            self.stop_strs = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.temperature < 1e-6 and self.temperature >= 0:
            # Greedy: equivalent to top_k = 1 (SGLang's convention).
            self.temperature = 1.0
            self.top_k = 1
        if self.top_k == 0:
            self.top_k = _TOP_K_ALL

    def apply_defaults(self, defaults: dict[str, Any]) -> None:
        """Take the model's defaults for the keys the user did not set (SGLang's
        ``--sampling-defaults model``), then normalise and verify again."""
        greedy = self.is_greedy  # an explicit greedy request stays greedy
        changed = False
        for key, value in defaults.items():
            if key in GENERATION_DEFAULT_KEYS and key not in self.explicit:
                setattr(self, key, value)
                changed = True
        if changed:
            self.normalize()
            if greedy:
                self.temperature, self.top_k = 1.0, 1
            self.verify()

    def verify(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if self.temperature < 0:
            raise bad("temperature", "non-negative")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if not (self.top_k == _TOP_K_ALL or self.top_k >= 1):
            raise bad("top_k", "-1 (disabled) or at least 1")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if not 0 < self.repetition_penalty <= 2:
            raise bad("repetition_penalty", "in (0, 2]")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise bad("max_new_tokens", "non-negative")
        if self.min_new_tokens < 0:
            raise bad("min_new_tokens", "non-negative")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                             f"max_new_tokens ({self.max_new_tokens})")
        if self.n < 1:
            raise bad("n", "at least 1")
        grammars = [k for k in ("json_schema", "regex", "ebnf") if getattr(self, k) is not None]
        if len(grammars) > 1:
            raise ValueError(f"only one of json_schema, regex, ebnf may be set, got {grammars}")
        if any(not isinstance(s, str) or not s for s in self.stop_strs):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(self.stop_strs) > MAX_STOP_STRS or any(len(s) > MAX_STOP_STR_CHARS for s in self.stop_strs):
            raise ValueError(f"stop takes at most {MAX_STOP_STRS} strings of at most {MAX_STOP_STR_CHARS} "
                             f"characters each, got {len(self.stop_strs)} (longest "
                             f"{max(map(len, self.stop_strs))} characters)")
        if any(not isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of integers")
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise ValueError("custom_params must be a dict")
        if self.logit_bias is not None:
            try:
                {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError("logit_bias must map token ids to floats") from None

    @property
    def is_greedy(self) -> bool:
        return self.top_k == 1
