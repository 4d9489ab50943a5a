"""What the JIT build decides to compile (the compiler itself is not run here)."""
from __future__ import annotations

import pytest
import torch

from tokenspeed_ext import _build


@pytest.fixture
def planned(monkeypatch):
    """Run load_library's decision with the compiler replaced by a recorder."""
    built = []
    monkeypatch.setattr(_build, "_jit", lambda name, *a, **k: built.append(name))
    monkeypatch.setattr(_build, "find_cuda_home", lambda: "/opt/cuda-toolkit")
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setenv("CUDA_HOME", "")  # restored after the test, which sets it

    def plan(gpu: bool, mode: str | None) -> list[str]:
        built.clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        if mode is None:
            monkeypatch.delenv("TOKENSPEED_BUILD_CUDA", raising=False)
        else:
            monkeypatch.setenv("TOKENSPEED_BUILD_CUDA", mode)
        _build.load_library.__wrapped__()
        return list(built)
    return plan


def test_cuda_is_compiled_by_default_only_when_a_gpu_is_seen(planned):
    assert planned(gpu=False, mode=None) == ["tokenspeed_ops_cpu"]
    assert planned(gpu=True, mode=None) == ["tokenspeed_ops_cuda"]
    # CI compiles the kernels on machines without a GPU
    assert planned(gpu=False, mode="1") == ["tokenspeed_ops_cuda"]
    assert planned(gpu=True, mode="0") == ["tokenspeed_ops_cpu"]


def test_a_gpu_without_a_toolkit_warns_and_builds_the_cpu_kernels(planned, monkeypatch):
    monkeypatch.setattr(_build, "find_cuda_home", lambda: None)
    with pytest.warns(UserWarning, match="no CUDA toolkit found"):
        assert planned(gpu=True, mode=None) == ["tokenspeed_ops_cpu"]
    with pytest.raises(RuntimeError, match="TOKENSPEED_BUILD_CUDA=1 but no CUDA toolkit"):
        planned(gpu=False, mode="1")
