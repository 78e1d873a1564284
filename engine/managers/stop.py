"""When a request is finished: EOS, stop token ids, stop strings, length, context limit."""

from __future__ import annotations

from radixfleet.engine.config import EngineConfig
from radixfleet.engine.managers.request import Req
from radixfleet.engine.models.model_config import ModelConfig


class StopChecker:
    def __init__(self, config: EngineConfig, model_path: str, model_config: ModelConfig):
        self.eos_ids = set(model_config.eos_token_ids)
        self.context_len = config.context_length or model_config.max_position_embeddings
        self._tokenizer = None
        self._tokenizer_path = config.tokenizer_path or model_path
        self._trust_remote_code = config.trust_remote_code
        self.skip = config.skip_tokenizer_init

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self._tokenizer_path, trust_remote_code=self._trust_remote_code)
        return self._tokenizer

    def check(self, req: Req) -> None:
        """Set ``req.finished_reason`` if the token just appended ends the request."""
        p = req.params
        tok = req.output_ids[-1]
        n = len(req.output_ids)
        if n >= p.min_new_tokens:
            if tok in p.stop_token_ids:
                return req.finish("stop", tok)
            if not p.ignore_eos and tok in self.eos_ids:
                return req.finish("stop", tok)
            if p.stop_strs and not self.skip:
                # A stop string of L characters spans at most L tokens (plus a partial one).
                tail_len = max(len(s) for s in p.stop_strs) + 1
                tail = self.tokenizer.decode(req.output_ids[-tail_len:])
                for s in p.stop_strs:
                    if s in tail:
                        return req.finish("stop", s)
        if self.at_length_limit(req, n):
            return req.finish("length")
        return None

    def at_length_limit(self, req: Req, generated: int) -> bool:
        """Whether ``generated`` output tokens end the request by length (``max_new_tokens``
        or the context); the scheduler asks with its pending tokens counted."""
        limit = req.params.max_new_tokens
        return (limit is not None and generated >= limit) or len(req.input_ids) + generated >= self.context_len
