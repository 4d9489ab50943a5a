"""Text to token ids with a model folder's HF tokenizer, as the CLI and the server do it.

Prompt and completion are tokenized separately: the prompt with the tokenizer's special
tokens (such as BOS), the completion without them, so that the completion's ids are
exactly its own, never a token merged across the boundary. No chat template is applied.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

# files that announce an HF tokenizer; without one, transformers fails with advice about
# sentencepiece that does not apply
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def encode(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    return (tokenizer(prompt)["input_ids"],
            tokenizer(completion, add_special_tokens=False)["input_ids"])
