"""Decoder embedding models on CUDA (#22 item 5): the packed extend step through the triton
backend (and flashinfer), last-token pooling + L2, against transformers' hidden states on
the same GPU. fp32: within 1e-4 (triton's fp32 dots are ieee); bf16: cosine >= 0.999 with
transformers' bf16. A ``Qwen2ForCausalLM`` served with ``is_embedding`` and a
``MistralModel`` with a 16-token sliding window; prompts of 3 to 300 tokens in one batch."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from _reference import GPU_BACKENDS  # noqa: E402
from helpers import make_tiny_model  # noqa: E402

from radixfleet import Engine  # noqa: E402

_gen = torch.Generator().manual_seed(5)
IDS = [torch.randint(1, 512, (n,), generator=_gen).tolist() for n in (3, 40, 300, 17)]


@pytest.fixture(scope="module", params=["qwen2", "mistral_base"])
def folder(request, tmp_path_factory):
    import transformers

    path = str(tmp_path_factory.mktemp(request.param))
    if request.param == "qwen2":
        return make_tiny_model("qwen2", path, std=0.02, hidden_size=512, intermediate_size=512)
    config = transformers.MistralConfig(vocab_size=512, hidden_size=512, intermediate_size=512,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, sliding_window=16)
    torch.manual_seed(0)
    transformers.MistralModel(config).save_pretrained(path)
    return path


def hf_embeddings(folder: str, dtype: torch.dtype) -> torch.Tensor:
    import transformers

    model = transformers.AutoModel.from_pretrained(folder, dtype=dtype).cuda().eval()
    with torch.no_grad():
        rows = [model(torch.tensor([ids], device="cuda")).last_hidden_state[0, -1].float() for ids in IDS]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1).cpu()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_last_token_embeddings_match_hf_on_cuda(folder, dtype, backend):
    if backend == "flashinfer" and dtype == "float32":
        pytest.skip("flashinfer has no fp32 kernels")
    with Engine(model_path=folder, is_embedding=True, dtype=dtype, attention_backend=backend,
                skip_tokenizer_init=True) as engine:
        got = torch.tensor([o["embedding"] for o in engine.encode(input_ids=IDS)])
    want = hf_embeddings(folder, getattr(torch, dtype))
    if dtype == "float32":
        assert (got - want).abs().max().item() < 1e-4
    else:
        cos = (got * want).sum(-1)
        print(f"{torch.cuda.get_device_name()} {backend} bf16 cosine to transformers: {cos.tolist()}")
        assert cos.min().item() >= 0.999
