"""The report's numbers: every model it names, loaded from disk and measured on the test split.

The dev split selected these models (p(s), best snapshots, MaxiDisc's winner), so its scores are biased
upward, most of all a best-of-K; the test split never selected anything. Each model keeps the dev figures
that chose it as `dev_accuracy` / `dev_loss`.
"""
from __future__ import annotations

import gc
import math

import torch

from engine.distillation.sandwich import score_model
from engine.distillation.selection import relative
from engine.models.loading import load_causal_lm
from engine.tools.report_format import models_of


def score_checkpoint(path, split, batch_size: int, device, dtype) -> dict:
    """Test accuracy and loss of the checkpoint in `path` (freed afterwards)."""
    model = load_causal_lm(path, dtype=dtype).to(device)
    stats = score_model(model, split, batch_size, device)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return stats


def score_report(report: dict, score) -> None:
    """Put test figures in `report` in place: `score(path)` measures a checkpoint. Models get accuracy, loss,
    perplexity and relative accuracy (to the teacher's test accuracy) on test; MaxiDisc's per-candidate
    students get `student_accuracy` on test; baselines get the student's gains over them."""
    teacher_accuracy = None
    for _, role, metrics in models_of(report):
        stats = score(metrics["path"])
        metrics.update(dev_accuracy=metrics["accuracy"], dev_loss=metrics["loss"], accuracy=stats["accuracy"],
                       loss=stats["loss"], perplexity=perplexity(stats["loss"]), test_tokens=stats["tokens"])
        if role == "teacher":
            teacher_accuracy = stats["accuracy"]
        elif teacher_accuracy is not None:
            metrics["relative_accuracy"] = relative(stats["accuracy"], teacher_accuracy)
    for row in report.get("candidates") or []:
        if row.get("student_path"):
            row["student_dev_accuracy"] = row["student_accuracy"]
            row["student_accuracy"] = score(row["student_path"])["accuracy"]
    student, baselines = report.get("student"), report.get("baselines") or {}
    report["student_vs_baselines"] = {name: gain(student, b) for name, b in baselines.items()}


def gain(student: dict, baseline: dict) -> dict:
    """How much better the MiniDisc student is than a baseline on test (positive = better)."""
    return {"accuracy": student["accuracy"] - baseline["accuracy"],
            "relative_accuracy": relative(student["accuracy"], baseline["accuracy"]) - 1,
            "loss": baseline["loss"] - student["loss"],
            "perplexity_ratio": baseline["perplexity"] / student["perplexity"]}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
