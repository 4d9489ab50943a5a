"""Load HF safetensors checkpoints (single file or sharded with an index), never pickle.

HF names map onto this package's fused parameters (q/k/v -> qkv_proj, gate/up ->
gate_up_proj); each parameter's own ``weight_loader`` places and shards the tensor.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

# (fused parameter's module, HF module, shard id)
STACKED = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def iterate_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, Tensor]]:
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class WeightMap:
    """Resolves HF weight names to (parameter name, parameter, shard id) of one model."""

    def __init__(self, model: nn.Module, write_tied_head: bool = False):
        """``write_tied_head``: a tied model's lm_head.weight writes the embedding (an
        update, as HF's load_state_dict does); otherwise it is skipped (a checkpoint,
        where a tied head's saved copy is the embedding)."""
        self.params = dict(model.named_parameters())
        self.tied = getattr(model.config, "tie_word_embeddings", False)
        self.write_tied_head = write_tied_head

    def resolve(self, name: str) -> tuple[str, nn.Parameter, str | int | None] | None:
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if self.tied and name == "lm_head.weight":
            if not self.write_tied_head:
                return None
            name = "model.embed_tokens.weight"
        for fused, hf, shard in STACKED:
            if f".{hf}." in name:
                target = name.replace(f".{hf}.", f".{fused}.")
                if target in self.params:
                    return target, self.params[target], shard
        if name in self.params:
            return name, self.params[name], None
        raise ValueError(f"unknown weight name {name!r} for this model")

    def check(self, name: str, tensor: Tensor) -> None:
        """Raise the loader's own error for a bad name or shape, touching no weights."""
        if not isinstance(tensor, Tensor):
            raise TypeError(f"weight {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"weight {name!r}: expected a floating tensor, got {tensor.dtype}")
        resolved = self.resolve(name)
        if resolved is None:
            return
        _, param, shard = resolved
        shadow = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
        try:
            param.weight_loader(shadow, tensor.to("meta"), shard)
        except ValueError as e:
            raise ValueError(f"weight {name!r}: {e}") from None

    def load(self, name: str, tensor: Tensor) -> str | None:
        """Copy one HF tensor into its parameter; returns the parameter name (None if ignored)."""
        resolved = self.resolve(name)
        if resolved is None:
            return None
        target, param, shard = resolved
        try:
            param.weight_loader(param, tensor, shard)
        except ValueError as e:
            raise ValueError(f"weight {name!r}: {e}") from None
        return target


def load_checkpoint(model: nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint, or raise naming what is missing."""
    weights = WeightMap(model)
    loaded: dict[str, set] = {}
    for name, tensor in iterate_checkpoint(model_dir):
        resolved = weights.resolve(name)
        if resolved is not None:
            weights.load(name, tensor)
            loaded.setdefault(resolved[0], set()).add(resolved[2])
    missing = []
    for target in weights.params:
        # a fused parameter is whole only once every one of its HF tensors has loaded
        parts = {shard: target.replace(f".{fused}.", f".{hf}.")
                 for fused, hf, shard in STACKED if f".{fused}." in target} or {None: target}
        missing += [hf_name for shard, hf_name in parts.items()
                    if shard not in loaded.get(target, ())]
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")

