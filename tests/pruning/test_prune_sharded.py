"""Pruning with the teacher partitioned: 2 processes (gloo) score the units under ZeRO-3, each a share of the
calibration batches, and rank 0 writes the same pruned teacher, streamed from the checkpoint, as one process with the
whole teacher."""
import json

import pytest
import torch
from helpers import assert_same_weights, launch_two_ranks, save_teacher

import engine

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.mark.parametrize("name, unit", [("llama_gqa", "kv-group"), ("qwen3", "query-head")])
def test_sharded_scores_equal_one_process(name, unit, corpus, tokenizer_dir, tmp_path):
    teacher = save_teacher(name, tmp_path / "teacher", tokenizer_dir)
    single = engine.prune(teacher, corpus["jsonl"], tmp_path / "single", calib_samples=6, seq_len=16, batch_size=2,
                          attention_unit=unit)
    ranks = launch_two_ranks("sharded_prune_worker.py", tmp_path / "ranks.json", "--teacher", teacher, "--data",
                             corpus["jsonl"], "--pruned", tmp_path / "sharded", "--attention-unit", unit)
    # 3 batches of 2 blocks: rank 0 scores the first and third, rank 1 the second and an uncounted copy
    assert [r["batches"] for r in ranks] == [2, 2] and all(r["sharded"] for r in ranks)
    sharded = engine.PruningPlan.load(tmp_path / "sharded")
    # The same |dL/dmask| sums in another order (fp32 per batch, fp64 sums, the all-reduce): equal to ~1e-12
    # relative, but a ZeRO-3 gather may block a matmul differently, a few fp32 ulps per batch (1.2e-6 measured with
    # torch 2.6, pyproject's lowest): 1e-5.
    for ours, theirs in ((sharded.attention_scores, single.attention_scores), (sharded.ffn_scores, single.ffn_scores)):
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=1e-9)
    assert sharded.extra["original_index"] == single.extra["original_index"]  # the same units kept at every width
    # rank 0 wrote it from the checkpoint a tensor at a time, one process from its reordered copy: the same files
    assert ranks[0].get("streamed") and "streamed" not in ranks[1]
    assert_same_weights(tmp_path / "single", tmp_path / "sharded")
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "sharded" / name).read_text() == (tmp_path / "single" / name).read_text(), name
    assert json.loads((tmp_path / "sharded" / "pruning.json").read_text())["calibration"]["processes"] == 2


def test_the_prune_command_under_the_launcher_scores_on_every_rank(corpus, tokenizer_dir, tmp_path):
    """`deepspeed --num_gpus 2 minidisc prune ...` is one pruning over two ranks (not two prunings racing to
    write): rank 0 writes it, streamed, with the scores one process computes."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_port

    teacher = save_teacher("llama_gqa", tmp_path / "teacher", tokenizer_dir)
    options = ["--data", corpus["jsonl"], "--calib-samples", 6, "--calib-seq-len", 16, "--calib-batch-size", 2]
    scripts = Path(sys.executable).parent
    launcher, minidisc = [scripts / "deepspeed", "--num_gpus", 2, "--master_port", free_port()], scripts / "minidisc"
    for command, out in ((launcher + [minidisc], "two"), ([minidisc], "one")):
        result = subprocess.run([str(a) for a in [*command, "prune", "--teacher", teacher, "--out", tmp_path / out,
                                                  *options]], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    two, one = (engine.PruningPlan.load(tmp_path / out) for out in ("two", "one"))
    assert two.extra["calibration"]["processes"] == 2 and one.extra["calibration"]["processes"] == 1
    assert two.extra["original_index"] == one.extra["original_index"]
    assert_same_weights(tmp_path / "one", tmp_path / "two")
