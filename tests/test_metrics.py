"""tokenspeed.metrics.agreement on constructed inputs with known answers."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenspeed.metrics import agreement


def test_known_answers_ragged():
    ref = [[-1.0, -2.0], [-0.5], []]
    cand = [[-1.0, -2.5], [-0.25], []]
    got = agreement(ref, cand)
    deltas = [0.0, -0.5, 0.25]
    assert got["tokens"] == 3
    assert got["mean_abs_diff"] == pytest.approx(0.25)
    assert got["max_abs_diff"] == pytest.approx(0.5)
    assert got["kl_k3"] == pytest.approx(sum(math.exp(d) - 1 - d for d in deltas) / 3)
    assert got["mean_prob_ratio_error"] == pytest.approx(sum(math.exp(abs(d)) for d in deltas) / 3)
    first, second, empty = got["per_sequence"]
    assert first["max_abs_diff"] == pytest.approx(0.5) and first["mean_abs_diff"] == 0.25
    assert second["kl_k3"] == pytest.approx(math.exp(0.25) - 1.25)
    assert all(math.isnan(v) for v in empty.values())


def test_identical_inputs_agree_exactly_and_filtered_tokens():
    ref = [[-1.0, -math.inf], [-3.0]]
    got = agreement(ref, [list(r) for r in ref])
    assert got["mean_abs_diff"] == got["max_abs_diff"] == got["kl_k3"] == 0.0
    assert got["mean_prob_ratio_error"] == 1.0
    one_sided = agreement([[-1.0]], [[-math.inf]])
    assert one_sided["max_abs_diff"] == math.inf


@settings(max_examples=50, deadline=None)
@given(b=st.integers(1, 5), length=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_padded_with_mask_equals_ragged(b, length, seed):
    gen = torch.Generator().manual_seed(seed)
    ref = -torch.rand(b, length, generator=gen, dtype=torch.float64) * 5
    cand = ref + torch.randn(b, length, generator=gen, dtype=torch.float64) * 0.1
    lengths = torch.randint(0, length + 1, (b,), generator=gen)
    mask = torch.arange(length) < lengths[:, None]
    padded = agreement(ref.float(), cand.float(), mask)
    ragged = agreement([r[:n].float().tolist() for r, n in zip(ref, lengths)],
                       [c[:n].float().tolist() for c, n in zip(cand, lengths)])
    for key in ("mean_abs_diff", "max_abs_diff", "kl_k3", "mean_prob_ratio_error"):
        if ragged["tokens"]:
            assert padded[key] == pytest.approx(ragged[key], rel=1e-12)
    assert padded["tokens"] == ragged["tokens"] == int(lengths.sum())
    assert padded["kl_k3"] >= 0 or not ragged["tokens"]


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="sequence 1: reference has 2 tokens, candidate 1"):
        agreement([[-1.0], [-1.0, -2.0]], [[-1.0], [-1.0]])
    with pytest.raises(ValueError, match="reference has 1 sequences, candidate 2"):
        agreement([[-1.0]], [[-1.0], [-2.0]])
    with pytest.raises(ValueError, match="mask is"):
        agreement(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        agreement([[math.nan]], [[-1.0]])


def test_compare_command_prints_the_metrics(tmp_path):
    import json
    import subprocess
    import sys
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"log_probs": [-1.0, -2.0], "id": 1}) + "\n"
                 + json.dumps({"log_probs": [-0.5]}) + "\n")
    b.write_text(json.dumps({"log_probs": [-1.0, -2.5]}) + "\n"
                 + json.dumps({"log_probs": [-0.25]}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "tokenspeed", "compare", str(a), str(b)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 sequences, 3 tokens" in proc.stdout
    assert "max_abs_diff: 0.5" in proc.stdout and "mean_abs_diff: 0.25" in proc.stdout
    assert proc.stdout.index("line 1:") < proc.stdout.index("line 2:")  # worst first
    b.write_text(json.dumps({"log_probs": [-1.0]}) + "\n" + json.dumps({"log_probs": [-0.25]}))
    proc = subprocess.run([sys.executable, "-m", "tokenspeed", "compare", str(a), str(b)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "line 1 of" in proc.stderr and "2 log-probs" in proc.stderr
