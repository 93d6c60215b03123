"""The shipped recipes: `--dry-run` of each against a checkpoint folder holding its model's published config
(no weights) and data in the recipe's format, and the dry run's own checks."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from helpers import MINIDISC, REPO, minidisc_forked

from engine.cli.memory_plan.estimate import GIB
from engine.cli.memory_plan.shapes import preset_config

RECIPES = {  # recipe -> (preset with the published shapes, data format it reads)
    "llama-2-7b-10pct": ("llama-2-7b", "jsonl"),
    "llama-3-8b-25pct": ("llama-3-8b", "parquet"),
    "opt-13b-10pct": ("opt-13b", "save_to_disk"),
    "opt-1.3b-10pct": ("opt-1.3b", "txt"),
    "mistral-7b-10pct": ("mistral-7b", "jsonl"),
    "qwen2.5-7b-25pct": ("qwen2.5-7b", "parquet"),
    "qwen3-8b-25pct": ("qwen3-8b", "save_to_disk"),
}


def test_every_shipped_recipe_is_listed():
    assert {p.stem for p in (REPO / "recipes").glob("*.yaml")} == set(RECIPES)


def write_data(directory: Path, kind: str, corpus) -> Path:
    import datasets

    texts = [p for p in corpus["train"].read_text().split("\n\n") if p.strip()][:50]
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "txt":
        return corpus["train"]
    if kind == "jsonl":
        return corpus["jsonl"]
    ds = datasets.Dataset.from_dict({"text": texts})
    if kind == "parquet":
        ds.to_parquet(directory / "train.parquet")
        return directory / "train.parquet"
    ds.save_to_disk(directory / "saved")
    return directory / "saved"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Folders with a preset's config.json and a tokenizer: everything a dry run reads of a checkpoint."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for preset, _ in RECIPES.values():
        config = preset_config(preset)
        config.bos_token_id = tokenizer.bos_token_id  # the test tokenizer stands in for the model's own
        config.save_pretrained(root / preset)
        tokenizer.save_pretrained(root / preset)
        out[preset] = root / preset
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_dry_run(name, checkpoints, corpus, tmp_path):
    preset, data_kind = RECIPES[name]
    recipe_path = REPO / "recipes" / f"{name}.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    data = write_data(tmp_path, data_kind, corpus)
    # from another directory: the recipe's relative ds_configs/ paths still resolve to this repository's
    result = subprocess.run([MINIDISC, "compress", "--config", recipe_path, "--teacher", checkpoints[preset],
                             "--data", data, "--dev-data", data, "--dry-run"], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "COLUMNS": "240"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = " ".join(result.stdout.split())
    assert "checks passed: config, tokenizer, data paths, DeepSpeed configs, batch split and memory" in out
    assert f"memory on {recipe['cluster']}" in out and ": fits;" in out
    assert f"target sparsity {recipe['target_sparsity']:g}" in out
    # candidate rows (~ marks a count estimated before pruning)
    widths = re.findall(r"│\s+([0-9.]+) │\s+~?[0-9,]+ │\s+~?[0-9.]+% │", result.stdout)
    assert widths[-1] == f"{recipe['target_sparsity']:g}" and widths[0] == "0.5"  # truncate .. the student
    assert not (tmp_path / "runs").exists()  # nothing written
    # what the recipe names exists: its DeepSpeed configs and its launch script
    for key in ("deepspeed", "teacher_deepspeed"):
        if key in recipe:
            assert (REPO / recipe[key]).is_file(), recipe[key]
    scripts = re.findall(r"launch_scripts/[\w.]+", recipe_path.read_text())
    assert scripts and all((REPO / s).is_file() for s in scripts), scripts


@pytest.mark.slow
def test_dry_run_reports_what_would_fail(checkpoints, corpus, tmp_path):
    recipe = REPO / "recipes" / "opt-13b-10pct.yaml"
    base = ["compress", "--config", recipe, "--teacher", checkpoints["opt-13b"], "--data", corpus["jsonl"],
            "--dev-data", corpus["jsonl"], "--dry-run"]

    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "baselines": ["distill"]}))
    cases = [(["--seq-len", "4096"], "exceeds the teacher's max_position_embeddings (2048)"),
             (["--cluster", "3x8x80"], "cannot be split evenly over 24 GPUs"),
             (["--cluster", "1x1x16", "--batch-size", "4", "--grad-accum", "1"], "GiB per GPU but 1x1x16 leaves"),
             (["--cluster", "1x1x30", "--batch-size", "4", "--grad-accum", "1"], "pruning the teacher needs"),
             (["--cluster", "8 GPUs"], "write NODESxGPUSxGIB"),
             (["--data", "/nonexistent/train.jsonl"], "data file"),
             (["--config", changed], "expects a list of kd, kd-matched, kd-steps, ce")]
    # one engine import, each command line in a fork of it (the console script itself: test_cli.py)
    for (extra, wanted), result in zip(cases, minidisc_forked([base + extra for extra, _ in cases], tmp_path / "logs")):
        assert result["exit"] == 2 and "Traceback" not in result["stderr"], result["stderr"][-2000:]
        assert wanted in result["stderr"].strip().splitlines()[-1], (extra, result["stderr"][-500:])


def test_dry_run_lists_the_widths_each_stage_trains(pruned_dirs, corpus, tmp_path):
    """--sparsest adds widths to the sandwich (not to the candidates); a joint student stage trains up to every
    width past the densest candidate TA."""
    from engine.cli.dry_run import dry_run
    from engine.config import RunConfig

    cfg = RunConfig(teacher=str(pruned_dirs["opt"]), data=str(corpus["jsonl"]), out=str(tmp_path / "o"),
                    truncate=0.7, sparsest=0.95, student_stage="joint", seq_len=32).validate()
    summary = dry_run(cfg, "compress")
    assert [c["sparsity"] for c in summary["candidates"]] == [0.7, 0.8, 0.85, 0.9]
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["sandwich"]["widths_per_step"] == 5  # 0.7 .. 0.9 and 0.95
    assert stages["student"]["widths_per_step"] == 4  # past a 0.7 TA: 0.8, 0.85, 0.9, 0.95
    assert summary["deepspeed"]["gradient_accumulation_steps"] == 1  # the 5 widths stacked in one forward
    grouped = dry_run(replace(cfg, stack_widths=2), "compress")["deepspeed"]["gradient_accumulation_steps"]
    assert grouped == 3  # forwards of 2, 2 and 1 widths
    # the sandwich's steps follow from --sandwich-share once the widths' FLOPs are known; --sandwich-steps fixes them
    assert stages["sandwich"]["steps"] is None and stages["sandwich"]["note"] == "0.2 of FLOPs"
    assert stages["student"]["steps"] == cfg.max_steps
    fixed = {s["stage"]: s for s in dry_run(replace(cfg, sandwich_steps=30), "compress")["stages"]}
    assert fixed["sandwich"]["steps"] == 30 and fixed["sandwich"]["tokens"] == 30 * cfg.batch_size * 32


@pytest.mark.parametrize("ffn_multiple", [1, 8])
def test_dry_run_parameter_counts_are_the_exported_models(pruned_dirs, corpus, tmp_path, ffn_multiple):
    """One counting rule: a dry run on a pruned teacher prints what `minidisc export` then writes; before
    pruning its counts are exact when FFN removals are not rounded (--ffn-multiple 1), and marked ~ otherwise."""
    import engine
    from engine.cli.dry_run import dry_run

    teacher = pruned_dirs["llama_gqa_bias"].parent / "teacher"
    pruned = tmp_path / "pruned"
    engine.prune(teacher, corpus["jsonl"], pruned, calib_samples=4, seq_len=32, batch_size=2,
                 ffn_multiple=ffn_multiple)
    for directory in (teacher, pruned):
        cfg = engine.RunConfig(teacher=str(directory), data=str(corpus["jsonl"]), out=str(tmp_path / "run"),
                               target_sparsity=0.9, truncate=0.0, seq_len=32, ffn_multiple=ffn_multiple).validate()
        candidates = dry_run(cfg, "compress")["candidates"]
        assert len(candidates) == len(engine.DEFAULT_GRID) - 1  # 0 ... 0.9 without 0.95
        for row in candidates:
            assert row["exact"] == (directory == pruned or ffn_multiple == 1), row
            exported = engine.export(pruned, row["sparsity"], tmp_path / "export")["parameters"]
            if row["exact"]:
                assert row["parameters"] == exported, row
            else:  # off by under ffn_multiple / 2 neurons per layer (3 layers, 48 + 48 + 48 + 1 weights each)
                assert abs(row["parameters"] - exported) <= 3 * 4 * (3 * 48 + 1), row


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-3-8b-25pct", "opt-1.3b-10pct"])
def test_plan_of_a_recipe_is_the_run_of_its_dry_run(name, checkpoints, corpus, tmp_path, capsys):
    """`minidisc plan --config RECIPE` and `compress --config RECIPE --dry-run` read the same options with the same
    defaults: the same candidate widths, micro-batch and memory for the recipe's placement."""
    from engine.cli.dry_run import dry_run
    from engine.cli.main import build_parser, main
    from engine.config import resolve

    preset, data_kind = RECIPES[name]
    recipe = REPO / "recipes" / f"{name}.yaml"
    assert main(["plan", preset, "--config", str(recipe), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    data = str(write_data(tmp_path, data_kind, corpus))
    args = build_parser().parse_args(["compress", "--config", str(recipe), "--teacher", str(checkpoints[preset]),
                                      "--data", data, "--dev-data", data, "--out", str(tmp_path / "out")])
    summary = dry_run(resolve(args), "compress")
    assert plan["run"]["candidates"] == [f"{c['sparsity']:g}" for c in summary["candidates"]]
    assert plan["cluster"]["gpus"] == math.prod(int(n) for n in yaml.safe_load(recipe.read_text())["cluster"]
                                                .split("x")[:2])
    row = next(r for r in plan["placements"] if r["name"] == summary["memory"]["placement"])
    assert row["total_bytes"] / GIB == pytest.approx(summary["memory"]["total_gib"], abs=0.01)
    assert plan["run"]["gradient_checkpointing"] == yaml.safe_load(recipe.read_text()).get("gradient_checkpointing",
                                                                                            False)
