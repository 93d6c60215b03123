"""The report's numbers: every model it names, loaded from disk and measured on the test split.

The dev split selected these models (p(s), best snapshots, MaxiDisc's winner), so its scores are biased
upward, most of all a best-of-K; the test split never selected anything. Each model keeps the dev figures
that chose it as `dev_accuracy` / `dev_loss`.
"""
from __future__ import annotations

import math

import numpy as np

from engine.distillation.evaluation import score_model
from engine.distillation.selection import relative
from engine.models.loading import load_causal_lm
from engine.report.formatting import models_of
from engine.training.memory import give_back


def score_checkpoint(path, split, batch_size: int, device, dtype) -> dict:
    """Test accuracy and loss of the checkpoint in `path` (freed afterwards)."""
    return score_and_free(load_causal_lm(path, dtype=dtype).to(device), split, batch_size, device)


def score_and_free(model, split, batch_size: int, device) -> dict:
    """`score_model`, then the model's memory given back (the caller passes its only reference)."""
    stats = score_model(model, split, batch_size, device)
    del model
    give_back()
    return stats


def score_report(report: dict, score) -> None:
    """Put test figures in `report` in place: `score(path)` measures a checkpoint. Models get accuracy, loss,
    perplexity, relative accuracy (to the teacher's test accuracy) and each test block's correct predictions
    (`test_correct`; the blocks' token counts are `test_block_tokens`) on test; MaxiDisc's per-candidate
    students get `student_accuracy` on test; baselines get the student's gains over them, and the report the
    regime check (`regime`)."""
    teacher_accuracy = None
    for _, role, metrics in models_of(report):
        stats = score(metrics["path"])
        metrics.update(dev_accuracy=metrics["accuracy"], dev_loss=metrics["loss"], accuracy=stats["accuracy"],
                       loss=stats["loss"], perplexity=perplexity(stats["loss"]), test_tokens=stats["tokens"],
                       test_correct=[c for c, _ in stats["blocks"]])
        report["test_block_tokens"] = [t for _, t in stats["blocks"]]
        if role == "teacher":
            teacher_accuracy = stats["accuracy"]
        elif teacher_accuracy is not None:
            metrics["relative_accuracy"] = relative(stats["accuracy"], teacher_accuracy)
    for row in report.get("candidates") or []:
        if row.get("student_path"):
            row["student_dev_accuracy"] = row["student_accuracy"]
            row["student_accuracy"] = score(row["student_path"])["accuracy"]
    compare(report)


def score_widths(report: dict, score_width) -> None:
    """Each width the sandwich trained (`report["supernet"]["widths"]`), on test: its slice of the trained supernet
    and, for comparison, the same slice of the pruned teacher (a one-shot prune, no training), with the paired
    interval of the difference. `score_width(directory, sparsity)` measures a slice."""
    supernet, tokens = report["supernet"], report.get("test_block_tokens")
    for row in supernet["widths"]:
        for side, source in (("trained", supernet["path"]), ("one_shot", supernet["one_shot"])):
            stats = score_width(source, row["sparsity"])
            row[side] = {"accuracy": stats["accuracy"], "loss": stats["loss"],
                         "test_correct": [c for c, _ in stats["blocks"]]}
        row["gain"] = {"accuracy": row["trained"]["accuracy"] - row["one_shot"]["accuracy"],
                       **paired_interval(row["trained"]["test_correct"], row["one_shot"]["test_correct"], tokens)}


def compare(report: dict) -> None:
    """The report's paired comparisons on the test blocks, from its models' test figures: the student against
    each baseline (`student_vs_baselines`) and the regime check (`regime`)."""
    student, baselines = report.get("student"), report.get("baselines") or {}
    tokens = report.get("test_block_tokens")
    report["student_vs_baselines"] = {name: gain(student, b, tokens) for name, b in baselines.items()}
    report["regime"] = regime(report.get("teacher"), baselines, tokens, report.get("command", "compress"))


