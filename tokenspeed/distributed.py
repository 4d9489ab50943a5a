"""Moved to ``tokenspeed.parallel`` (group, launch, workers, dp); these names stay
importable from here for one release."""
from __future__ import annotations

from .parallel.dp import compute_log_probs_dp
from .parallel.group import (TPGroup, building_with, check_shardable, kv_head_range,
                             tp_group, vocab_range)
from .parallel.launch import init_tp_group, launched_spmd

__all__ = ["TPGroup", "building_with", "check_shardable", "compute_log_probs_dp",
           "init_tp_group", "kv_head_range", "launched_spmd", "tp_group", "vocab_range"]
