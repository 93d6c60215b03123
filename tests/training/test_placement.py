"""Memory placements of a run: where the frozen teacher lives (--teacher-placement), the trained model's
optimiser (--optimizer) and CPU offload (a DeepSpeed JSON), each through `minidisc distill` end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, minidisc, options, tiny_model  # the console script and the tiny run

from engine.config import RunConfig
from engine.training.stage import TrainConfig

pytestmark = [pytest.mark.slow]


def student_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "student" / "model.safetensors")


def run_distill(teacher, corpus, out, *extra) -> tuple[dict, str]:
    result = minidisc("distill", *options(teacher, corpus, out, "--max-steps", "6", "--eval-every", "3", *extra))
    return json.loads((out / "report.json").read_text()), result.stderr


@pytest.fixture(scope="module")
def zero3_run(pruned_dirs, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3") / "run"
    report, log = run_distill(pruned_dirs["llama_gqa"], corpus, out)
    assert "trained with AdamW, ZeRO-3, teacher zero3" in log
    return out, report


def test_replicated_teacher_gives_the_same_student_as_sharded(zero3_run, pruned_dirs, corpus, tmp_path):
    report, log = run_distill(pruned_dirs["llama_gqa"], corpus, tmp_path / "run", "--teacher-placement", "replicated")
    assert "replicated copy per process" in log
    assert report["teacher"]["loss"] == pytest.approx(zero3_run[1]["teacher"]["loss"], abs=1e-6)
    reference = student_weights(zero3_run[0])
    for name, weight in student_weights(tmp_path / "run").items():
        torch.testing.assert_close(weight, reference[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("placement, linear, max_error", [("int8", "Linear8bitLt", 0.05), ("nf4", "Linear4bit", 0.3)])
def test_quantised_teacher_is_smaller_and_close(placement, linear, max_error, trained_teacher, corpus):
    """The quantised copy (bitsandbytes) replaces every decoder linear, keeps the LM head exact, takes less
    memory, and its logits stay near the full-precision teacher's."""
    from engine.models.loading import load_causal_lm
    from engine.training.engines import load_teacher

    cfg = RunConfig(teacher=str(trained_teacher), data="-", out="-", teacher_placement=placement)
    teacher, _ = load_teacher(trained_teacher, TrainConfig.of(cfg), {"bf16": {"enabled": False}})
    full = load_causal_lm(trained_teacher).eval()
    model = teacher.module
    kinds = {type(m).__name__ for name, m in model.named_modules() if name.endswith(("q_proj", "up_proj", "down_proj"))}
    assert kinds == {linear}
    assert type(model.lm_head).__name__ == "Linear" and model.lm_head.weight.dtype == torch.float32
    assert model.get_memory_footprint() < full.get_memory_footprint()
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, quantised = full(ids).logits, model(ids).logits
    error = ((quantised - reference).norm() / reference.norm()).item()
    assert 0 < error < max_error  # changed (really quantised), but not broken


def test_quantised_teacher_and_8bit_optimizer_end_to_end(zero3_run, pruned_dirs, corpus, tmp_path):
    report, log = run_distill(pruned_dirs["llama_gqa"], corpus, tmp_path / "run", "--teacher-placement", "nf4",
                              "--optimizer", "adamw8bit")
    assert "trained with AdamW8bit, ZeRO-3, teacher nf4" in log and "nf4 copy per process" in log
    reference = zero3_run[1]
    # a different teacher and optimiser, the same task: near the exact run, not identical to it
    assert report["student"]["loss"] != reference["student"]["loss"]
    assert report["student"]["loss"] == pytest.approx(reference["student"]["loss"], rel=0.05)


def test_8bit_optimizer_refuses_an_optimizer_block(pruned_dirs, corpus, tmp_path):
    result = minidisc("distill", *options(pruned_dirs["llama_gqa"], corpus, tmp_path / "run", "--optimizer",
                                          "adamw8bit", "--deepspeed", REPO / "ds_configs" / "zero3_train_offload.json"),
                      check=False)
    assert result.returncode == 2 and "cannot replace the optimizer block" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cpu_offload_gives_the_same_student(zero3_run, pruned_dirs, corpus, tmp_path):
    """Parameters and optimiser states on the CPU (DeepSpeed's CPU Adam, JIT-built on first use): the same
    fp32 computation as on the device, so the same student up to the optimiser kernels' rounding."""
    config = json.loads((REPO / "ds_configs" / "zero3_train_offload.json").read_text())
    config["bf16"]["enabled"] = False  # compare with the fp32 reference run
    path = tmp_path / "offload_fp32.json"
    path.write_text(json.dumps(config))
    report, log = run_distill(pruned_dirs["llama_gqa"], corpus, tmp_path / "run", "--deepspeed", path)
    assert "trained with DeepSpeedCPUAdam, ZeRO-3, param and optimizer offloaded to CPU" in log
    reference = student_weights(zero3_run[0])
    for name, weight in student_weights(tmp_path / "run").items():
        torch.testing.assert_close(weight, reference[name], rtol=0, atol=1e-5, msg=name)


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same(zero3_run, pruned_dirs, corpus, tmp_path):
    from engine.training.engines import checkpoint_layers

    def mlp_calls(checkpointed: bool) -> int:
        model = tiny_model("opt")
        if checkpointed:
            checkpoint_layers(model)
        calls = []
        model.model.decoder.layers[0].fc1.register_forward_hook(lambda *_: calls.append(1))
        # as the engine calls it: transformers 5.0 fills a KV cache in training too, which the recomputation extends
        model(torch.randint(3, 500, (2, 16)), use_cache=False).logits.sum().backward()
        return len(calls)

    assert (mlp_calls(False), mlp_calls(True)) == (1, 2)  # recomputed in the backward
    run_distill(pruned_dirs["llama_gqa"], corpus, tmp_path / "run", "--gradient-checkpointing")
    reference = student_weights(zero3_run[0])
    for name, weight in student_weights(tmp_path / "run").items():
        assert torch.equal(weight, reference[name]), name
