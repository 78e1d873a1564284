"""Sampling on CUDA never waits for the device: building the batch's sampling tensors and
drawing (temperature, top-k / top-p / min-p, seeded rows) run under
``torch.cuda.set_sync_debug_mode("error")``; only the final copy of the ids syncs."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from radixfleet.engine.sampling.params import SamplingParams  # noqa: E402
from radixfleet.engine.sampling.sampler import SamplingBatchInfo, sample  # noqa: E402

V = 32000
MIXES = {
    "greedy": [{"temperature": 0}, {"top_k": 1}],
    "plain": [{}, {"temperature": 0.7}],
    "top_k_only": [{"top_k": 20}, {"top_k": 5, "top_p": 0.9}],  # the top-k window path
    "mixed": [{"top_p": 0.9}, {"top_k": 50, "min_p": 0.05}, {}, {"temperature": 0},
              {"seed": 7, "top_p": 0.8}, {"min_p": 0.2, "seed": 3}],
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_sampling_does_not_sync(mix):
    params = [SamplingParams.from_dict(p) for p in MIXES[mix]]
    logits = torch.randn(len(params), V, device="cuda") * 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    sample(logits, SamplingBatchInfo.build(params, V, "cuda", list(range(len(params)))), gen)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        info = SamplingBatchInfo.build(params, V, "cuda", list(range(len(params))))
        ids = sample(logits, info, gen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ids = ids.tolist()  # the one sync of a step
    assert all(0 <= i < V for i in ids)


def test_cuda_filters_match_the_cpu_filters():
    """The sync-free CUDA filter keeps the same tokens as the CPU one."""
    from radixfleet.engine.sampling.sampler import filter_probs

    params = [SamplingParams.from_dict(p) for p in MIXES["mixed"]]
    probs = torch.softmax(torch.randn(len(params), V, generator=torch.Generator().manual_seed(1)) * 3, -1)
    cpu = filter_probs(probs, SamplingBatchInfo.build(params, V, "cpu"))
    gpu = filter_probs(probs.cuda(), SamplingBatchInfo.build(params, V, "cuda")).cpu()
    assert torch.equal(cpu > 0, gpu > 0)
    torch.testing.assert_close(gpu, cpu)


def test_seeded_rows_repeat_on_cuda():
    params = [SamplingParams.from_dict({"seed": 11, "top_p": 0.9})] * 2
    logits = torch.zeros(2, V, device="cuda")
    draws = [sample(logits, SamplingBatchInfo.build(params, V, "cuda", [k, k])).tolist() for k in range(5)]
    assert all(a == b for a, b in draws)
    assert len({a for a, _ in draws}) > 1


def test_penalties_and_min_new_tokens_do_not_sync():
    """The whole pipeline for requests with frequency / presence / repetition penalties and
    a min_new_tokens floor: after a first step (which builds the penalty rows) no step waits
    for the device, so the overlap schedule keeps the GPU busy for them too."""
    from radixfleet.engine.managers.request import Req
    from radixfleet.engine.sampling.pipeline import SamplingPipeline

    specs = [{"frequency_penalty": 0.5}, {"presence_penalty": 0.3, "repetition_penalty": 1.2},
             {"min_new_tokens": 5, "stop_token_ids": [7]}, {"temperature": 0}, {"top_p": 0.9, "seed": 1}]
    reqs = []
    for i, spec in enumerate(specs):
        req = Req(f"r{i}", [3, 4, 5 + i], SamplingParams.from_dict(spec))
        req.row, req.output_ids = i, [9, 9]
        reqs.append(req)
    pipe = SamplingPipeline(V, 8, torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0), (2,))
    logits = torch.randn(len(reqs), V, device="cuda") * 3
    hidden = torch.zeros(len(reqs), 16, device="cuda")
    pipe.sample(reqs, logits.clone(), hidden)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = pipe.sample(reqs, logits.clone(), hidden)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ids = ids.tolist()
    assert ids[2] not in (2, 7)  # below min_new_tokens: neither EOS nor the stop token
