"""Shared test setup: the `gpu` marker skips without CUDA, `multi_gpu` with fewer than two
CUDA devices; DEVICES runs a test on both CPU and CUDA."""
from __future__ import annotations

import pytest
import torch

# Parametrize a test over these to run it on the CPU always and on CUDA when present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# marker -> (CUDA devices it needs, reason for the skip below that)
DEVICES_NEEDED = {"gpu": (1, "needs a CUDA device"), "multi_gpu": (2, "needs 2+ CUDA devices")}


def pytest_collection_modifyitems(config, items):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        for marker, (needed, reason) in DEVICES_NEEDED.items():
            if marker in item.keywords and count < needed:
                item.add_marker(pytest.mark.skip(reason=reason))
                break
