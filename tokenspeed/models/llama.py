"""Llama and Qwen2 decoder-only models (Qwen2 is Llama with a q/k/v bias).

forward() runs the packed tokens of one scheduler batch through every layer and returns
the final-normed hidden states of the scored rows only; the log-prob head does the rest.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..layers.activation import silu_and_mul
from ..layers.attention import AttentionMetadata, PagedAttention
from ..layers.embedding import VocabEmbedding
from ..layers.linear import ColumnParallelLinear, QKVLinear, RowParallelLinear
from ..layers.logprob_head import HeadOptions, LogprobHead
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from .config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding):
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVLinear(config.hidden_size, config.head_dim, config.num_heads,
                                  config.num_kv_heads, bias=config.attention_bias)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size)
        self.rotary = rotary
        self.attn = PagedAttention(layer_id, config.head_dim ** -0.5)

    def project(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[N, H] -> q [N, Hq, D], k, v [N, Hk, D] before rotary."""
        q, k, v = self.qkv_proj(hidden)
        n = hidden.shape[0]
        return (q.view(n, -1, self.head_dim), k.view(n, -1, self.head_dim),
                v.view(n, -1, self.head_dim))

    def forward(self, hidden: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        q, k, v = self.project(hidden)
        self.rotary(positions, q, k)
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, {0: size, 1: size})
        self.down_proj = RowParallelLinear(size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id, rotary)
        self.mlp = self.make_mlp(config, layer_id)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return LlamaMLP(config)

    def forward(self, hidden: Tensor, residual: Tensor | None, positions: Tensor,
                meta: AttentionMetadata) -> tuple[Tensor, Tensor]:
        """(sublayer output, residual stream before it); the caller adds the two, as the
        next norm does (HF: residual + hidden in the model dtype)."""
        if residual is None:
            x, residual = self.input_layernorm(hidden), hidden
        else:
            x, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(x, positions, meta)
        x, residual = self.post_attention_layernorm(hidden, residual)
        return self.feed_forward(x, meta), residual

    def feed_forward(self, x: Tensor, meta: AttentionMetadata) -> Tensor:
        return self.mlp(x)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, layer_cls: type[LlamaDecoderLayer]):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # one rotary table, shared by every layer
        self.rotary = RotaryEmbedding(config.head_dim, config.rope, config.max_position_embeddings)
        self.layers = nn.ModuleList(layer_cls(config, i, self.rotary)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                score_rows: Tensor) -> Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, meta)
        if residual is None:
            return self.norm(hidden[score_rows])
        return self.norm(hidden[score_rows], residual[score_rows])[0]


class LlamaForCausalLM(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config: ModelConfig, head: HeadOptions = HeadOptions()):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.layer_cls)
        self.lm_head = LogprobHead(config.vocab_size, config.hidden_size,
                                   tied=self.model.embed_tokens if config.tie_word_embeddings
                                   else None, options=head)

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                score_rows: Tensor) -> Tensor:
        """Packed input_ids/positions [N] -> final hidden states of score_rows [S, H]."""
        return self.model(input_ids, positions, meta, score_rows)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Same graph as Llama; ModelConfig turns on the q/k/v bias Qwen2 always has."""
