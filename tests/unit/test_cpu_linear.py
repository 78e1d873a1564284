"""oneDNN-prepacked CPU matmuls (engine/layers/linear.py) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixfleet.engine.layers import linear
from radixfleet.engine.layers.embedding import ParallelLMHead
from radixfleet.engine.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    prepack_cpu_weights,
)

pytestmark = pytest.mark.skipif(not linear._onednn_linear_available(), reason="torch built without oneDNN")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "qkv": QKVParallelLinear(64, 16, 4, 2, bias=True),
        "gate_up": MergedColumnParallelLinear(64, [96, 96]),
        "down": RowParallelLinear(96, 64),
        "head": ParallelLMHead(300, 64),
    })
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("rows", [1, 16, 333])
def test_prepacked_layers_match_f_linear(rows):
    model = _model()
    x = torch.randn(rows, 64)
    h = torch.randn(rows, 96)
    want = {"qkv": F.linear(x, model["qkv"].weight, model["qkv"].bias),
            "gate_up": F.linear(x, model["gate_up"].weight),
            "down": F.linear(h, model["down"].weight),
            "head": F.linear(x, model["head"].weight)}
    assert prepack_cpu_weights(model) == 4
    got = {"qkv": model["qkv"](x), "gate_up": model["gate_up"](x), "down": model["down"](h),
           "head": model["head"].logits(x)}
    for name in want:
        assert model[name].packed is not None
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_prepacked_bf16_layers_match_f_linear():
    """bf16 weights are packed too (the CPU bf16 path, #21), within bf16 rounding of F.linear;
    on a CPU where oneDNN cannot pack bf16 (AVX2 only) nothing is packed and the layers still
    compute, through F.linear."""
    model = _model().to(torch.bfloat16)
    x, h = torch.randn(16, 64, dtype=torch.bfloat16), torch.randn(16, 96, dtype=torch.bfloat16)
    want = F.linear(h, model["down"].weight).float()
    packable = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert prepack_cpu_weights(model) == (4 if packable else 0)
    assert (model["down"].packed is not None) is packable
    torch.testing.assert_close(model["down"](h).float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(model["head"].logits(x), F.linear(x, model["head"].weight).float(),
                               rtol=2e-2, atol=2e-2)


def test_prepack_skips_other_weights_and_can_be_turned_off(monkeypatch):
    model = _model().to(torch.float16)
    assert prepack_cpu_weights(model) == 0
    assert all(m.packed is None for m in model.values())
    monkeypatch.setenv("RADIXFLEET_CPU_PREPACK", "0")
    model = _model()
    assert prepack_cpu_weights(model) == 0
    x, h = torch.randn(3, 64), torch.randn(3, 96)
    # Unpacked layers are exactly F.linear.
    assert torch.equal(model["down"](h), F.linear(h, model["down"].weight))
    assert torch.equal(model["head"].logits(x), F.linear(x, model["head"].weight))
