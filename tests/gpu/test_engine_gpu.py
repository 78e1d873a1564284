"""The engine on CUDA: models on random weights against HF transformers, the attention
backends against each other, CUDA graphs on vs off.

The tiny models use head dim 128 (what flashinfer's kernels are tuned and compiled for;
one JIT pair serves every test here). Backend agreement is asserted where it is meaningful:

* fp32 (torch_native, triton; flashinfer has no fp32 kernels): identical greedy tokens. The
  triton kernels use ieee fp32 dots, so the backends differ by reassociation only (~1e-6).
* bf16 (all three): teacher-forced top-1 matches HF for >= 95 % of positions with logprobs
  within 5e-2; greedy runs are identical up to the first step whose top-2 margin (bf16
  torch_native, teacher-forced) is a near-tie, where bf16 rounding may legitimately pick
  either token. A divergence at a clear margin fails and prints the step and margin.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from _reference import GPU_BACKENDS, HAS_FLASHINFER, default_model_or_skip  # noqa: E402
from helpers import (  # noqa: E402
    hf_teacher_forced_logprobs,
    make_tiny_model,
    runner_teacher_forced_logprobs,
)

from radixfleet.engine.config import EngineConfig  # noqa: E402
from radixfleet.engine.engine import Engine  # noqa: E402
from radixfleet.engine.executor.model_runner import ModelRunner  # noqa: E402

BACKENDS = ["torch_native", *GPU_BACKENDS]
BF16_BACKENDS = ["torch_native", "triton"] + (["flashinfer"] if HAS_FLASHINFER else [])
NEAR_TIE = 0.1  # top-1 minus top-2 logprob below which bf16 backends may pick differently
PROMPTS = [[5, 17, 99, 3, 250, 8, 41], list(range(10, 200)), [7] * 33, [300, 301]]


def make_model(arch: str, folder: str) -> str:
    """A tiny random-weight model of ``arch`` with head dim 128, saved with transformers.

    transformers' own init (std 0.02): with larger weights (0.08 was tried) the model is so
    ill-conditioned that transformers' bf16 agrees with its own fp32 on only ~93% of top-1
    tokens (measured on CPU), below the 95% bar the bf16 comparison checks."""
    head_dim = 128 if arch in ("qwen3", "qwen3_moe") else None
    return make_tiny_model(arch, folder, std=0.02, hidden_size=512, intermediate_size=512, head_dim=head_dim,
                           router_std=0.6)  # MoE: routing decisive (bf16 vs fp32 rarely swaps experts)


# MoE models run the fused MoE kernels (kernels/fused_moe.py) in every test here.
@pytest.fixture(scope="module", params=["llama3", "qwen3", "qwen2", "qwen3_moe", "qwen2_moe", "mixtral", "phi3"])
def tiny(request, tmp_path_factory):
    return request.param, make_model(request.param, str(tmp_path_factory.mktemp(request.param)))


def runner(folder: str, backend: str, dtype: str) -> ModelRunner:
    return ModelRunner(EngineConfig(model_path=folder, dtype=dtype, attention_backend=backend,
                                    max_total_tokens=2048, disable_cuda_graph=True,
                                    skip_tokenizer_init=True), folder)


def greedy(folder: str, dtype: str = "bfloat16", **kwargs) -> list[list[int]]:
    params = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
    with Engine(model_path=folder, dtype=dtype, max_total_tokens=4096, skip_tokenizer_init=True,
                **kwargs) as engine:
        return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=params)]


def logprob_gaps(ours: torch.Tensor, ref: torch.Tensor, ref32: torch.Tensor) -> tuple[float, float, float]:
    """The largest gap between logprobs of HF bf16's top-1 tokens: ours against HF bf16, HF
    bf16 against HF fp32 (the noise floor), ours against HF fp32."""
    chosen = ref.argmax(-1, keepdim=True)

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.gather(-1, chosen) - b.gather(-1, chosen)).abs().max().item()

    return gap(ours, ref), gap(ref, ref32), gap(ours, ref32)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def margin_at(ref_runner: ModelRunner, ids: list[int]) -> float:
    """top-1 minus top-2 logprob for the token after ``ids`` (teacher-forced)."""
    top2 = runner_teacher_forced_logprobs(ref_runner, ids)[-1].topk(2).values
    return float(top2[0] - top2[1])


@pytest.mark.parametrize("fused_qk_norms", [False, True], ids=["default", "fused-qk-norms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_top1_and_logprobs_match_hf(tiny, backend, fused_qk_norms, monkeypatch):
    """``fused_qk_norms`` (RADIXFLEET_FUSE_QK_NORM_ROTARY=1): Qwen3's per-head q/k norms run in
    the rotary + KV-store launch (decode-shaped inputs: test_small_kernels)."""
    arch, folder = tiny
    if fused_qk_norms:
        if arch not in ("qwen3", "qwen3_moe"):
            pytest.skip("per-head q/k norms: Qwen3 families only")
        monkeypatch.setenv("RADIXFLEET_FUSE_QK_NORM_ROTARY", "1")
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = runner_teacher_forced_logprobs(runner(folder, backend, "bfloat16"), ids)
    ref = hf_teacher_forced_logprobs(folder, ids, dtype="bfloat16", device="cuda")
    ref32 = hf_teacher_forced_logprobs(folder, ids, dtype="float32", device="cuda")
    floor = (ref.argmax(-1) == ref32.argmax(-1)).float().mean().item()
    print(f"transformers bf16 vs its fp32 (the noise floor): top-1 agreement {floor:.3f}")
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    diff, gap_floor, ours32 = logprob_gaps(ours, ref, ref32)
    print(f"{torch.cuda.get_device_name()} {arch} {backend}{' fused q/k norms' * fused_qk_norms}: "
          f"top-1 agreement {top1:.3f}, max logprob diff {diff:.4f}, vs HF fp32 {ours32:.4f} "
          f"(HF bf16 vs its fp32: {gap_floor:.4f})")
    assert top1 >= 0.95
    # The largest of 300 gaps: where routing near-ties flip an expert (MoE; Mixtral with
    # flashinfer measured 0.054 on an H100), being as close to fp32 as HF's bf16 is also passes.
    assert diff < 5e-2 or ours32 <= 2 * gap_floor


def test_fp32_backends_give_identical_greedy_tokens(tiny):
    """Regression for the old xfail (issue 7): in bf16 triton and torch_native parted at
    near-ties; in fp32 with ieee dots they must not part at all."""
    arch, folder = tiny
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    lp = {b: runner_teacher_forced_logprobs(runner(folder, b, "float32"), ids)
          for b in ("torch_native", "triton")}
    lp_diff = (lp["triton"] - lp["torch_native"]).abs().max().item()
    print(f"{arch} fp32 triton vs torch_native: max teacher-forced logprob diff {lp_diff:.2e}")
    assert lp_diff < 1e-3, "fp32 triton attention is not fp32-accurate (tf32 dots?)"
    outs = {b: greedy(folder, "float32", attention_backend=b, disable_cuda_graph=True)
            for b in ("torch_native", "triton")}
    ref_runner = runner(folder, "torch_native", "float32")
    for p, a, b in zip(PROMPTS, outs["triton"], outs["torch_native"], strict=True):
        j = first_divergence(a, b)
        if j is not None:
            m = margin_at(ref_runner, p + b[:j])
            pytest.fail(f"{arch} fp32: triton and torch_native part at step {j} of prompt "
                        f"{p[:5]}... ({a[j]} vs {b[j]}), fp32 top-2 margin {m:.2e}")


def test_bf16_backends_agree_up_to_near_ties(tiny):
    arch, folder = tiny
    outs = {b: greedy(folder, "bfloat16", attention_backend=b, disable_cuda_graph=True)
            for b in BF16_BACKENDS}
    ref_runner = runner(folder, "torch_native", "bfloat16")
    ties = []
    for b in BF16_BACKENDS[1:]:
        for p, got, want in zip(PROMPTS, outs[b], outs["torch_native"], strict=True):
            j = first_divergence(got, want)
            if j is None:
                continue
            m = margin_at(ref_runner, p + want[:j])
            print(f"{arch} bf16 {b} vs torch_native: part at step {j}, top-2 margin {m:.3f}")
            assert m < NEAR_TIE, (f"{arch} bf16: {b} and torch_native part at step {j} "
                                  f"({got[j]} vs {want[j]}) where the margin is {m:.3f}")
            ties.append(j)
    print(f"{arch} bf16: {len(ties)} of {len(PROMPTS) * (len(BF16_BACKENDS) - 1)} runs part, all at near-ties")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graphs_on_and_off_give_identical_greedy_output(tiny, backend):
    _, folder = tiny
    eager = greedy(folder, attention_backend=backend, disable_cuda_graph=True)
    graphed = greedy(folder, attention_backend=backend, cuda_graph_max_bs=8)
    assert graphed == eager


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_batch1_decode_matches_hf(tiny, backend):
    """One request decodes at batch 1, replayed from a CUDA graph: the GEMVs with the RMSNorms
    and the SiLU-mul folded in, rotary + KV store in one launch and (triton) the one-launch
    decode attention. Each generated token against HF teacher-forced on the same sequence:
    the token's logprob within 5e-2 of HF's, and wherever HF would pick another token, that
    token is a near-tie (HF's best within NEAR_TIE of ours). Greedy runs of these random
    models pass through near-ties (llama3: ~8 % of steps, the same with the fused kernels
    off), so a bug shows as a clear margin or a logprob gap, not as a top-1 rate."""
    arch, folder = tiny
    prompt = PROMPTS[1]
    params = {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}
    with Engine(model_path=folder, dtype="bfloat16", attention_backend=backend,
                max_total_tokens=4096, skip_tokenizer_init=True) as engine:
        out = engine.generate(input_ids=prompt, sampling_params=params, return_logprob=True)
    ids = torch.tensor(out["output_ids"])
    ours = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
    ref = hf_teacher_forced_logprobs(folder, prompt + ids.tolist(), dtype="bfloat16",
                                     device="cuda")[len(prompt) - 1:-1]
    chosen = ref.gather(-1, ids[:, None])[:, 0]  # HF's logprob of the token we generated
    gap = (ref.max(-1).values - chosen).max().item()
    top1 = (ref.argmax(-1) == ids).float().mean().item()
    diff = (ours - chosen).abs().max().item()
    print(f"{torch.cuda.get_device_name()} {arch} {backend} batch-1 decode: top-1 agreement "
          f"{top1:.3f}, largest HF margin over our token {gap:.4f}, max logprob diff {diff:.4f}")
    assert len(ids) == 64
    assert gap < NEAR_TIE
    assert diff < 5e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_model_bf16_top1_and_logprobs_match_hf(backend):
    """The real weights (SmolLM2-135M-Instruct) on a real text, teacher-forced: top-1 >= 95 %
    of HF bf16's, logprobs of HF's choices within 5e-2."""
    from transformers import AutoTokenizer

    folder = default_model_or_skip()
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
            "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
            "from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece "
            "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution.")
    ids = AutoTokenizer.from_pretrained(folder).encode(text)
    ours = runner_teacher_forced_logprobs(runner(folder, backend, "bfloat16"), ids)
    ref = hf_teacher_forced_logprobs(folder, ids, dtype="bfloat16", device="cuda")
    ref32 = hf_teacher_forced_logprobs(folder, ids, dtype="float32", device="cuda")
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    diff, floor, ours32 = logprob_gaps(ours, ref, ref32)
    print(f"{torch.cuda.get_device_name()} default model {backend}: {len(ids)} positions, top-1 agreement "
          f"{top1:.3f}, max logprob diff vs HF bf16 {diff:.4f}, vs HF fp32 {ours32:.4f} (HF bf16 vs "
          f"its fp32, the noise floor: {floor:.4f})")
    assert top1 >= 0.95
    # This model's logits reach 20-30, where bf16 steps are 0.125: HF's own bf16 is 0.08 from
    # its fp32 (measured on an H200), and two bf16 implementations' rounding errors add, so
    # the bound is 5e-2 or twice that floor, whichever is larger.
    assert diff < 5e-2 or ours32 <= 2 * floor


def test_default_model_backends_agree():
    """The default model (SmolLM2-135M, head dim 64, GQA 3) when it can be prepared here."""
    folder = default_model_or_skip()
    outs = {b: greedy(folder, "float32", attention_backend=b, disable_cuda_graph=True)
            for b in ("torch_native", "triton")}
    assert outs["triton"] == outs["torch_native"]
    # NEAR_TIE (0.1) suits the tiny models' O(1) logits; this model's reach 20-30, where one
    # bf16 step is 0.125: backends may part where the top-2 margin is within 4 such steps.
    near_tie = 0.5
    if HAS_FLASHINFER:
        ref_runner = runner(folder, "triton", "bfloat16")
        fi = greedy(folder, "bfloat16", attention_backend="flashinfer")
        tr = greedy(folder, "bfloat16", attention_backend="triton")
        for p, a, b in zip(PROMPTS, fi, tr, strict=True):
            j = first_divergence(a, b)
            if j is not None:
                m = margin_at(ref_runner, p + b[:j])
                print(f"default model bf16 flashinfer vs triton: part at step {j}, margin {m:.3f}")
                assert m < near_tie


def test_overlap_schedule_on_and_off_give_identical_output(tiny):
    """The overlap schedule (a step's tokens are processed while the next step runs) gives
    the same tokens and finish reasons, also for requests that stop on a token mid-batch
    (their in-flight token is dropped). fp32, so batch-size-dependent GEMM rounding cannot
    flip a token."""
    _, folder = tiny
    base = greedy(folder, "float32", attention_backend="triton")
    # Each request stops at the token it would produce at step 3 + 2i (or runs to its limit).
    params = [{"temperature": 0, "max_new_tokens": 20 + 7 * i, "stop_token_ids": [out[3 + 2 * i]],
               "ignore_eos": True} for i, out in enumerate(base)]
    results = {}
    for overlap in (False, True):
        with Engine(model_path=folder, dtype="float32", attention_backend="triton", max_total_tokens=4096,
                    skip_tokenizer_init=True, disable_overlap_schedule=not overlap) as engine:
            assert engine.get_server_info()["overlap_schedule"] is overlap
            outs = engine.generate(input_ids=PROMPTS * 4, sampling_params=params * 4)
        results[overlap] = [(o["output_ids"], o["meta_info"]["finish_reason"]) for o in outs]
    assert results[True] == results[False]
    assert any(reason["type"] == "stop" for _, reason in results[True])


def test_cuda_graphs_with_chunked_prefills_at_the_running_cap(tmp_path):
    """Three times more requests than ``max_running_requests`` and prompts longer than the
    prefill chunk: a request part-way through its chunked prefill holds a running slot, so
    no decode batch outgrows the largest captured graph, and the triton backend's graph
    scratch never moves (it once did: a 257-request batch reallocated it under the graphs,
    which then wrote attention partials into freed memory). Graphed output equals eager
    output; fp32, so padding a batch to its graph size cannot flip a token."""
    folder = make_model("llama3", str(tmp_path))
    prompts = [[(7 * i + j) % 400 + 3 for j in range(40 + 13 * i)] for i in range(12)]
    params = [{"temperature": 0, "max_new_tokens": 8 + 5 * i, "ignore_eos": True} for i in range(12)]
    results = {}
    for graphs in (False, True):
        with Engine(model_path=folder, dtype="float32", attention_backend="triton", max_total_tokens=4096,
                    skip_tokenizer_init=True, max_running_requests=4, chunked_prefill_size=64,
                    cuda_graph_max_bs=4, disable_cuda_graph=not graphs) as engine:
            outs = engine.generate(input_ids=prompts, sampling_params=params)
            state = engine.get_server_info()["internal_states"][0]
        results[graphs] = [o["output_ids"] for o in outs]
        assert state["peak_running_requests"] <= 4
    assert [len(o) for o in results[True]] == [p["max_new_tokens"] for p in params]
    assert results[True] == results[False]
