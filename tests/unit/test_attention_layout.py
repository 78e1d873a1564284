"""Which layers slide, per family, as transformers decides; backends without windows refuse."""

from __future__ import annotations

import pytest
import torch
import transformers

from radixfleet.engine.attention.base import AttentionBackend
from radixfleet.engine.memory.kv_pool import KVPool
from radixfleet.engine.models.attention_layout import (
    attention_logit_cap,
    attention_scale,
    sliding_windows,
)
from radixfleet.engine.models.gemma import gemma3_rope

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
             num_key_value_heads=1)


def hf_windows(config) -> list[int | None]:
    """transformers' own per-layer windows, read off its attention modules (Mistral's pass
    the config's window to every layer's attention call)."""
    model = transformers.AutoModelForCausalLM.from_config(config)
    return [getattr(layer.self_attn, "sliding_window", config.sliding_window)
            for layer in model.model.layers]


@pytest.mark.parametrize("config", [
    transformers.MistralConfig(num_hidden_layers=3, sliding_window=16, **SMALL),
    transformers.MistralConfig(num_hidden_layers=2, sliding_window=None, **SMALL),
    transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16,
                             max_window_layers=2, **SMALL),
    transformers.Qwen2Config(num_hidden_layers=2, use_sliding_window=False, sliding_window=16, **SMALL),
    transformers.Gemma2Config(num_hidden_layers=4, sliding_window=16, head_dim=16, **SMALL),
    transformers.Gemma3TextConfig(num_hidden_layers=7, sliding_window=16, head_dim=16, **SMALL),
], ids=["mistral", "mistral-full", "qwen2-sliding", "qwen2-off", "gemma2", "gemma3"])
def test_windows_match_transformers(config):
    hf = config.to_dict()
    assert list(sliding_windows(hf, config.num_hidden_layers)) == hf_windows(config)


def test_configs_without_layer_types():
    """Older config.json files: Gemma 3's `sliding_window_pattern`, Qwen2's max_window_layers."""
    g3 = {"model_type": "gemma3_text", "sliding_window": 512, "sliding_window_pattern": 6,
          "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    assert sliding_windows(g3, 12) == (512,) * 5 + (None,) + (512,) * 5 + (None,)
    assert gemma3_rope(g3, sliding=True) == (1e4, None)
    assert gemma3_rope(g3, sliding=False) == (1e6, {"rope_type": "linear", "factor": 8.0})
    qwen = {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}
    assert sliding_windows(qwen, 3) == (None, 64, 64)
    g2 = {"model_type": "gemma2", "sliding_window": 4096, "query_pre_attn_scalar": 144,
          "attn_logit_softcapping": 50.0}
    assert sliding_windows(g2, 4) == (4096, None, 4096, None)
    assert attention_scale(g2, 256) == 144 ** -0.5 and attention_logit_cap(g2) == 50.0
    assert attention_scale({}, 64) == 64 ** -0.5 and attention_logit_cap({"model_type": "llama"}) is None
    with pytest.raises(ValueError, match="positive integer"):
        sliding_windows({"sliding_window": 0}, 2)


class NoWindows(AttentionBackend):
    def forward(self, q, k, v, layer_id, batch):
        raise NotImplementedError


def test_backend_without_windows_refuses_them():
    pool = KVPool(2, 16, 1, 8, torch.float32, torch.device("cpu"))
    backend = NoWindows(pool, 2, 1, 8, 8 ** -0.5)
    backend.configure((None, None), None)  # nothing to refuse
    with pytest.raises(ValueError, match=r"sliding-window attention \(windows \[16\]\), which NoWindows"):
        backend.configure((16, None), None)
    with pytest.raises(ValueError, match="soft-caps its attention logits"):
        backend.configure((None, None), 50.0)
