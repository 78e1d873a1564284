"""``device='cuda'`` without a usable GPU is refused up front, with the reason and the way out
(issue #17: the CUDA image on a CPU node started the engine's processes, then died with a
traceback ending in "no CUDA GPU is available")."""

from __future__ import annotations

import pytest
import torch

from radixfleet.engine.config import ConfigError
from radixfleet.engine.engine import Engine
from radixfleet.engine.server import serve

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


def test_serve_refuses_cuda_without_a_gpu_in_one_line(capsys):
    assert serve.main(["--model-path", "smollm2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("radixfleet serve: device='cuda' needs a CUDA GPU, but torch ")
    assert "--device cpu" in err and "Traceback" not in err


def test_engine_checks_the_device_before_the_model_or_any_process():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        Engine(model_path="/no/such/model", device="cuda:0")


@pytest.mark.parametrize(("cuda_build", "reason"), [
    (None, "is a CPU-only build"),
    ("13.0", "(CUDA 13.0) finds no GPU: no NVIDIA driver"),  # the CUDA image on a CPU node
])
def test_the_message_names_why(monkeypatch, cuda_build, reason):
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    with pytest.raises(ConfigError) as e:
        Engine(model_path="smollm2", device="cuda")
    assert reason in str(e.value)
