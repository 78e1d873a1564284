"""What dtype="auto" resolves to on CPU (engine/executor/cpu_dtype.py)."""

from __future__ import annotations

import pytest
import torch

from radixfleet.engine.executor import cpu_dtype

EPYC_FLAGS = "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16 clzero\n"
OLD_XEON_FLAGS = "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"


@pytest.mark.parametrize("text,native", [(EPYC_FLAGS, True), (OLD_XEON_FLAGS, False),
                                         ("flags : amx_tile amx_bf16 amx_int8\n", True), ("", False)])
def test_native_bf16_from_cpuinfo_flags(tmp_path, text, native):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\n" + text)
    assert any(f in cpu_dtype.cpu_flags(str(info)) for f in cpu_dtype.NATIVE_BF16_FLAGS) is native


def test_unreadable_cpuinfo_means_no_flags(tmp_path):
    assert cpu_dtype.cpu_flags(str(tmp_path / "missing")) == set()


def test_default_follows_the_cpu(monkeypatch):
    monkeypatch.delenv("RADIXFLEET_CPU_DTYPE", raising=False)
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(cpu_dtype, "native_bf16", lambda native=native: native)
        assert cpu_dtype.default_cpu_dtype() is want


@pytest.mark.parametrize("value,want", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_variable_overrides_the_cpu(monkeypatch, value, want):
    monkeypatch.setenv("RADIXFLEET_CPU_DTYPE", value)
    monkeypatch.setattr(cpu_dtype, "native_bf16", lambda: want is torch.float32)  # the other way
    assert cpu_dtype.default_cpu_dtype() is want


def test_bad_variable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RADIXFLEET_CPU_DTYPE", "fp8")
    with pytest.raises(ValueError, match="RADIXFLEET_CPU_DTYPE must be auto, float32 or bfloat16"):
        cpu_dtype.default_cpu_dtype()
