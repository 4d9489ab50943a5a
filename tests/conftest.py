"""Shared test setup: the `gpu` marker skips without CUDA; DEVICES runs a test on both."""
from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Parametrize a test over these to run it on the CPU always and on CUDA when present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
