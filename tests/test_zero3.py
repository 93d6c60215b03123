"""The supernet under DeepSpeed ZeRO-3 with 2 processes (gloo) matches the unsharded model."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(worker: str, out: Path, *args) -> dict:
    """Run a worker with the `deepspeed` launcher on 2 CPU processes; returns rank 0's JSON report."""
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), HERE / worker, "--out", out, *args]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out.with_suffix(".log")
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0 and out.exists(), f"full log: {log}\n" + (result.stdout + result.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ["llama_gqa", "opt"])
def test_supernet_under_zero3_two_processes(name, pruned_dirs, tmp_path):
    report = launch_two_ranks("zero3_supernet_worker.py", tmp_path / "report.json", "--pruned", pruned_dirs[name])
    assert report["world_size"] == 2
    assert len(report["widths"]) == 4
    for row in report["widths"]:
        assert row["logit_error"] <= 1e-5, row
        assert row["grad_error"] <= 1e-5, row
        assert row["grad_norm"] > 0, row


def test_fused_linear_distill_on_partitioned_head(tmp_path):
    """kernels.fused_linear_distill_loss inside the forward of a ZeRO-3 module: same loss and gradients."""
    report = launch_two_ranks("zero3_fused_linear_worker.py", tmp_path / "report.json")
    assert report["partitioned"] and report["world_size"] == 2
    assert report["loss"] > 0 and report["loss_error"] <= 1e-6, report
    assert report["weight_grad_norm"] > 0
    for key in ("weight_grad_error", "bias_grad_error", "hidden_grad_error"):
        assert report[key] <= 1e-6, report
