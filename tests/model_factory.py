"""Small random-weight HF checkpoints that tests create and save, and HF reference scores."""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MOE_ARCHS = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM")


def hf_config(arch: str, *, vocab: int = 131, hidden: int = 32, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, tied: bool = False, rope: dict | None = None,
              max_positions: int = 512, moe: dict | None = None):
    """``moe``: MoE fields for the MoE architectures (defaults: 8 experts, top-2)."""
    import transformers
    cls = {"LlamaForCausalLM": transformers.LlamaConfig,
           "Qwen2ForCausalLM": transformers.Qwen2Config,
           "Qwen3ForCausalLM": transformers.Qwen3Config,
           "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig,
           "Qwen2MoeForCausalLM": transformers.Qwen2MoeConfig,
           "MixtralForCausalLM": transformers.MixtralConfig}[arch]
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 8,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6, architectures=[arch])
    if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        kwargs["head_dim"] = 16  # Qwen3 decouples head_dim from hidden / heads
    if arch in MOE_ARCHS:
        fields = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24)
        fields.update(moe or {})
        if arch == "MixtralForCausalLM":
            fields["num_local_experts"] = fields.pop("num_experts")
            fields["intermediate_size"] = fields.pop("moe_intermediate_size")
            for key in ("norm_topk_prob", "mlp_only_layers", "shared_expert_intermediate_size",
                        "decoder_sparse_step"):
                fields.pop(key, None)
        elif arch == "Qwen2MoeForCausalLM":
            fields.setdefault("shared_expert_intermediate_size", 40)
        kwargs.update(fields)
    if rope is not None:
        kwargs["rope_parameters"] = rope
    return cls(**kwargs)


def make_checkpoint(path: Path, arch: str = "LlamaForCausalLM", *, seed: int = 0,
                    **config_kwargs) -> Path:
    """Save a random model (weights ~ N(0, 0.1), norms ~ 1 + N(0, 0.1)) to ``path``."""
    import transformers
    config = hf_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1)
            if "norm" in name:
                p.add_(1.0)
    model.save_pretrained(path)
    return Path(path)


def load_hf(path: Path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def hf_scores(model, sequences: list[dict], temperature: float = 1.0
              ) -> tuple[list[list[float]], list[list[float]]]:
    """HF fp32 reference: log_softmax(logits / T) at each completion token, and entropy."""
    lps, ents = [], []
    for s in sequences:
        prompt, completion = list(s["prompt_token_ids"]), list(s["completion_token_ids"])
        if not completion:
            lps.append([])
            ents.append([])
            continue
        ids = torch.tensor([prompt + completion])
        logits = model(ids).logits[0].double() / temperature
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        target = torch.tensor(completion)
        lps.append(logp.gather(-1, target[:, None])[:, 0].tolist())
        ents.append((-(logp.exp() * logp).sum(-1)).tolist())
    return lps, ents


@torch.no_grad()
def hf_bf16_scores(path: Path, sequences: list[dict]) -> list[list[float]]:
    """HF's own bf16 log-probs (on CUDA): the error bar a bf16 engine is held to."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()
    out = []
    for s in sequences:
        ids = torch.tensor([s["prompt_token_ids"] + s["completion_token_ids"]], device="cuda")
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        p = len(s["prompt_token_ids"])
        out.append(logp[p - 1:-1].gather(-1, ids[0, p:, None])[:, 0].tolist())
    return out


def mean_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    flat = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(flat) / len(flat)


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)


def random_sequences(gen: torch.Generator, vocab: int, n: int, max_prompt: int = 20,
                     max_completion: int = 12) -> list[dict]:
    out = []
    for _ in range(n):
        p = int(torch.randint(1, max_prompt + 1, (1,), generator=gen))
        c = int(torch.randint(0, max_completion + 1, (1,), generator=gen))
        out.append({"prompt_token_ids": torch.randint(0, vocab, (p,), generator=gen).tolist(),
                    "completion_token_ids": torch.randint(0, vocab, (c,), generator=gen).tolist()})
    return out


