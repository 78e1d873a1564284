"""BertEmbeddingModel and Pooling (engine/models/bert.py) on a tiny random BERT saved with
transformers, against transformers' own BertModel on the same weights, for each pooling mode
sentence-transformers can select."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixfleet.engine.executor.model_runner import iter_safetensors
from radixfleet.engine.models.bert import BertEmbeddingModel, Pooling
from radixfleet.engine.models.model_config import ModelConfig

BATCH = [[2, 17, 33, 9, 4, 3], [2, 5, 3], [2, 40, 41, 42, 43, 44, 45, 46, 3]]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16)
    hf = BertModel(config, add_pooling_layer=True).eval()
    hf.save_pretrained(folder)
    return str(folder), hf


def hf_hidden(hf, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, batch))
    ids = torch.tensor([row + [0] * (n - len(row)) for row in batch])
    mask = torch.tensor([[1] * len(row) + [0] * (n - len(row)) for row in batch])
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask.bool()


def ours(folder: str) -> BertEmbeddingModel:
    model = BertEmbeddingModel(ModelConfig.from_path(folder))
    model.load_weights(iter_safetensors(folder))
    return model.eval()


def write_pooling(folder: str, mode: str, normalize: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    key = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
           "max": "pooling_mode_max_tokens", "lasttoken": "pooling_mode_lasttoken"}
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({name: name == key[mode] for name in key.values()}, f)


def reference_pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    rows = []
    for h, m in zip(hidden, mask, strict=True):
        real = h[m]
        rows.append({"cls": real[0], "mean": real.mean(0), "max": real.max(0).values, "lasttoken": real[-1]}[mode])
    out = torch.stack(rows)
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def test_without_sentence_transformers_files_pooling_is_normalised_cls(tiny_bert):
    folder, hf = tiny_bert
    assert Pooling.from_folder(folder) == Pooling("cls", True)
    hidden, mask = hf_hidden(hf, BATCH)
    got = ours(folder).embed(BATCH, Pooling.from_folder(folder))
    assert (got - reference_pool(hidden, mask, "cls", True)).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["mean", "max", "lasttoken", "cls"])
@pytest.mark.parametrize("normalize", [True, False])
def test_each_pooling_mode_matches_hf_hidden_states(tiny_bert, tmp_path, mode, normalize):
    src, hf = tiny_bert
    folder = str(tmp_path)
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(folder, name), "wb") as b:
            b.write(a.read())
    write_pooling(folder, mode, normalize)
    pooling = Pooling.from_folder(folder)
    assert pooling == Pooling(mode, normalize)
    hidden, mask = hf_hidden(hf, BATCH)
    got = ours(folder).embed(BATCH, pooling)
    assert (got - reference_pool(hidden, mask, mode, normalize)).abs().max() < 1e-5


def test_weights_under_a_bert_prefix_load_and_missing_ones_are_named(tiny_bert, tmp_path):
    src, hf = tiny_bert
    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({f"bert.{k}": v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    hidden, mask = hf_hidden(hf, BATCH)
    got = ours(str(tmp_path)).embed(BATCH, Pooling("mean", False))
    assert (got - reference_pool(hidden, mask, "mean", False)).abs().max() < 1e-5
    del tensors["encoder.layer.1.output.dense.weight"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.1.down.weight"):
        ours(str(tmp_path))


def test_a_pooling_config_selecting_two_modes_is_refused(tmp_path):
    write_pooling(str(tmp_path), "mean", True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="exactly one"):
        Pooling.from_folder(str(tmp_path))
