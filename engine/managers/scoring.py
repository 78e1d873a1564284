"""``score``: the probability of given label tokens right after each (query + item) prompt.

Each item becomes one prompt (``query + item``, or ``item + query`` with ``item_first``:
strings are joined as text, token-id lists as ids), generated for one greedy token with
``token_ids_logprob=label_token_ids``; the first output position's label logprobs are the
scores. Prompts share the query, so the radix cache computes it once. Without
``apply_softmax`` a score is the label's probability under the whole vocabulary; with it,
the labels' probabilities renormalised among themselves (SGLang's semantics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCORE_SAMPLING = {"max_new_tokens": 1, "temperature": 0}


@dataclass(frozen=True)
class ScoreResult:
    scores: list[list[float]]  # [item][label]
    prompt_tokens: int  # over every (query + item) prompt


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def score_prompts(query: Any, items: Any, label_token_ids: Any,
                  item_first: bool = False) -> tuple[list[str] | None, list[list[int]] | None]:
    """Validate a score call; return (text prompts, None) or (None, token-id prompts)."""
    if not _is_ids(label_token_ids):
        raise ValueError("label_token_ids must be a non-empty list of token ids")
    if query is None or items is None:
        raise ValueError("score needs a query and items")
    if isinstance(query, str):
        texts = [items] if isinstance(items, str) else items
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("with a text query, items must be a string or a non-empty list of strings")
        prompts = [t + query if item_first else query + t for t in texts]
        if any(not p for p in prompts):
            raise ValueError("a (query + item) prompt is empty")
        return prompts, None
    if _is_ids(query) or query == []:
        if not isinstance(items, list) or not items or not all(_is_ids(t) for t in items):
            raise ValueError("with a token-id query, items must be a non-empty list of token-id lists")
        return None, [t + query if item_first else query + t for t in items]
    raise ValueError("query must be a string or a list of token ids")


def score_result(outs: list[dict], label_token_ids: list[int], apply_softmax: bool) -> ScoreResult:
    """``outs``: the one-token generations of ``score_prompts``' prompts, in order."""
    scores = []
    for out in outs:
        first = out["meta_info"]["output_token_ids_logprobs"][0]
        logprobs = [lp for lp, _, _ in first]
        assert [t for _, t, _ in first] == list(label_token_ids), "label order changed"
        if apply_softmax:
            top = max(logprobs)
            weights = [math.exp(lp - top) for lp in logprobs]
            total = sum(weights)
            scores.append([w / total for w in weights])
        else:
            scores.append([math.exp(lp) for lp in logprobs])
    return ScoreResult(scores, sum(o["meta_info"]["prompt_tokens"] for o in outs))
