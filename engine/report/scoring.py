"""The report's numbers: every model it names, loaded from disk and measured on the test split.

The dev split selected these models (p(s), best snapshots, MaxiDisc's winner), so its scores are biased
upward, most of all a best-of-K; the test split never selected anything. Each model keeps the dev figures
that chose it as `dev_accuracy` / `dev_loss`.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from engine.distillation.evaluation import score_model
from engine.distillation.selection import relative
from engine.models.loading import load_causal_lm
from engine.report.report import Figures, Report, TrainedWidths
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


def measured_on_test(report: Report, score) -> Report:
    """`report` with every model measured on test: `score(path)` measures a checkpoint. Models get accuracy, loss,
    perplexity, relative accuracy (to the teacher's test accuracy) and each test block's correct predictions
    (`test_correct`; the blocks' token counts are `test_block_tokens`); MaxiDisc's per-candidate students get
    `student_accuracy` on test; then the comparisons (`compared`)."""
    teacher_accuracy = tokens = None
    for _, key, figures in report.models():  # the teacher first: the others' relative accuracy needs its
        stats = score(figures.path)
        tokens = [t for _, t in stats["blocks"]]
        measured = replace(figures, dev_accuracy=figures.accuracy, dev_loss=figures.loss, accuracy=stats["accuracy"],
                           loss=stats["loss"], perplexity=perplexity(stats["loss"]), test_tokens=stats["tokens"],
                           test_correct=[c for c, _ in stats["blocks"]])
        if key == "teacher":
            teacher_accuracy = stats["accuracy"]
        elif teacher_accuracy is not None:
            measured = replace(measured, relative_accuracy=relative(stats["accuracy"], teacher_accuracy))
        report = report.with_model(key, measured)
    candidates = [c if not c.student_path else replace(c, student_dev_accuracy=c.student_accuracy,
                                                       student_accuracy=score(c.student_path)["accuracy"])
                  for c in report.candidates]
    return compared(replace(report, candidates=candidates, test_block_tokens=tokens))


def widths_measured_on_test(widths: TrainedWidths, tokens: list[int] | None, score_width) -> TrainedWidths:
    """Each width the sandwich trained, on test: its slice of the trained supernet and, for comparison, the same
    slice of the pruned teacher (a one-shot prune, no training), with the paired interval of the difference over
    the test blocks (`tokens` each). `score_width(directory, sparsity)` measures a slice."""
    rows = []
    for row in widths.widths:
        sides = {}
        for side, source in (("trained", widths.path), ("one_shot", widths.one_shot)):
            stats = score_width(source, row.sparsity)
            sides[side] = {"accuracy": stats["accuracy"], "loss": stats["loss"],
                           "test_correct": [c for c, _ in stats["blocks"]]}
        trained, one_shot = sides["trained"], sides["one_shot"]
        rows.append(replace(row, trained=trained, one_shot=one_shot,
                            gain={"accuracy": trained["accuracy"] - one_shot["accuracy"],
                                  **paired_interval(trained["test_correct"], one_shot["test_correct"], tokens)}))
    return replace(widths, widths=rows)


def compared(report: Report) -> Report:
    """`report` with its paired comparisons on the test blocks, from its models' test figures: the student against
    each baseline (`student_vs_baselines`) and the regime check (`regime`)."""
    tokens = report.test_block_tokens
    return replace(report, student_vs_baselines={name: gain(report.student, b, tokens)
                                                 for name, b in report.baselines.items()},
                   regime=regime(report.teacher, report.baselines, tokens, report.command))


def gain(student: Figures, baseline: Figures, tokens: list[int] | None = None) -> dict:
    """How much better the MiniDisc student is than a baseline on test (positive = better), with the paired
    bootstrap interval of the accuracy difference when the blocks' figures are known."""
    return {"accuracy": student.accuracy - baseline.accuracy,
            **paired_interval(student.test_correct, baseline.test_correct, tokens),
            "relative_accuracy": relative(student.accuracy, baseline.accuracy) - 1,
            "loss": baseline.loss - student.loss,
            "perplexity_ratio": baseline.perplexity / student.perplexity}


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


def regime(teacher: Figures | None, baselines: dict[str, Figures], tokens: list[int] | None,
           command: str = "compress") -> dict:
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
    out = {"checked": True, "teacher_minus_ce": {"accuracy": teacher.accuracy - ce.accuracy,
                                                 **paired_interval(teacher.test_correct, ce.test_correct, tokens)}}
    if kd_name:
        kd = baselines[kd_name]
        out["kd"] = kd_name
        out["kd_minus_ce"] = {"accuracy": kd.accuracy - ce.accuracy,
                              **paired_interval(kd.test_correct, ce.test_correct, tokens)}
    helps = [out[key]["accuracy"] > 0 for key in ("teacher_minus_ce", "kd_minus_ce") if key in out]
    out["warning"] = None if all(helps) else (
        "the teacher adds nothing on this data: the student trained without distillation is at least as good, "
        "so distillation, with or without a TA, cannot help here")
    return out


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
