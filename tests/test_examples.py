"""The examples run as a newcomer runs them: as scripts, on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_grpo_loop_example_runs_and_checks_itself(tmp_path):
    """The script asserts its own claims (engine = trainer forward, synced engine = fresh
    engine); here it must exit cleanly and report every step."""
    env = dict(os.environ, TOKENSPEED_CACHE=str(tmp_path))
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "grpo_loop.py"), "--steps", "2"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and "v2 synced and match a fresh engine" in lines[-1], run.stdout
