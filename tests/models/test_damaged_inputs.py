"""Damaged inputs end in one line naming the file or option and what to do, before any output is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import FP32, minidisc, options

from engine.config import RunConfig
from engine.core.errors import UserError
from engine.models.loading import check_checkpoint
from engine.training.deepspeed_config import read_ds_config


def damaged_copy(source: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    damage(copy)
    return copy


def truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def edit_tokenizer(change):
    def damage(directory: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        change(tokenizer)
        tokenizer.save_pretrained(directory)
    return damage


def edit_plan(change):
    def damage(directory: Path) -> None:
        plan = json.loads((directory / "pruning.json").read_text())
        change(plan["importance"])
        (directory / "pruning.json").write_text(json.dumps(plan))
    return damage


@pytest.mark.parametrize("damage, message", [
    (truncate_weights, "model.safetensors is damaged (Error while deserializing header"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"),
     "model.safetensors is damaged"),
    (lambda d: (d / "config.json").write_text("{not json"), "cannot read"),
    (edit_plan(lambda imp: imp["ffn"][1].pop()), "does not match the model beside it (layer 1: (attention units, "
                                                 "FFN neurons)"),
    (edit_plan(lambda imp: (imp["ffn"].pop(), imp["attention"].pop())), "layers planned"),
    (lambda d: (d / "pruning.json").write_text("[1, 2"), "pruning.json is damaged"),
    (edit_tokenizer(lambda t: t.add_tokens([f"<extra{i}>" for i in range(8)])),
     "has 520 tokens but the model's vocab_size is 512: they do not belong together"),
    (edit_tokenizer(lambda t: setattr(t, "bos_token", "</s>")),
     "starts sequences with token 2 (</s>) but the model's bos_token_id is 1"),
])
def test_a_damaged_checkpoint_is_named_in_one_line(pruned_dirs, tmp_path, damage, message):
    teacher = damaged_copy(pruned_dirs["llama_gqa"], tmp_path, damage)
    with pytest.raises(UserError) as error:
        check_checkpoint(teacher, 32)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_sharded_checkpoint_missing_a_shard_is_refused(pruned_dirs, tmp_path):
    def reshard(directory: Path) -> None:
        (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
        weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    teacher = damaged_copy(pruned_dirs["opt"], tmp_path, reshard)
    with pytest.raises(UserError, match="lacks model-00002-of-00002.safetensors, named in model.safetensors.index"):
        check_checkpoint(teacher, 32)


@pytest.mark.parametrize("field, value, message", [
    ("lam", float("nan"), "--lam nan: give a finite number"),
    ("lam", float("inf"), "--lam inf: give a finite number"),
    ("lr", float("nan"), "--lr nan: give a finite number"),
    ("lam", -0.1, "--lam -0.1 cannot be negative"),
    ("ce_weight", -1.0, "--ce-weight -1 cannot be negative"),
    ("lr", -1.0, "--lr and --temperature must be positive"),
    ("temperature", 0.0, "--lr and --temperature must be positive"),
    ("stack_widths", -1, "--stack-widths, --patience"),
])
def test_non_finite_and_negative_options_are_refused(field, value, message):
    with pytest.raises(UserError, match=pytest.importorskip("re").escape(message)):
        RunConfig(teacher="t", data="d", out="o", **{field: value}).validate()


@pytest.mark.parametrize("config, message", [
    ({"zero_optimisation": {"stage": 3}}, "unknown key 'zero_optimisation'; did you mean 'zero_optimization'?"),
    ({"zero_optimization": {"stage": 3, "overlap_com": True}}, "zero_optimization.overlap_com: Extra inputs"),
    ({"zero_optimization": {"stage": "three"}}, "zero_optimization.stage:"),
])
def test_deepspeed_configs_with_unknown_keys_are_refused(tmp_path, config, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=pytest.importorskip("re").escape(message)):
        read_ds_config(path)


def test_our_configs_and_sections_deepspeed_reads_elsewhere_pass(tmp_path):
    for path in sorted(Path(FP32).parent.glob("*.json")):
        read_ds_config(path)
    # sections not in DeepSpeed's runtime constants, and a key close to no known one (a newer DeepSpeed's)
    config = {"train_micro_batch_size_per_gpu": 1, "comms_logger": {"enabled": False}, "some_future_section": {},
              "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    assert read_ds_config(tmp_path / "ds.json") == config


@pytest.mark.slow
def test_the_cli_refuses_a_damaged_teacher_and_writes_nothing(pruned_dirs, corpus, tmp_path):
    teacher = damaged_copy(pruned_dirs["opt"], tmp_path, truncate_weights)
    out = tmp_path / "out"
    result = minidisc("compress", *options(teacher, corpus, out), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"minidisc: error: {teacher}/model.safetensors is "
                                                               "damaged")
    assert not out.exists()
