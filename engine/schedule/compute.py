"""What a model cost to train: optimiser steps, tokens x widths, FLOPs and wall time of the stages behind it.

FLOPs follow Kaplan et al. (2020): a forward pass costs F(w) per token (`forward_flops`), a training step
3 F(w) per token (forward + backward), the frozen teacher one forward per token, and its LM head (`head` FLOPs per
token) once more for every width after the first: the fused loss recomputes the teacher's logits for each width it
distils. Training on the next tokens alone (no distillation) runs no teacher. A stage's training FLOPs are
read off its training curve, which holds one point per width trained per step (so --sandwich-sample and
early stopping are counted as they ran); its evaluation FLOPs off its dev curve. Budgets are set in the same units
(`matched_steps`, `sandwich_steps`).
"""
from __future__ import annotations

from functools import cache, cached_property
from typing import Callable

from engine.core.widths import PERMILLE, Shape, widths_per_step
from engine.models.loading import meta_model
from engine.models.units import count_parameters, forward_flops
from engine.training.stage import StageResult

KEYS = ("steps", "tokens", "width_tokens", "train_flops", "eval_flops", "wall_s")


def stage_compute(result: StageResult, flops: Callable[[int], int], teacher: int | None, tokens_per_step: int,
                  head: int = 0) -> dict:
    """The compute of one finished stage. `flops(permille)` is the forward FLOPs per token at a width;
    `teacher` the sparsity of the stage's teacher (0, or the TA's; None: no teacher ran in training);
    `tokens_per_step` = --batch-size x --seq-len; `head` the teacher's LM-head FLOPs per token."""
    trained: dict[int, list[int]] = {}  # step -> the widths it trained
    for point in result.curves["train"]:
        trained.setdefault(point["step"], []).append(round(point["width"] * PERMILLE))
    evaluated = result.curves["eval"]
    eval_tokens = {point["step"]: point["tokens"] for point in evaluated}  # the teacher runs once per evaluation
    eval_teacher = flops(teacher or 0)  # the dev pass runs the teacher even when training did not
    return {"steps": result.steps, "tokens": result.steps * tokens_per_step,
            "width_tokens": sum(map(len, trained.values())) * tokens_per_step,
            "train_flops": sum(step_flops(tokens_per_step, widths, teacher, flops, head=head)
                               for widths in trained.values()),
            "eval_flops": sum(p["tokens"] * flops(round(p["width"] * PERMILLE)) for p in evaluated)
            + sum(eval_tokens.values()) * eval_teacher,
            "wall_s": result.wall_s}


def total(*computes: dict) -> dict:
    """The compute of several stages together (a model that took more than one)."""
    return {key: round(sum(c[key] for c in computes), 2) if key == "wall_s" else sum(c[key] for c in computes)
            for key in KEYS}


def matched_steps(budget_flops: int, step_flops: int) -> int:
    """Optimiser steps of a single-width stage that spend `budget_flops` training FLOPs (at least 1)."""
    return max(1, round(budget_flops / step_flops))


def step_flops(tokens_per_step: int, widths: list[int], teacher: int | None, flops: Callable[[int], int],
               per_step: int | None = None, head: int = 0) -> float:
    """Training FLOPs of one optimiser step that trains `per_step` (default all) of `widths`, at their mean cost,
    against one teacher forward at sparsity `teacher` (None: no teacher) and its LM head once more per extra width:
    what a stage's progress line plans with."""
    n = per_step or len(widths)
    trained = sum(3 * flops(w) for w in widths)  # forward + backward: 3 F(w) per token
    if n != len(widths):
        trained = trained * n / len(widths)  # some of them, at their mean cost
    return tokens_per_step * (trained + (0 if teacher is None else flops(teacher) + (n - 1) * head))


def sandwich_steps(share: float, student_steps: int, widths: list[int], sandwich_sample: int,
                   flops: Callable[[int], int], target: int, head: int = 0) -> int:
    """Sandwich steps that spend `share` of the compress pipeline's training FLOPs (at least 1). The student
    stage is counted as `student_steps` of plain KD from the teacher (its TA is chosen later); a sandwich step
    trains the `widths` (or, with --sandwich-sample, some of them: their mean cost each) under one teacher
    forward, and recomputes the teacher's LM head (`head` FLOPs per token) for each width after the first."""
    per_step = widths_per_step(len(widths), sandwich_sample)
    sandwich = step_flops(1, widths, 0, flops, per_step, head)
    student = step_flops(1, [target], 0, flops)
    return max(1, round(share / (1 - share) * student_steps * student / sandwich))


class Costs:
    """Parameters and FLOPs of the pruned teacher's widths, counted on its architecture on the meta device (no
    weights): `parameters` and `forward_flops` per token of the width at a per-mille sparsity (the teacher at 0),
    the LM head's FLOPs per token, a single-width training step's FLOPs."""

    def __init__(self, config, family, shape_of: Callable[[int], Shape], seq_len: int, tokens_per_step: int):
        self.model = meta_model(config)
        self.family, self.shape_of, self.seq_len, self.tokens_per_step = family, shape_of, seq_len, tokens_per_step
        self.forward_flops = cache(self._forward_flops)

    def parameters(self, permille: int) -> int:
        return count_parameters(self.model, self.family, self.shape_of(permille))

    def _forward_flops(self, permille: int) -> int:
        return forward_flops(self.model, self.family, self.shape_of(permille), self.seq_len)

    @cached_property
    def head_flops(self) -> int:
        """The LM head's FLOPs per token (hidden size and vocabulary are never pruned: every width's too)."""
        head = self.model.get_output_embeddings()
        return 2 * head.in_features * head.out_features

    def step_flops(self, permille: int, teacher: int | None = 0) -> float:
        """Training FLOPs of one step of a single-width stage (the width at `permille`, its teacher at `teacher`;
        None: no teacher)."""
        return step_flops(self.tokens_per_step, [permille], teacher, self.forward_flops)
