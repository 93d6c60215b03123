"""Sparsities, the candidate grid and per-layer keep counts.

Sparsities are kept as integer per-mille (0.85 -> 850) wherever they are compared or used as keys, so
0.1 + 0.2 style float error can never make a candidate "not on the grid"; they become fractions only at the JSON
and command-line edges. Vocabulary, one word per thing:
- a *width* is one candidate sub-network, named by its per-mille sparsity (`widths`: a list of them, a stage's or
  the grid's; `best_width`, `teacher_width`);
- its *shape* (`Shape`) is what it keeps per layer: attention units and FFN neurons (what a model is sliced to;
  `shapes`: {per-mille: Shape});
- *copies* counts the widths one stacked forward runs (`Supernet.stack`: the batch repeated once per width).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

from engine.core.errors import UserError

if TYPE_CHECKING:
    import torch

PERMILLE = 1000
DEFAULT_GRID = (0, 100, 200, 300, 400, 500, 600, 700, 800, 850, 900, 950)


def parse_sparsity(value) -> int:
    """'0.85' or 0.85 -> 850. Sparsity is the fraction removed, in [0, 1), at most 3 decimals."""
    try:
        fraction = Decimal(str(value).strip())
    except InvalidOperation:
        raise UserError(f"sparsity '{value}' is not a number: give a fraction in [0, 1), e.g. 0.9") from None
    if not (0 <= fraction < 1):
        raise UserError(f"sparsity {value} is outside [0, 1): give the fraction removed, e.g. 0.9 for 10% scale")
    permille = fraction * PERMILLE
    if permille != permille.to_integral_value():
        raise UserError(f"sparsity {value} has more than 3 decimals; the grid resolution is 0.001")
    return int(permille)


def format_sparsity(permille: int) -> str:
    return f"{permille / PERMILLE:g}"


def parse_grid(values) -> tuple[int, ...]:
    grid = sorted({parse_sparsity(v) for v in values})
    if not grid:
        raise UserError("the sparsity grid is empty: give at least one sparsity")
    return tuple(grid)


def grid_with_target(grid, target: int, sparsest: int = 0) -> tuple[int, ...]:
    """The sparsities to prune for: the given grid (per-mille; the default when empty), the target and --sparsest
    (when not 0)."""
    return tuple(sorted(set(grid or DEFAULT_GRID) | {target} | ({sparsest} if sparsest else set())))


def check_target_and_truncate(target: int, truncate: int) -> None:
    if target == 0:
        raise UserError("--target-sparsity must be above 0: a student at sparsity 0 is the teacher")
    if truncate > target:
        raise UserError(f"--truncate {format_sparsity(truncate)} is above --target-sparsity "
                        f"{format_sparsity(target)}: the candidate TAs lie between them")


def candidate_widths(grid, truncate: int, target: int) -> list[int]:
    """MiniDisc's candidate TAs: the grid's sparsities from --truncate up to the target (included)."""
    return [s for s in sorted(set(grid) | {target}) if truncate <= s <= target]


def past_target(grid, target: int, sparsest: int) -> list[int]:
    """Grid widths after the target up to --sparsest (0 = the target): trained, never a TA."""
    return [s for s in sorted(grid) if target < s <= sparsest]


def joint_widths(grid, ta: int | None, target: int, sparsest: int) -> list[int]:
    """The widths of a joint TA -> student stage: every grid width sparser than the TA (from the target when
    there is no TA) up to --sparsest (0 = the target)."""
    first = target if ta is None else ta + 1
    return [s for s in sorted(grid) if first <= s <= max(target, sparsest)]


def widths_per_step(candidates: int, sandwich_sample: int) -> int:
    """Widths trained per sandwich step: all of them, or the largest, the smallest and --sandwich-sample others."""
    return min(candidates, sandwich_sample + 2) if sandwich_sample else candidates


def forwards_per_batch(trained: int, per_forward: int) -> int:
    """Student forwards (and backwards) per micro-batch of a step training `trained` widths, `per_forward` stacked in
    each (--stack-widths; 0 = all in one)."""
    return -(-trained // (per_forward or trained))  # ceil


@dataclass(frozen=True)
class Shape:
    """Kept units per layer: attention units (heads; KV groups or query-head units under GQA) and FFN neurons."""

    attention: tuple[int, ...]
    ffn: tuple[int, ...]

    def contains(self, other: "Shape") -> bool:
        """True when `other` is a sub-network of this width (every layer keeps no more units)."""
        pairs = zip(self.attention + self.ffn, other.attention + other.ffn)
        return all(mine >= theirs for mine, theirs in pairs)


def removal_order(scores: list[torch.Tensor]) -> list[int]:
    """Layer index of each unit in global removal order (least important first).

    `scores` are per-layer normalised importances, sorted descending within each layer (after
    reordering), so removing the k least important units of a layer removes its last k. Ties go to the
    later position in a layer, then the earlier layer, so the order is deterministic.
    """
    import torch  # here, so that parsing sparsities (the CLI, recipes) does not load torch

    values = torch.cat([s.flip(0) for s in scores]).double()
    layer_ids = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(scores)])
    order = torch.sort(values, stable=True).indices
    return layer_ids[order].tolist()


def round_removal(removed: int, size: int, multiple: int) -> int:
    """Round a layer's removal count to the nearest multiple (monotone, so widths stay nested)."""
    if removed >= size or multiple <= 1:
        return min(removed, size)
    return min(size, multiple * ((2 * removed + multiple) // (2 * multiple)))


def removed_units(total: int, permille: int) -> int:
    """Units removed when `permille`/1000 of `total` go: rounded half up, in integers (no float error)."""
    return (permille * total + PERMILLE // 2) // PERMILLE


def keep_counts(order: list[int], sizes: list[int], permille: int, multiple: int = 1) -> tuple[int, ...]:
    """Per-layer kept units when `permille`/1000 of all units are removed following `order`."""
    removed = [0] * len(sizes)
    for layer in order[:removed_units(sum(sizes), permille)]:
        removed[layer] += 1
    return tuple(size - round_removal(r, size, multiple) for r, size in zip(removed, sizes))


def uniform_keep(size: int, permille: int, multiple: int = 1) -> int:
    """Units kept in a layer of `size` units when every layer loses the same fraction."""
    return size - round_removal(removed_units(size, permille), size, multiple)
