"""engine.report.report and scoring.measured_on_test: the typed report, report.json's keys written from it, and the
report measured on test (dev figures kept, relative accuracy to the teacher's test accuracy, comparisons)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from engine.report.report import Candidate, Figures, Report, Selection
from engine.report.scoring import measured_on_test

TOP_LEVEL = ["format", "command", "target_sparsity", "lam", "metric", "teacher", "candidates", "selected_ta",
             "ta_reason", "ta", "student", "baselines", "curves", "supernet", "data", "compute", "phases",
             "stage_timings", "stage_memory", "config", "environment", "test_block_tokens", "student_vs_baselines",
             "regime", "samples", "benchmarks"]


def figures(sparsity, accuracy, path, **extra) -> Figures:
    return Figures(sparsity=sparsity, parameters=round(1000 * (1 - sparsity)), accuracy=accuracy, loss=2.0,
                   perplexity=math.exp(2.0), path=path, **extra)


def candidate(sparsity, student_path=None) -> Candidate:
    return Candidate(sparsity=sparsity, parameters=500, accuracy=0.4, loss=2.5, perplexity=math.exp(2.5), scale=0.5,
                     p=0.8, tradeoff=0.9, best_step=3, parameter_fraction=0.5,
                     student_accuracy=None if student_path is None else 0.25, student_path=student_path)


def distill_report() -> Report:
    return Report(command="distill", target_sparsity=0.9, lam=0.2, metric="relative_accuracy",
                  teacher=figures(0.0, 0.5, "/t"), student=figures(0.9, 0.3, "/out/student", best_step=4), curves={})


def test_every_command_writes_every_key_and_models_leave_out_what_does_not_apply():
    distill = distill_report().to_dict()
    assert list(distill) == TOP_LEVEL
    assert distill["candidates"] == [] and distill["ta"] is None and distill["baselines"] == {}
    assert distill["selected_ta"] is None and distill["supernet"] is None
    assert distill["student"] == {"sparsity": 0.9, "parameters": 100, "accuracy": 0.3, "loss": 2.0,
                                  "perplexity": math.exp(2.0), "path": "/out/student", "best_step": 4}
    compress = replace(distill_report(), command="compress", candidates=[candidate(0.5)],
                       selected_ta=Selection(0.5, 3, "ta"), ta=figures(0.5, 0.4, "/out/ta")).to_dict()
    assert list(compress) == TOP_LEVEL
    assert compress["selected_ta"] == {"sparsity": 0.5, "step": 3, "path": "ta"}
    assert "student_accuracy" not in compress["candidates"][0]


def test_measured_on_test_keeps_dev_figures_and_compares_on_the_same_blocks():
    """A scorer that knows each checkpoint's test blocks: the teacher is measured first, every other model's
    relative accuracy is to the teacher's *test* accuracy, MaxiDisc candidates' students are measured, and the
    student is compared with each baseline over the same blocks."""
    blocks = {"/t": [(6, 10), (5, 10)], "/out/ta": [(5, 10), (4, 10)], "/out/student": [(4, 10), (4, 10)],
              "/out/baselines/ce": [(3, 10), (3, 10)], "/out/via-0.5": [(2, 10), (2, 10)]}
    scored = []

    def score(path):
        scored.append(path)
        correct, tokens = sum(c for c, _ in blocks[path]), sum(t for _, t in blocks[path])
        return {"accuracy": correct / tokens, "loss": 1.5, "tokens": tokens, "blocks": blocks[path]}

    report = replace(distill_report(), command="maxidisc", candidates=[candidate(0.5, "/out/via-0.5"), candidate(0.9)],
                     ta=figures(0.5, 0.45, "/out/ta"),
                     baselines={"ce": figures(0.9, 0.2, "/out/baselines/ce", label="no distillation")})
    measured = measured_on_test(report, score)
    assert scored == ["/t", "/out/ta", "/out/student", "/out/baselines/ce", "/out/via-0.5"]  # the teacher first
    student = measured.student
    assert (student.accuracy, student.dev_accuracy, student.dev_loss, student.loss) == (0.4, 0.3, 2.0, 1.5)
    assert student.relative_accuracy == pytest.approx(0.4 / 0.55) and measured.teacher.relative_accuracy is None
    assert student.test_correct == [4, 4] and measured.test_block_tokens == [10, 10] and student.best_step == 4
    assert measured.ta.relative_accuracy == pytest.approx(0.45 / 0.55)
    via, direct = measured.candidates
    assert (via.student_accuracy, via.student_dev_accuracy) == (0.2, 0.25) and direct.student_accuracy is None
    gain = measured.student_vs_baselines["ce"]
    assert gain["accuracy"] == pytest.approx(0.1) and gain["accuracy_interval"] == pytest.approx([0.1, 0.1])
    assert measured.regime["checked"] and measured.regime["teacher_minus_ce"]["accuracy"] == pytest.approx(0.25)
    assert report.student.accuracy == 0.3  # the dev report is left as it was
