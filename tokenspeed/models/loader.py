"""Load HF safetensors checkpoints (single file or sharded with an index), never pickle.

The files read are the ones HF itself reads: the index's shards, else model.safetensors,
else a complete model-0000i-of-0000N set; any other *.safetensors in the folder (a backup,
a half-written export) is ignored. Every file's tensor names are checked against the
index and against each other before any tensor is read.

An HF model held in memory (``InMemoryCheckpoint``: its config dict and its tensors)
loads through the same path, so an engine can be built from a trainer's model without a
checkpoint on disk.

HF names map onto this package's fused parameters (q/k/v -> qkv_proj, gate/up ->
gate_up_proj); each parameter's own ``weight_loader`` places and shards the tensor.
MoE experts load from either layout that exists: per-expert tensors
(``mlp.experts.{e}.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``)
or the stacked ones transformers 5 holds in memory (``mlp.experts.gate_up_proj``).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_FILE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")

# (fused parameter's module, HF module, shard id)
STACKED = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


# per-expert HF tensors -> (stacked parameter, shard kind); Mixtral names w1/w3/w2
EXPERT_NAME = re.compile(r"(.+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
EXPERT_KIND = {"gate_proj": ("gate_up_proj", "gate"), "w1": ("gate_up_proj", "gate"),
               "up_proj": ("gate_up_proj", "up"), "w3": ("gate_up_proj", "up"),
               "down_proj": ("down_proj", "down"), "w2": ("down_proj", "down")}


def _read_index(index: Path) -> dict[str, Path]:
    """Tensor name -> the file the index places it in; every file named must exist."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{index} is not a safetensors index: {e}") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to file names")
    placement = {name: index.parent / file for name, file in weight_map.items()}
    for name, path in placement.items():
        if not path.is_file():
            raise FileNotFoundError(f"{index} places tensor {name!r} in {path}, "
                                    f"which does not exist")
    return placement


def _shard_set(model_dir: Path) -> list[Path]:
    """The files of one complete model-0000i-of-0000N.safetensors set."""
    matches = (SHARD_FILE.fullmatch(path.name) for path in model_dir.glob("model-*.safetensors"))
    counts = {int(m.group(2)) for m in matches if m}
    if not counts:
        raise FileNotFoundError(f"no {INDEX_FILE}, {SINGLE_FILE} or model-00001-of-0000N."
                                f"safetensors shards in {model_dir}")
    if len(counts) > 1:
        raise ValueError(f"{model_dir} holds shards of differently sized sets "
                         f"(of {sorted(counts)}); without {INDEX_FILE} none is chosen")
    total = counts.pop()
    files = [model_dir / f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} of {total} is missing")
    return files


def _check_names(files: list[Path], placement: dict[str, Path] | None, index: Path) -> None:
    """Every name in exactly one file, and (with an index) in the file the index says."""
    holder: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
        for name in names:
            if name in holder:
                raise ValueError(f"tensor {name!r} is in both {holder[name]} and {path}")
            holder[name] = path
            if placement is not None and placement.get(name) != path:
                where = (f"places it in {placement[name]}" if name in placement
                         else "does not list it")
                raise ValueError(f"{path} holds tensor {name!r}, but {index} {where}")
    if placement is None:
        return
    unheld = [name for name in placement if name not in holder]
    if unheld:
        raise ValueError(f"{index} places tensor {unheld[0]!r} in {placement[unheld[0]]}, "
                         f"which does not hold it")


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    placement = None
    if index.is_file():
        placement = _read_index(index)
        files = sorted(set(placement.values()))
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        files = _shard_set(model_dir)
    _check_names(files, placement, index)
    return files


@dataclass(frozen=True)
class InMemoryCheckpoint:
    """An HF model held in memory: ``hf_config`` is what its config.json would hold and
    ``weights`` its tensors by HF name (a state dict)."""
    hf_config: dict[str, Any]
    weights: Mapping[str, Tensor] = field(repr=False)  # a config's repr must stay short

    def __str__(self) -> str:
        return f"the in-memory {self.hf_config.get('architectures', ['model'])[0]}"


