"""Memory safety: build the scheduler with its random driver
(csrc/scheduler/standalone_fuzz.cpp) under AddressSanitizer and UndefinedBehaviorSanitizer,
assertions on, and run it over several seeds. The driver checks the same properties as
the state-machine test, so a failure is either a sanitizer report or a broken invariant.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCHEDULER = Path(__file__).resolve().parents[1] / "csrc" / "scheduler"
SEEDS = range(1, 25)
OPS_PER_SEED = 20_000


@pytest.fixture(scope="module")
def fuzz_binary(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    sources = [p for p in sorted(SCHEDULER.glob("*.cpp")) if p.name != "bindings.cpp"]
    binary = tmp_path_factory.mktemp("scheduler_asan") / "standalone_fuzz"
    cmd = [cxx, "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-UNDEBUG",
           "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-Wall", "-Wextra",
           f"-I{SCHEDULER}", *map(str, sources), "-o", str(binary)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return binary


@pytest.mark.parametrize("seed", SEEDS)
def test_random_ops_under_sanitizers(fuzz_binary, seed):
    env = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    run = subprocess.run([str(fuzz_binary), str(seed), str(OPS_PER_SEED)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"seed {seed}: {OPS_PER_SEED} ops ok" in run.stdout
