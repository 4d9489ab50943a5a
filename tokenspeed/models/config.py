"""ModelConfig: the fields of an HF config.json that the models use, validated.

Every field of transformers 5's Llama, Qwen2 and Qwen3 that changes the forward math is
either implemented or rejected here, never ignored. Fields that leave the math alone pass:
pretraining_tp (transformers 4 only split the matmuls by it, 5 does not read it),
attention_dropout (off in eval), and for Llama the sliding-window fields (its model has
none). Rope types and partial_rotary_factor are checked where rotary tables are built.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .moe_config import MOE_ARCHITECTURES, MoEConfig, moe_config, moe_sliding_window


# the registry (models/__init__.py) maps these to classes; checked first, so that a
# foreign config (GPT-2's n_head) fails on its architecture, not on a missing field
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           *MOE_ARCHITECTURES)
# HF's defaults when a field is left out (Qwen2Config / Qwen3Config)
SLIDING_WINDOW = 4096
MAX_WINDOW_LAYERS = 28
LAYER_TYPES = ("full_attention", "sliding_attention")
_REQUIRED = object()


class _Fields:
    """Typed reads of config.json's fields; a missing or ill-typed one raises naming it.
    A field left out or null takes its default (HF's), when it has one."""

    def __init__(self, hf: dict[str, Any]):
        self.hf = hf

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.hf.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ValueError(f"field {key!r} is {'null' if key in self.hf else 'missing'}")
            return default
        return value

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
        value = self.get(key, default)
        # bool is an int to Python, but true is no size
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            raise ValueError(f"field {key!r} must be {what}, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"field {key!r} must be a positive number, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"field {key!r} must be true or false, got {value!r}")
        return value


def _architecture(hf: dict[str, Any]) -> str:
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise ValueError(f"field 'architectures' must name one architecture, got {architectures!r}")
    arch = architectures[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _reject_unimplemented(f: _Fields, arch: str) -> None:
    """Fields that change HF's math in ways this engine does not implement."""
    act = f.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"field 'hidden_act' {act!r} is not supported (only silu)")
    if not f.flag("is_causal", True):
        # HF's masks turn bidirectional
        raise ValueError("field 'is_causal' is false: bidirectional attention is not supported")
    if f.hf.get("quantization_config") is not None:
        raise ValueError("field 'quantization_config' is set: quantized checkpoints are not "
                         "supported; give a float (fp32/bf16/fp16) checkpoint")
    if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
        return  # Qwen2's modeling fixes its biases (Qwen2-MoE: qkv_bias) and reads neither
    if f.flag("attention_bias", False):
        raise ValueError("field 'attention_bias' is true: HF then adds a bias to o_proj too, "
                         "which is not supported")
    if arch == "LlamaForCausalLM" and f.flag("mlp_bias", False):
        raise ValueError("field 'mlp_bias' is true: MLP biases are not supported")


def _check_sliding_window(f: _Fields, num_layers: int, max_positions: int) -> None:
    """Reject a Qwen2/Qwen3 config in which HF masks keys by a sliding window.

    transformers 5 (Qwen2Config.__post_init__, masking_utils): the window is sliding_window
    when use_sliding_window, else none; layer_types names each layer's kind, or, left out,
    the layers from max_window_layers on slide when there is a window. A sliding layer's
    query at position q sees keys at positions > q - window. The engine accepts sequences
    of at most max_position_embeddings tokens, so a window of at least that many masks
    nothing: the same math as full attention, and it loads.
    """
    window = None
    use_window = f.flag("use_sliding_window", False)
    if use_window and f.hf.get("sliding_window", SLIDING_WINDOW) is not None:
        window = f.integer("sliding_window", SLIDING_WINDOW)
    layer_types = f.hf.get("layer_types")
    if layer_types is None:
        if window is None:
            return
        first = f.integer("max_window_layers", MAX_WINDOW_LAYERS, minimum=0)
        sliding = list(range(first, num_layers))
    elif (isinstance(layer_types, list) and len(layer_types) == num_layers
          and all(t in LAYER_TYPES for t in layer_types)):
        sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    else:
        raise ValueError(f"field 'layer_types' must give one of {', '.join(LAYER_TYPES)} for "
                         f"each of the {num_layers} layers, got {layer_types!r}")
    if not sliding:
        return
    if window is None:
        # HF itself fails here: it builds sliding masks from sliding_window
        raise ValueError(f"field 'layer_types' makes layers {sliding} sliding-window layers, but "
                         f"no window is set (use_sliding_window false or sliding_window null)")
    if window < max_positions:
        raise ValueError(f"field 'sliding_window' is {window}: layers {sliding} see only the "
                         f"last {window} positions, fewer than max_position_embeddings "
                         f"{max_positions}; sliding-window attention is not supported")


def rope_parameters(hf_config: dict[str, Any]) -> dict[str, Any]:
    """One dict with rope_theta and rope_type, from either the transformers 5 layout
    (``rope_parameters``) or the older one (``rope_theta`` + ``rope_scaling``)."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn"):
        # HF's order: a top-level original length wins, then the rope field, then the
        # model's own max_position_embeddings
        key = "original_max_position_embeddings"
        if key in hf_config:
            params[key] = hf_config[key]
        params.setdefault(key, hf_config.get("max_position_embeddings", 2048))
    return params


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope: dict[str, Any] = field(default_factory=dict)
    # the experts of the sparse layers; None for a dense model
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embedding, got {self.head_dim}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Raises ValueError naming the field for one missing, malformed or unsupported."""
        if not isinstance(hf, dict):
            raise ValueError(f"must hold a JSON object, got {type(hf).__name__}")
        arch = _architecture(hf)
        f = _Fields(hf)
        _reject_unimplemented(f, arch)
        hidden, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
        num_layers = f.integer("num_hidden_layers")
        max_positions = f.integer("max_position_embeddings", 2048)
        if arch in MOE_ARCHITECTURES:
            window = moe_sliding_window(f, arch)
            if window is not None and window < max_positions:
                raise ValueError(f"field 'sliding_window' is {window}, fewer than "
                                 f"max_position_embeddings {max_positions}; sliding-window "
                                 f"attention is not supported")
        elif arch != "LlamaForCausalLM":
            _check_sliding_window(f, num_layers, max_positions)
        rope = rope_parameters(hf)
        if "partial_rotary_factor" in hf:
            # HF moves a top-level factor into the rope parameters (which keep their own)
            rope.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
        return cls(
            architecture=arch,
            vocab_size=f.integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=f.integer("intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=f.integer("num_key_value_heads", heads),
            head_dim=f.integer("head_dim", hidden // heads),
            rms_norm_eps=f.number("rms_norm_eps", 1e-6),
            max_position_embeddings=max_positions,
            tie_word_embeddings=f.flag("tie_word_embeddings", False),
            # Qwen2's q/k/v always have a bias (its config does not say so); the others
            # have none, as _reject_unimplemented made sure
            attention_bias=(arch == "Qwen2ForCausalLM" or (
                arch == "Qwen2MoeForCausalLM" and f.flag("qkv_bias", True))),
            rope=rope,
            moe=moe_config(f, arch, num_layers) if arch in MOE_ARCHITECTURES else None,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a model directory needs an HF "
                                    f"config.json and *.safetensors weights")
        try:
            return cls.from_hf(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"config.json ({path}): invalid JSON: {e}") from None
        except ValueError as e:
            raise ValueError(f"config.json ({path}): {e}") from None
