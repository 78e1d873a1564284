"""LoRA, weight updates, scoring and embeddings on CUDA, with CUDA graphs on: tiny random
models against HF transformers (fp32, so equality of greedy tokens is meaningful)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from helpers import make_tiny_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from radixfleet.engine.engine import Engine  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 250, 8, 41], list(range(10, 90)), [7] * 33]
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
ENGINE = {"dtype": "float32", "attention_backend": "triton", "max_total_tokens": 4096,
          "skip_tokenizer_init": True, "cuda_graph_max_bs": 8}


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_model("llama3", str(tmp_path_factory.mktemp("llama")), hidden_size=512,
                           intermediate_size=512)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_lora_mixed_batch_with_cuda_graphs_matches_merged_models(llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(hf_model(llama), LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft_model.save_pretrained(str(tmp_path / "a"))
    merged = peft_model.merge_and_unload().eval()
    base = hf_model(llama)
    names = [None, "a", None, "a", "a", None]
    prompts = [PROMPTS[i % 3] for i in range(len(names))]
    with Engine(model_path=llama, lora_paths=[f"a={tmp_path / 'a'}"], **ENGINE) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=names)
        alone = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)  # graphed base decode
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        assert out["output_ids"] == hf_greedy(merged if name else base, prompt, 24), name
    assert alone["output_ids"] == hf_greedy(base, PROMPTS[0], 24)


def test_update_weights_under_cuda_graphs(llama, tmp_path):
    """The captured graphs read the parameters in place, so the new weights take effect."""
    other = str(tmp_path / "b")
    shutil.copytree(llama, other)
    tensors = load_file(f"{other}/model.safetensors")
    gen = torch.Generator().manual_seed(5)
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.08 if v.dim() == 2 else v for k, v in tensors.items()}
    save_file(tensors, f"{other}/model.safetensors", metadata={"format": "pt"})
    with Engine(model_path=llama, allowed_local_paths=[str(tmp_path)], **ENGINE) as engine:
        before = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"]
        ok, message = engine.update_weights_from_disk(other)
        assert ok, message
        after = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"]
    assert before == hf_greedy(hf_model(llama), PROMPTS[0], 24)
    assert after == hf_greedy(hf_model(other), PROMPTS[0], 24) != before


def test_score_matches_hf_next_token_probabilities(llama):
    labels = [3, 50, 400]
    with Engine(model_path=llama, **ENGINE) as engine:
        result = engine.score(PROMPTS[0], [[11, 12], [13]], labels)
    model = hf_model(llama)
    for item, got in zip([[11, 12], [13]], result.scores, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([PROMPTS[0] + item], device="cuda")).logits[0, -1]
        want = torch.softmax(logits.float(), -1)[labels].cpu()
        assert torch.allclose(torch.tensor(got, dtype=torch.float32), want, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bert_embeddings_on_cuda_match_hf(tmp_path, dtype):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    hf = BertModel(BertConfig(vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=256, max_position_embeddings=128)).eval()
    hf.save_pretrained(tmp_path)
    batch = [[2, 17, 33, 9, 4, 3], [2, 5, 3], list(range(2, 100))]
    with Engine(model_path=str(tmp_path), dtype=dtype, skip_tokenizer_init=True) as engine:
        assert engine.get_server_info()["device"].startswith("cuda")
        got = torch.tensor([o["embedding"] for o in engine.encode(input_ids=batch)])
    want = []
    for ids in batch:
        with torch.no_grad():
            want.append(torch.nn.functional.normalize(hf(torch.tensor([ids])).last_hidden_state[0, 0], dim=-1))
    want = torch.stack(want)
    if dtype == "float32":
        assert (got - want).abs().max() < 1e-4
    else:
        assert torch.nn.functional.cosine_similarity(got, want).min() > 0.995
