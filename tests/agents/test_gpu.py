"""GPU allocation: institutions that ask for a (fraction of a) GPU get one and train on it."""

import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fractional_gpu_requests_place_hosts_on_cuda(tmp_path):
    # Two institutions share one GPU (0.5 each); require: refuse rather than fall back to CPU.
    proc = subprocess.run(
        [sys.executable, "-m", "sim", "smoke=true", "scenario.num_institutions=2", "scenario.gpus=0.5",
         "placement=dedicated", "engine.gpu_policy=require", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "hosts train on cuda" in out
