"""Model registry: HF architecture name -> model class, and building one from a directory."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..layers.logprob_head import HeadOptions
from .config import ModelConfig
from .llama import LlamaForCausalLM, Qwen2ForCausalLM
from .loader import InMemoryCheckpoint, load_checkpoint
from .moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from .qwen3 import Qwen3ForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {config.architecture!r} is not supported; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[config.architecture]


def build_model(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                head: HeadOptions = HeadOptions()) -> nn.Module:
    """An uninitialised model with parameters allocated directly on ``device`` in ``dtype``
    (rotary frequencies stay fp32: they are built with explicit dtypes)."""
    cls = model_class(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(config, head).eval()
    finally:
        torch.set_default_dtype(previous)


def model_config(source: str | Path | InMemoryCheckpoint) -> ModelConfig:
    """The validated config of a checkpoint directory or an in-memory model."""
    if isinstance(source, InMemoryCheckpoint):
        try:
            return ModelConfig.from_hf(source.hf_config)
        except ValueError as e:
            raise ValueError(f"config of {source}: {e}") from None
    return ModelConfig.from_dir(source)


def load_model(model_dir: str | Path | InMemoryCheckpoint, device: torch.device,
               dtype: torch.dtype, head: HeadOptions = HeadOptions()
               ) -> tuple[nn.Module, ModelConfig]:
    config = model_config(model_dir)
    model = build_model(config, device, dtype, head)
    load_checkpoint(model, model_dir)
    return model, config


__all__ = ["ARCHITECTURES", "InMemoryCheckpoint", "ModelConfig", "build_model", "load_model",
           "model_class", "model_config"]
