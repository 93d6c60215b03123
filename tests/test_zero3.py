"""The supernet under DeepSpeed ZeRO-3 with 2 processes (gloo) matches the unsharded model."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("zero3_supernet_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["llama_gqa", "opt"])
def test_supernet_under_zero3_two_processes(name, pruned_dirs, tmp_path):
    out = tmp_path / "report.json"
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), WORKER,
               "--pruned", pruned_dirs[name], "--out", out]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and out.exists(), (result.stdout + result.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert len(report["widths"]) == 4
    for row in report["widths"]:
        assert row["logit_error"] <= 1e-5, row
        assert row["grad_error"] <= 1e-5, row
        assert row["grad_norm"] > 0, row
