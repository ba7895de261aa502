"""The cloud's backprop past one process (issue "fleets"): torchrun --nproc-per-node 2 (gloo) gives the same
public gradient as one process within 1e-5 relative."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_ranks_gradient_equals_single_process(tmp_path, tiny_llama_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "grad.npz"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cloud.distributed",
                        "--model", str(tiny_llama_dir), "--out", str(out), "--batch", "7"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    z = np.load(out)
    assert int(z["world"]) == 2
    rel = np.linalg.norm(z["dp"] - z["single"]) / np.linalg.norm(z["single"])
    assert np.linalg.norm(z["single"]) > 0 and rel <= 1e-5, rel
    assert abs(float(z["loss_dp"]) - float(z["loss_single"])) <= 1e-5 * abs(float(z["loss_single"]))