def gain(student: dict, baseline: dict, tokens: list[int] | None = None) -> dict:
    """How much better the MiniDisc student is than a baseline on test (positive = better), with the paired
    bootstrap interval of the accuracy difference when the blocks' figures are known."""
    return {"accuracy": student["accuracy"] - baseline["accuracy"],
            **paired_interval(student.get("test_correct"), baseline.get("test_correct"), tokens),
            "relative_accuracy": relative(student["accuracy"], baseline["accuracy"]) - 1,
            "loss": baseline["loss"] - student["loss"],
            "perplexity_ratio": baseline["perplexity"] / student["perplexity"]}


BOOTSTRAP = 2000  # resamples of the test blocks: the interval's ends move by ~0.05 points between seeds


def paired_interval(a: list[int] | None, b: list[int] | None, tokens: list[int] | None,
                    level: float = 0.95, seed: int = 0) -> dict:
    """The 95% paired bootstrap interval of accuracy(a) - accuracy(b), two models' correct predictions on the same
    test blocks: the blocks are resampled with replacement, both models together, so what the blocks share (their
    difficulty) cancels. {} when the figures are missing (a report from an older version)."""
    if not (a and b and tokens) or not len(a) == len(b) == len(tokens):
        return {}
    a, b, n = np.asarray(a, float), np.asarray(b, float), np.asarray(tokens, float)
    draws = np.random.default_rng(seed).integers(0, len(n), size=(BOOTSTRAP, len(n)))
    diffs = (a[draws].sum(1) - b[draws].sum(1)) / np.maximum(n[draws].sum(1), 1)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return {"accuracy_interval": [float(low), float(high)], "blocks": len(n), "bootstrap": BOOTSTRAP}


def accuracy_interval(correct: list[int] | None, tokens: list[int] | None, level: float = 0.95, seed: int = 0):
    """The 95% bootstrap interval of one model's test accuracy over the test blocks (unpaired: it holds the blocks'
    difficulty, which a paired difference cancels), or None without the per-block figures."""
    if not (correct and tokens) or len(correct) != len(tokens):
        return None
    a, n = np.asarray(correct, float), np.asarray(tokens, float)
    draws = np.random.default_rng(seed).integers(0, len(n), size=(BOOTSTRAP, len(n)))
    low, high = np.quantile(a[draws].sum(1) / np.maximum(n[draws].sum(1), 1), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


KD_FOR_REGIME = ("kd", "kd-matched", "kd-steps")  # the plain-KD student the regime check reads, first found


def regime(teacher: dict | None, baselines: dict, tokens: list[int] | None, command: str = "compress") -> dict:
    """Does the teacher know more than the data? Teacher - no distillation and plain KD - no distillation on test
    (paired intervals), and a warning when no distillation is at least as good as plain KD: then no teacher
    signal, with or without a TA, can help on this data. Needs the `ce` baseline of `compress`."""
    ce = baselines.get("ce")
    kd_name = next((name for name in KD_FOR_REGIME if name in baselines), None)
    if ce is None or teacher is None:
        how = ("add ce (no distillation) and kd to --baselines" if command == "compress" else
               "compare with the same student trained without distillation: minidisc distill --logit-weight 0 "
               "--hidden-weight 0 --ce-weight 1")
        return {"checked": False, "why": f"{how}, to check that distillation can help on this data"}
    out = {"checked": True, "teacher_minus_ce": {"accuracy": teacher["accuracy"] - ce["accuracy"],
                                                 **paired_interval(teacher.get("test_correct"),
                                                                   ce.get("test_correct"), tokens)}}
    if kd_name:
        kd = baselines[kd_name]
        out["kd"] = kd_name
        out["kd_minus_ce"] = {"accuracy": kd["accuracy"] - ce["accuracy"],
                              **paired_interval(kd.get("test_correct"), ce.get("test_correct"), tokens)}
    helps = [out[key]["accuracy"] > 0 for key in ("teacher_minus_ce", "kd_minus_ce") if key in out]
    out["warning"] = None if all(helps) else (
        "the teacher adds nothing on this data: the student trained without distillation is at least as good, "
        "so distillation, with or without a TA, cannot help here")
    return out


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
