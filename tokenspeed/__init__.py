"""tokenspeed: exact, fast log p(completion | prompt) scoring for RL trainers."""
from __future__ import annotations

from .config import EngineConfig
from .engine import Engine

__version__ = "0.1.0"

__all__ = ["Engine", "EngineConfig", "__version__"]
