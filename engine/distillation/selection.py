"""MiniDisc step 3: score each candidate width (its performance p relative to the teacher) and choose the
teacher assistant by the lambda-trade-off p(s) + lambda * s.

Departure from the paper: its p is a task metric on the task's dev set (GLUE accuracies near 0.9, for which lambda
0.2 was calibrated); a causal LM has no task, so p defaults to next-token top-1 accuracy on dev relative to the
teacher's (the teacher scores 1.0; --metric offers raw accuracy and exp(-loss)). p is read after the sandwich's
few steps, so it says which widths have recovered, not which TA will teach best: on the built-in example it ranks
the TAs backwards (docs/studies.md, "Which TA").
"""
from __future__ import annotations

import math

from engine.core.widths import PERMILLE


def tradeoff(performance: float, permille: int, lam: float) -> float:
    """MiniDisc's lambda-tradeoff p(s) + lambda * s (s as a fraction)."""
    return performance + lam * permille / PERMILLE


def best_tradeoff(performance: dict[int, float], lam: float) -> int:
    """The sparsity whose p(s) + lambda * s is highest; a tie goes to the smaller sparsity (the larger model)."""
    return max(performance, key=lambda s: (tradeoff(performance[s], s, lam), -s))


def snapshot_moves(score: float, permille: int, best_score: float, best_permille: int | None) -> bool:
    """Whether a stage's best snapshot moves to `permille`: a higher trade-off, or the same one at a smaller
    sparsity (`best_tradeoff`'s tie-break). So the snapshot ends at the width `choose_ta` picks from the
    final scores, ties included."""
    return score > best_score or (score == best_score and best_permille is not None and permille < best_permille)


def choose_ta(performance: dict[int, float], lam: float, target: int, current: int = 0) -> int | None:
    """The candidate sparsity with the best tradeoff among those >= `current` (the current teacher's), or
    None when that best is at or beyond the target: then no TA is needed."""
    eligible = {s: p for s, p in performance.items() if s >= current}
    if not eligible:
        raise ValueError(f"no candidate at or above the teacher's sparsity {current / PERMILLE:g}")
    best = best_tradeoff(eligible, lam)
    return None if best >= target else best


def relative(accuracy: float, reference: float) -> float:
    """An accuracy as a fraction of a reference accuracy (the teacher's, a baseline's)."""
    return accuracy / max(reference, 1e-12)


def performance(stats: dict, teacher_stats: dict, metric: str = "relative_accuracy") -> float:
    """p(s) in [0, 1], higher is better: accuracy relative to the teacher's (the default), raw accuracy,
    or exp(-dev loss)."""
    if metric == "relative_accuracy":
        return relative(stats["accuracy"], teacher_stats["accuracy"])
    if metric == "accuracy":
        return stats["accuracy"]
    if metric == "exp_loss":
        return math.exp(-stats["loss"])
    raise ValueError(f"unknown metric {metric!r}")
