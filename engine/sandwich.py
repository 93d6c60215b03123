"""MiniDisc steps 2 and 3: train every candidate width against one teacher pass (the sandwich), evaluate
every width in one pass over the dev data, and choose the teacher assistant by the lambda-tradeoff."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .grid import PERMILLE
from .objective import Objective, TeacherOutputs, width_loss


def sandwich_step(supernet, sparsities, input_ids, attention_mask, teacher_out: TeacherOutputs,
                  objective: Objective = Objective(), backward: Callable = torch.Tensor.backward) -> dict:
    """Forward and backward every width against the same teacher outputs, each loss weighted 1/K and
    back-propagated at once (one width's activations are freed before the next). The caller steps the
    optimizer once afterwards. `backward` is `loss.backward` or a DeepSpeed engine's `backward`."""
    metrics = {}
    for permille in sparsities:
        supernet.set_sparsity(permille)
        losses = width_loss(supernet.model, teacher_out, input_ids, attention_mask, objective)
        backward(losses["loss"] / len(sparsities))
        metrics[permille] = {name: value.detach() for name, value in losses.items()}
    return metrics


def _next_token_stats(logits, input_ids, attention_mask):
    """(correct top-1 predictions, summed CE, counted tokens) over non-padding next tokens."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    keep = keep[:, :-1] & keep[:, 1:]
    targets = input_ids[:, 1:]
    logits = logits[:, :-1].float()
    correct = ((logits.argmax(-1) == targets) & keep).sum()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return correct, (ce * keep).sum(), keep.sum()


@torch.no_grad()
def evaluate_widths(supernet, teacher, batches, sparsities) -> dict:
    """Accuracy and loss of the teacher and of every width, in one pass over `batches`.

    Each batch (input_ids, attention_mask or None) is loaded and run through the teacher once; then every
    width sees the same batch. Returns {"teacher": stats, permille: stats, ...}, stats = {"accuracy",
    "loss", "tokens"}.
    """
    totals = {key: torch.zeros(3, dtype=torch.float64) for key in ["teacher", *sparsities]}
    was_training = supernet.training
    supernet.eval()
    for input_ids, attention_mask in batches:
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        totals["teacher"] += torch.stack(_next_token_stats(teacher_logits, input_ids, attention_mask)).double().cpu()
        for permille in sparsities:
            supernet.set_sparsity(permille)
            logits = supernet(input_ids=input_ids, attention_mask=attention_mask).logits
            totals[permille] += torch.stack(_next_token_stats(logits, input_ids, attention_mask)).double().cpu()
    supernet.train(was_training)
    return {key: {"accuracy": (t[0] / t[2].clamp(min=1)).item(), "loss": (t[1] / t[2].clamp(min=1)).item(),
                  "tokens": int(t[2].item())} for key, t in totals.items()}


def tradeoff(performance: float, permille: int, lam: float) -> float:
    """MiniDisc's lambda-tradeoff p(s) + lambda * s (s as a fraction)."""
    return performance + lam * permille / PERMILLE


def choose_ta(performance: dict[int, float], lam: float, target: int, current: int = 0) -> int | None:
    """The candidate sparsity with the best tradeoff among those >= `current` (the current teacher's), or
    None when that best is at or beyond the target: then no TA is needed."""
    eligible = {s: p for s, p in performance.items() if s >= current}
    if not eligible:
        raise ValueError(f"no candidate at or above the teacher's sparsity {current / PERMILLE:g}")
    best = max(eligible, key=lambda s: (tradeoff(eligible[s], s, lam), -s))
    return None if best >= target else best
