"""The supernet under DeepSpeed ZeRO-3 with 2 processes (gloo) matches the unsharded model."""

import pytest
from helpers import launch_two_ranks

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.mark.parametrize("name", ["qwen3_qh", "opt"])  # LLaMA-GQA runs 2 processes in test_trainer
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
