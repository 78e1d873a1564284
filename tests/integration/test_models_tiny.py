"""Every supported architecture matches HF transformers (fp32, CPU) on tiny random-weight
models: teacher-forced log-probs at every position, and greedy generation through the Engine."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    TINY_ARCHS,
    hf_teacher_forced_logprobs,
    make_tiny_model,
    runner_teacher_forced_logprobs,
)

from radixfleet.engine.config import EngineConfig
from radixfleet.engine.engine import Engine
from radixfleet.engine.executor.model_runner import ModelRunner


@pytest.fixture(scope="module", params=sorted(TINY_ARCHS))
def tiny(request, tmp_path_factory):
    return request.param, make_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


def test_logprobs_match_hf_at_every_position(tiny):
    arch, folder = tiny
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = ModelRunner(EngineConfig(model_path=folder, max_total_tokens=1024, skip_tokenizer_init=True), folder)
    ours = runner_teacher_forced_logprobs(runner, ids)
    ref = hf_teacher_forced_logprobs(folder, ids)
    assert (ours - ref).abs().max().item() < 1e-4, arch
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_generation_matches_hf(tiny):
    import transformers

    arch, folder = tiny
    prompt = [5, 17, 99, 3, 250, 8, 41]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
    with Engine(model_path=folder, max_total_tokens=1024, skip_tokenizer_init=True) as engine:
        out = engine.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 24,
                                                                 "ignore_eos": True})
    assert out["output_ids"] == ref, arch
