"""The built-in model: a tiny Llama-style checkpoint made deterministically on first use.

It is written as a real HF checkpoint (config.json + model.safetensors) without needing
transformers, so `tokenspeed score` works on a fresh machine with nothing downloaded.
Bump BUILTIN_VERSION whenever the config or the weight recipe changes: the version names
the cache folder, so old caches are never reused for a different model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

BUILTIN_VERSION = "v1"
SEED = 1234
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def cache_dir() -> Path:
    root = os.environ.get("TOKENSPEED_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tokenspeed")
    return Path(root) / f"builtin-{BUILTIN_VERSION}"


def builtin_weights() -> dict[str, torch.Tensor]:
    c = CONFIG
    gen = torch.Generator().manual_seed(SEED)
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    weights = {"model.embed_tokens.weight": normal(c["vocab_size"], h, std=1.0),
               "model.norm.weight": torch.ones(h),
               "lm_head.weight": normal(c["vocab_size"], h, std=h ** -0.5)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        weights.update({
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": normal(q, h, std=h ** -0.5),
            p + "self_attn.k_proj.weight": normal(kv, h, std=h ** -0.5),
            p + "self_attn.v_proj.weight": normal(kv, h, std=h ** -0.5),
            p + "self_attn.o_proj.weight": normal(h, q, std=q ** -0.5),
            p + "mlp.gate_proj.weight": normal(i, h, std=h ** -0.5),
            p + "mlp.up_proj.weight": normal(i, h, std=h ** -0.5),
            p + "mlp.down_proj.weight": normal(h, i, std=i ** -0.5),
        })
    return weights


def builtin_model_dir() -> Path:
    """The cached built-in checkpoint, created on first use (atomically, so concurrent
    first uses never see a half-written folder)."""
    target = cache_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        save_file(builtin_weights(), str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # another process won the race; its folder is identical
    finally:
        if staging.exists():  # a failure, an interrupt or a lost race: leave nothing behind
            shutil.rmtree(staging, ignore_errors=True)
    return target
