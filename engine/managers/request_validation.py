"""Checks on a tokenized generate request before it joins the scheduler's queue: a request
that fails one gets a ``ReqError`` with the returned reason; nothing else is affected."""

from __future__ import annotations

from radixfleet.engine.config import EngineConfig
from radixfleet.engine.executor.model_runner import ModelRunner
from radixfleet.engine.managers.io_struct import TokenizedGenerateReq
from radixfleet.engine.sampling.custom_logit_processor import load_processor
from radixfleet.engine.sampling.grammar import grammar_key


def validate_request(msg: TokenizedGenerateReq, runner: ModelRunner, config: EngineConfig,
                     generation_defaults: dict) -> str | None:
    """Why ``msg`` cannot run on this engine; None when it can. Applies the model's
    generation defaults to its sampling parameters."""
    n, ctx = len(msg.input_ids), runner.context_len
    if n == 0:
        return "the prompt is empty"
    if n >= ctx:
        return f"the prompt has {n} tokens; the context length is {ctx}"
    if n > runner.max_total_tokens - 1:
        return f"the prompt has {n} tokens; the KV cache holds {runner.max_total_tokens}"
    vocab = runner.model_config.vocab_size
    if any(not 0 <= t < vocab for t in msg.input_ids):
        return f"input_ids contain token ids outside the vocabulary [0, {vocab})"
    if any(not 0 <= t < vocab for t in msg.options.token_ids_logprob or ()):
        return f"token_ids_logprob contains token ids outside the vocabulary [0, {vocab})"
    if msg.options.lora_path:
        if runner.lora is None:
            return "lora_path needs an engine started with enable_lora (or lora_paths)"
        try:
            runner.lora.index_of(msg.options.lora_path)
        except ValueError as e:
            return str(e)
    return _validate_sampling(msg, config, generation_defaults)


def _validate_sampling(msg: TokenizedGenerateReq, config: EngineConfig, generation_defaults: dict) -> str | None:
    params = msg.sampling_params
    try:
        params.apply_defaults(generation_defaults)
    except ValueError as e:
        return str(e)
    processor = msg.options.custom_logit_processor
    if processor:
        if not config.enable_custom_logit_processor:
            return ("custom_logit_processor is disabled; start the engine with "
                    "enable_custom_logit_processor=True to accept it (it runs client code)")
        try:
            load_processor(processor)
        except ValueError as e:
            return str(e)
    if grammar_key(params) is not None and config.skip_tokenizer_init:
        return "json_schema, regex and ebnf need the tokenizer (skip_tokenizer_init is set)"
    return None
