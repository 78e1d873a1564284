"""The engine on CUDA: bf16 models on random weights against HF transformers, the attention
backends against each other, CUDA graphs on vs off."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from helpers import (  # noqa: E402
    hf_teacher_forced_logprobs,
    make_tiny_model,
    runner_teacher_forced_logprobs,
)

from radixfleet.engine.config import EngineConfig  # noqa: E402
from radixfleet.engine.engine import Engine  # noqa: E402
from radixfleet.engine.model_runner import ModelRunner  # noqa: E402

BACKENDS = ["torch_native", "triton"]


@pytest.fixture(scope="module", params=["llama3", "qwen3", "qwen2"])
def tiny(request, tmp_path_factory):
    return request.param, make_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_top1_and_logprobs_match_hf(tiny, backend):
    arch, folder = tiny
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    runner = ModelRunner(EngineConfig(model_path=folder, dtype="bfloat16", attention_backend=backend,
                                      max_total_tokens=2048, disable_cuda_graph=True,
                                      skip_tokenizer_init=True), folder)
    ours = runner_teacher_forced_logprobs(runner, ids)
    ref = hf_teacher_forced_logprobs(folder, ids, dtype="bfloat16", device="cuda")
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    chosen = ref.argmax(-1, keepdim=True)
    diff = (ours.gather(-1, chosen) - ref.gather(-1, chosen)).abs().max().item()
    print(f"{torch.cuda.get_device_name()} {arch} {backend}: top-1 agreement {top1:.3f}, "
          f"max logprob diff {diff:.4f}")
    assert top1 >= 0.95
    assert diff < 5e-2


def greedy(folder: str, **kwargs) -> list[list[int]]:
    prompts = [[5, 17, 99, 3, 250, 8, 41], list(range(10, 200)), [7] * 33, [300, 301]]
    params = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
    with Engine(model_path=folder, dtype="bfloat16", max_total_tokens=4096, skip_tokenizer_init=True,
                **kwargs) as engine:
        return [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]


@pytest.mark.xfail(reason="on the H100 (2026-11-23) triton and torch_native disagreed on these "
                          "random-weight bf16 models; not yet diagnosed (see issue 7)", strict=False)
def test_backends_agree_with_each_other(tiny):
    """bf16 kernels round differently, so long greedy runs on random weights may part at a
    near-tie; teacher-forced top-1 must agree almost everywhere, and greedy runs must
    agree on their first tokens."""
    _, folder = tiny
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    lp = {}
    for b in BACKENDS:
        runner = ModelRunner(EngineConfig(model_path=folder, dtype="bfloat16", attention_backend=b,
                                          max_total_tokens=2048, disable_cuda_graph=True,
                                          skip_tokenizer_init=True), folder)
        lp[b] = runner_teacher_forced_logprobs(runner, ids)
    agree = (lp["triton"].argmax(-1) == lp["torch_native"].argmax(-1)).float().mean().item()
    assert agree >= 0.98
    outs = {b: greedy(folder, attention_backend=b, disable_cuda_graph=True) for b in BACKENDS}
    for a, b in zip(outs["triton"], outs["torch_native"], strict=True):
        assert a[:8] == b[:8]


def test_cuda_graphs_on_and_off_give_identical_greedy_output(tiny):
    _, folder = tiny
    eager = greedy(folder, attention_backend="triton", disable_cuda_graph=True)
    graphed = greedy(folder, attention_backend="triton", cuda_graph_max_bs=8)
    assert graphed == eager