def iterate_checkpoint(source: str | Path | InMemoryCheckpoint
                       ) -> Iterator[tuple[Path | str, str, Tensor]]:
    """(file, HF name, tensor) of every tensor of the checkpoint."""
    if isinstance(source, InMemoryCheckpoint):
        for name, tensor in source.weights.items():
            yield str(source), name, tensor
        return
    for path in checkpoint_files(source):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield path, name, f.get_tensor(name)


def first_non_finite(tensors: list[Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or inf, or None.

    A sum is finite only if every term is (NaN and inf propagate), and it reads each
    tensor once without writing a mask, so sums are checked first, one host round trip
    per device; only when one is not finite (or overflowed) is each tensor checked
    exactly to name the culprit.
    """
    sums: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        sums.setdefault(t.device, []).append(t.sum(dtype=torch.float32))
    if all(bool(torch.stack(s).isfinite().all()) for s in sums.values()):
        return None
    return next((i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all())), None)


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
        expert = EXPERT_NAME.fullmatch(name)
        if expert:
            param_name, kind = EXPERT_KIND[expert.group(3)]
            target = f"{expert.group(1)}.mlp.experts.{param_name}"
            if target in self.params:
                return target, self.params[target], (kind, int(expert.group(2)))
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's router
        for fused, hf, shard in STACKED:
            if f".{hf}." in name:
                target = name.replace(f".{hf}.", f".{fused}.")
                if target in self.params:
                    return target, self.params[target], shard
        if name in self.params:
            return name, self.params[name], None
        raise ValueError(f"unknown weight name {name!r} for this model")

    def check(self, name: str, tensor: Tensor, *, check_finite: bool = True) -> None:
        """Raise the loader's own error for a bad name, dtype or shape, or (``check_finite``)
        a NaN or inf value, touching no weights. A diverged trainer sends NaNs; written, they
        would make every later score NaN."""
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
        # one reduction where the tensor lives, after the free checks
        if check_finite and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"weight {name!r} holds NaN or inf values")

    def check_all(self, items: list[tuple[str, Tensor]], *, check_finite: bool = True) -> None:
        """``check`` of every (name, tensor), with the finiteness of all of them read back
        at once (one host round trip per device instead of one per tensor)."""
        for name, tensor in items:
            self.check(name, tensor, check_finite=False)
        if check_finite:
            written = [(n, t) for n, t in items if self.resolve(n) is not None]
            bad = first_non_finite([t for _, t in written])
            if bad is not None:
                raise ValueError(f"weight {written[bad][0]!r} holds NaN or inf values")

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


def load_checkpoint(model: nn.Module, model_dir: str | Path | InMemoryCheckpoint) -> None:
    """Fill every parameter of ``model`` from the checkpoint, or raise naming what is missing."""
    weights = WeightMap(model)
    loaded: dict[str, set] = {}
    for path, name, tensor in iterate_checkpoint(model_dir):
        try:
            weights.check(name, tensor)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None
        resolved = weights.resolve(name)
        if resolved is not None:
            weights.load(name, tensor)
            loaded.setdefault(resolved[0], set()).add(resolved[2])
    missing = []
    for target, param in weights.params.items():
        if hasattr(param, "missing_shards"):  # stacked experts: fused, or one per expert
            missing += [f"{target.rsplit('.', 1)[0]}.{part}"
                        for part in param.missing_shards(param, loaded.get(target, set()))]
            continue
        # a fused parameter is whole only once every one of its HF tensors has loaded
        parts = {shard: target.replace(f".{fused}.", f".{hf}.")
                 for fused, hf, shard in STACKED if f".{fused}." in target} or {None: target}
        missing += [hf_name for shard, hf_name in parts.items()
                    if shard not in loaded.get(target, ())]
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")

