"""The rotary cos/sin cache matches transformers' LlamaRotaryEmbedding (default and llama3 scaling)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

from radixfleet.kernels.rotary import build_cos_sin_cache  # noqa: E402

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("theta,scaling,head_dim", [(500000.0, LLAMA31, 128), (100000.0, None, 64),
                                                    (10000.0, {**LLAMA31, "factor": 32.0}, 64)])
def test_cache_matches_transformers(theta, scaling, head_dim):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=131072, rope_parameters=rope)
    hf = LlamaRotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 17, 4095, 8191, 8192, 70000, 131071]])
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), positions)  # [1, P, D], halves repeated
    cache = build_cos_sin_cache(head_dim, 131072, theta, scaling)[positions[0]]
    half = head_dim // 2
    torch.testing.assert_close(cache[:, :half], cos[0, :, :half], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache[:, half:], sin[0, :, :half], atol=1e-5, rtol=0)


def test_unknown_scaling_is_an_error():
    with pytest.raises(ValueError, match="unsupported rope scaling"):
        build_cos_sin_cache(64, 16, 10000.0, {"rope_type": "yarn", "factor": 4.0})
