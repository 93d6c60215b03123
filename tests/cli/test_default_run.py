"""`minidisc compress` with no arguments: the built-in example end to end, at its test size
(MINIDISC_BUILTIN=test: a tiny teacher, a few steps), then `minidisc report` re-rendering it."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import MINIDISC, accuracy_on, held_out_blocks, run_python

from engine.cli.demo import VERSION
from engine.report.formatting import models_of

pytestmark = [pytest.mark.slow]


def run(cwd, *args, cache, check=True) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MINIDISC_CACHE": str(cache), "MINIDISC_BUILTIN": "test", "OMP_NUM_THREADS": "1",
           "COLUMNS": "240"}
    result = subprocess.run([MINIDISC, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900,
                            env=env)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("default")
    result = run(root / "first", "compress", cache=root / "cache")
    return root, root / "first" / "minidisc-demo", result


def test_default_run_writes_consistent_artifacts(default_run):
    root, out, result = default_run
    assert "pretraining the teacher" in result.stderr  # first run: built and cached
    assert (root / "cache" / f"builtin-test-v{VERSION}" / "teacher" / "pretraining.json").is_file()
    report = json.loads((out / "report.json").read_text())
    for name in ("report.md", "tradeoff.png", "models.png", "widths.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert set(report["baselines"]) == {"kd-matched", "kd", "ce"}
    assert report["selected_ta"] is None or (out / "ta" / "config.json").is_file()

    # every student on disk is the model the report describes (re-evaluated independently on test)
    test = held_out_blocks(out, root / "cache")["test"]
    student = report["student"]
    assert accuracy_on(out / "student", test) == pytest.approx(student["accuracy"], abs=1e-9)
    for name, baseline in report["baselines"].items():
        assert accuracy_on(out / "baselines" / name, test) == pytest.approx(baseline["accuracy"], abs=1e-9)
        assert baseline["parameters"] == student["parameters"]  # same size
        gain = report["student_vs_baselines"][name]
        assert gain["accuracy"] == pytest.approx(student["accuracy"] - baseline["accuracy"])
        assert gain["loss"] == pytest.approx(baseline["loss"] - student["loss"])
        low, high = gain["accuracy_interval"]  # paired over the test blocks the report measured
        assert low <= gain["accuracy"] <= high and gain["blocks"] == len(test)
    # no distillation trains without a teacher: its steps cost the student's alone, the kd steps' teacher forward not
    kd, ce = (report["baselines"][name]["compute"] for name in ("kd", "ce"))
    assert kd["steps"] == ce["steps"] and ce["train_flops"] < kd["train_flops"]
    assert report["stage_timings"]["baseline-ce"].get("teacher forwards") is None
    regime = report["regime"]
    assert regime["checked"] and regime["kd"] == "kd" and "accuracy_interval" in regime["teacher_minus_ce"]
    assert regime["kd_minus_ce"]["accuracy"] == pytest.approx(
        report["baselines"]["kd"]["accuracy"] - report["baselines"]["ce"]["accuracy"])
    assert "Regime (test accuracy): teacher - no distillation" in result.stdout
    # --max-steps for the student stage and the kd and ce baselines; kd-matched gets the training FLOPs of sandwich +
    # student, the sandwich a fifth of them (--sandwich-share, the student stage counted as plain KD's steps)
    steps = {stage: max(p["step"] for p in curves["train"]) for stage, curves in report["curves"].items()}
    assert {k: v for k, v in steps.items() if k not in ("sandwich", "baseline-kd-matched")} == {
        "student": 6, "baseline-kd": 6, "baseline-ce": 6}
    matched, pipeline = report["baselines"]["kd-matched"]["compute"], student["compute"]
    step_flops = matched["train_flops"] / matched["steps"]
    assert matched["steps"] > 6 and abs(matched["train_flops"] - pipeline["train_flops"]) <= step_flops / 2
    sandwich = report["compute"]["sandwich"]
    sandwich_step, wanted = sandwich["train_flops"] / sandwich["steps"], 0.2 / 0.8 * 6 * step_flops
    assert steps["sandwich"] == sandwich["steps"] >= 1
    assert abs(sandwich["train_flops"] - wanted) <= sandwich_step / 2 or (
        sandwich["steps"] == 1 and wanted < sandwich_step)

    md = (out / "report.md").read_text()
    assert "| plain KD |" in md and "| no distillation |" in md and "(models.png)" in md
    assert "the plain KD, equal FLOPs student (given the training FLOPs of the whole MiniDisc pipeline)" in md
    assert "same budget" not in md
    assert "student s=0.9" in result.stdout  # the console summary

    # every model's greedy continuation of the same prompts, and a model card in every published model
    samples = report["samples"]
    assert len(samples["prompts"]) == 3 and samples["new_tokens"] == 32
    assert set(samples["models"]) == {"teacher", "student (MiniDisc)", "plain KD", "plain KD, equal FLOPs",
                                      "no distillation"} | (
        {"TA"} if report["ta"] else set())
    assert "## Samples" in md and all(f"| {label} |" in md for label in samples["models"])
    published = ["student", "baselines/kd", "baselines/kd-matched", "baselines/ce"] + (["ta"] if report["ta"] else [])
    for folder in published:
        card = (out / folder / "README.md").read_text()
        assert "\nlibrary_name: transformers\n" in card.split("\n---\n")[0] and "## Quality" in card, folder
        assert "minidisc_cloze | acc |" in card, folder  # the benchmark scores of that model
        assert "## Training" in card and "| training FLOPs |" in card and "arXiv:2205.14570" in card, folder
    # what a user shares names its inputs, never a path of this machine (run.json and work/ are resume state)
    shared = [p for p in out.rglob("*") if p.is_file() and "work" not in p.relative_to(out).parts
              and p.name not in ("run.json", ".lock")]
    assert not [p for p in shared if str(root).encode() in p.read_bytes()]
    assert report["student"]["path"] == "student" and report["config"]["teacher"] == "teacher"
    environment = report["environment"]
    assert {"minidisc", "torch", "transformers", "deepspeed", "datasets"} <= set(environment["packages"])
    assert environment["device"].startswith("CPU") and environment["processes"] == 1

    # lm-eval's local tasks on every model, in the report and its table
    assert report["benchmarks"]["tasks"] == ["minidisc_ppl", "minidisc_cloze"]
    for label, _, metrics in models_of(report):
        assert set(metrics["benchmarks"]) == {"minidisc_ppl", "minidisc_cloze"}, label
        assert 0 <= metrics["benchmarks"]["minidisc_cloze"]["acc"] <= 1
        assert metrics["benchmarks"]["minidisc_ppl"]["byte_perplexity"] > 1
    assert "## Benchmarks" in md and "minidisc_cloze acc" in md


def test_the_cached_teacher_is_reused(default_run):
    root, _, _ = default_run
    # a shorter run than the built-in one (the reuse is what is checked): one baseline, no samples, one task
    second = run(root / "first", "compress", "--out", "again", "--baselines", "kd", "--sample-tokens", "0",
                 "--eval-tasks", "minidisc_ppl", "--no-supernet", cache=root / "cache")
    assert "reusing the pretrained teacher" in second.stderr and "pretraining the teacher" not in second.stderr
    again = root / "first" / "again"
    assert json.loads((again / "report.json").read_text())["supernet"] is None and not (again / "supernet").exists()
    assert not (again / "work" / "sandwich" / "supernet").exists() and "Trained widths" not in second.stdout
    refused = run(root / "first", "compress", cache=root / "cache", check=False)  # the first output is kept
    assert refused.returncode == 2 and "pass --resume" in refused.stderr


def test_report_command_rerenders(default_run, tmp_path):
    _, out, _ = default_run
    before = (out / "report.md").read_text()
    for name in ("report.md", "tradeoff.png", "models.png", "curves.png"):
        (out / name).unlink()
    result = run(tmp_path, "report", out, cache=tmp_path)
    assert (out / "report.md").read_text() == before
    assert all((out / name).stat().st_size > 0 for name in ("tradeoff.png", "models.png", "curves.png"))
    assert "student s=0.9" in result.stdout and "wrote" in result.stdout
    missing = run(tmp_path, "report", tmp_path / "nothing", cache=tmp_path, check=False)
    assert missing.returncode == 2 and "report.json does not exist" in missing.stderr


def test_the_student_loads_and_generates_without_the_engine(default_run):
    """What a user does with the output on another machine: plain transformers, the checkpoint's own code."""
    _, out, _ = default_run
    code = ("import sys, json; sys.modules['engine'] = None\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "ids = tokenizer('The Python', return_tensors='pt').input_ids\n"
            "new = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, ids.shape[1]:]\n"
            "print(json.dumps([sum(p.numel() for p in model.parameters()), len(new)]))\n")
    result = run_python(code, out / "student")
    assert result.returncode == 0, result.stderr[-3000:]
    parameters, generated = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert parameters == report["student"]["parameters"] and generated == 5
