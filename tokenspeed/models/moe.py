"""Mixture-of-experts decoders: Qwen3-MoE, Qwen2-MoE and Mixtral.

Each is its dense sibling with the MLP of the sparse layers (``config.moe.sparse_layers``)
replaced by a ``SparseMoE`` block: Qwen3-MoE is Qwen3 (q/k norms), Qwen2-MoE is Qwen2 (q/k/v
bias) plus a shared expert gated by sigmoid(shared_expert_gate(x)), Mixtral is Llama. A
sparse layer's ``moe_index`` is its rank among the sparse layers: the column of the
routing it reads (replay) and writes (capture).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..layers.attention import AttentionMetadata
from ..layers.moe import SparseMoE
from .config import ModelConfig
from .llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from .qwen3 import Qwen3Attention


class MoEDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        moe = config.moe
        if moe is None or layer_id not in moe.sparse_layers:
            return LlamaMLP(config)  # a dense layer (mlp_only_layers, decoder_sparse_step)
        shared = None
        if moe.shared_expert_intermediate_size:
            shared = LlamaMLP(config, moe.shared_expert_intermediate_size)
        return SparseMoE(config.hidden_size, moe.num_experts, moe.top_k, moe.intermediate_size,
                         moe.renormalize, moe.sparse_layers.index(layer_id), shared)

    def feed_forward(self, x: Tensor, meta: AttentionMetadata) -> Tensor:
        if isinstance(self.mlp, SparseMoE):
            return self.mlp(x, meta.routing)
        return self.mlp(x)


class MixtralDecoderLayer(MoEDecoderLayer):
    attention_cls = LlamaAttention


class Qwen2MoeDecoderLayer(MoEDecoderLayer):
    attention_cls = LlamaAttention  # ModelConfig turns on the q/k/v bias (qkv_bias)


class Qwen3MoeDecoderLayer(MoEDecoderLayer):
    attention_cls = Qwen3Attention


class MixtralForCausalLM(LlamaForCausalLM):
    layer_cls = MixtralDecoderLayer


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2MoeDecoderLayer


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
