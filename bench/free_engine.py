"""`tokenspeed serve` over an engine whose forward costs nothing: every batch's scores are
zeros, made without running the model. What is left is the server's own work: HTTP,
JSON, validation, scheduling and the session's bookkeeping. bench_server.py --free-engine
starts the server this way.

    python bench/free_engine.py serve MODEL_DIR --port N --device cpu ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenspeed import runner  # noqa: E402
from tokenspeed.cli import main  # noqa: E402


def free_run(self, batch, temperature, return_entropy, rich=None, routing=None):
    zeros = torch.zeros(batch.num_scored, dtype=torch.float32, device=self.device)
    return runner.BatchScores(zeros, zeros.clone() if return_entropy else None)


if __name__ == "__main__":
    runner.ModelRunner.run = free_run
    raise SystemExit(main())
