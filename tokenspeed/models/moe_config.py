"""MoEConfig: the mixture-of-experts fields of a Qwen3-MoE, Qwen2-MoE or Mixtral config.json.

transformers 5 (modeling_qwen3_moe / qwen2_moe / mixtral): a layer is sparse when it is
not in ``mlp_only_layers``, there are experts, and (layer + 1) % ``decoder_sparse_step``
== 0 (Mixtral: every layer). The router is a softmax in fp32 over all experts, top-k,
renormalised when ``norm_topk_prob`` (Mixtral: always). Qwen2-MoE adds a shared expert
gated by sigmoid(shared_expert_gate(x)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    sparse_layers: tuple[int, ...]
    shared_expert_intermediate_size: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= min(self.num_experts, 32):
            raise ValueError(f"num_experts_per_tok {self.top_k} must be in [1, "
                             f"min(num_experts {self.num_experts}, 32)]")
        if self.num_experts > 2048:
            raise ValueError(f"num_experts {self.num_experts} exceeds the supported 2048")


def moe_config(f: Any, arch: str, num_layers: int) -> MoEConfig | None:
    """The MoE part of a config (``f`` reads fields as ModelConfig does), None if there
    are no sparse layers."""
    if arch == "MixtralForCausalLM":
        experts = f.integer("num_local_experts", 8)
        return MoEConfig(num_experts=experts, top_k=f.integer("num_experts_per_tok", 2),
                         intermediate_size=f.integer("intermediate_size"), renormalize=True,
                         sparse_layers=tuple(range(num_layers)))
    # transformers 5 saves Qwen3-MoE's num_experts under its alias num_local_experts
    key = "num_local_experts" if "num_local_experts" in f.hf else "num_experts"
    experts = f.integer(key, 128 if arch == "Qwen3MoeForCausalLM" else 60, minimum=0)
    step = f.integer("decoder_sparse_step", 1)
    dense = f.get("mlp_only_layers", [])
    if not (isinstance(dense, list) and all(type(i) is int for i in dense)):
        raise ValueError(f"field 'mlp_only_layers' must be a list of layer indices, got {dense!r}")
    sparse = tuple(i for i in range(num_layers)
                   if i not in dense and experts > 0 and (i + 1) % step == 0)
    if not sparse:
        return None
    shared = 0
    if arch == "Qwen2MoeForCausalLM":
        shared = f.integer("shared_expert_intermediate_size", 5632)
    return MoEConfig(num_experts=experts, top_k=f.integer("num_experts_per_tok", 8 if arch ==
                                                          "Qwen3MoeForCausalLM" else 4),
                     intermediate_size=f.integer("moe_intermediate_size", 768 if arch ==
                                                 "Qwen3MoeForCausalLM" else 1408),
                     renormalize=f.flag("norm_topk_prob", False), sparse_layers=sparse,
                     shared_expert_intermediate_size=shared)


def moe_sliding_window(f: Any, arch: str) -> int | None:
    """The attention window HF applies (to some or all layers), or None."""
    if arch == "MixtralForCausalLM":
        return None if f.hf.get("sliding_window") is None else f.integer("sliding_window")
    if f.flag("use_sliding_window", False) and f.hf.get("sliding_window") is not None:
        return f.integer("sliding_window")
    return None
