"""QAT under Lightning's DDP strategy: 2 gloo processes on the CPU end with identical quantizers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_qat_script.py")


def test_ddp_ranks_average_the_initial_ranges_and_end_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # the ranks saw different data ...
    (lo0, hi0), (lo1, hi1) = ranks[0]["observed"], ranks[1]["observed"]
    assert hi1 > 2 * hi0 and lo1 < 2 * lo0
    # ... and initialised the ranges from the mean of what they observed (minmax), identically
    for r in ranks:
        assert r["init_clips"] == pytest.approx([(lo0 + lo1) / 2, (hi0 + hi1) / 2], rel=1e-6)
    # after training (ranges learned, then frozen on schedule) every quantizer state is the same on both ranks
    a, b = ranks[0]["quantizers"], ranks[1]["quantizers"]
    assert a.keys() == b.keys() and "conv1.input_quantizer" in a
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key} differs between the ranks"
    assert ranks[0]["requires_grad"] == ranks[1]["requires_grad"]
    assert ranks[0]["requires_grad"]["conv1.input_quantizer.clip_max"] is False
    assert ranks[0]["bn_frozen"] and ranks[0]["quantizers_frozen"]
    assert float(a["conv1.input_quantizer"]["clip_max"]) != pytest.approx(ranks[0]["init_clips"][1], rel=1e-7)
