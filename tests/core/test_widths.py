import pytest
import torch

from engine.core.errors import UserError
from engine.core.widths import (
    DEFAULT_GRID,
    Shape,
    grid_with_target,
    joint_widths,
    keep_counts,
    parse_grid,
    parse_sparsity,
    past_target,
    removal_order,
    round_removal,
)


def test_parse_sparsity_is_exact():
    assert parse_sparsity("0.85") == 850
    with pytest.raises(UserError, match="3 decimals"):  # float noise is refused, never silently rounded
        parse_sparsity(0.1 + 0.2)
    assert parse_sparsity(0.3) == 300
    assert parse_sparsity("0") == 0
    assert parse_grid(["0.9", "0.1", "0.90"]) == (100, 900)


@pytest.mark.parametrize("bad, message", [("1", r"outside \[0, 1\)"), ("-0.1", "outside"), ("90", "outside"),
                                          ("abc", "not a number"), ("0.1234", "3 decimals")])
def test_parse_sparsity_errors(bad, message):
    with pytest.raises(UserError, match=message):
        parse_sparsity(bad)


def test_round_removal_monotone_and_exact_at_full():
    for size in (5, 37, 64):
        rounded = [round_removal(r, size, 8) for r in range(size + 1)]
        assert rounded == sorted(rounded)
        assert rounded[-1] == size and rounded[0] == 0
        assert all(r % 8 == 0 or r == size for r in rounded)


def test_keep_counts_follow_global_ranking_and_nest():
    torch.manual_seed(0)
    scores = [torch.rand(n).sort(descending=True).values for n in (37, 40, 16)]
    order = removal_order(scores)
    widths = [keep_counts(order, [37, 40, 16], p, multiple=1) for p in DEFAULT_GRID]
    assert widths[0] == (37, 40, 16)
    for permille, width in zip(DEFAULT_GRID, widths):
        assert 93 - sum(width) == (permille * 93 + 500) // 1000
        kept_scores = torch.cat([s[:k] for s, k in zip(scores, width)])
        removed_scores = torch.cat([s[k:] for s, k in zip(scores, width)])
        if len(kept_scores) and len(removed_scores):
            assert kept_scores.min() >= removed_scores.max()  # the least important units went first
    for wider, narrower in zip(widths, widths[1:]):
        assert Shape(wider, wider).contains(Shape(narrower, narrower))


def test_widths_past_the_target_and_of_a_joint_student_stage():
    grid = (0, 500, 700, 850, 900, 950)
    assert past_target(grid, 900, 0) == [] and past_target(grid, 900, 950) == [950]
    assert past_target(grid, 850, 950) == [900, 950]
    assert joint_widths(grid, 500, 900, 0) == [700, 850, 900]  # past the TA, up to the target
    assert joint_widths(grid, 700, 900, 950) == [850, 900, 950]  # ... up to --sparsest
    assert joint_widths(grid, None, 900, 950) == [900, 950]  # no TA: from the target
    assert grid_with_target((0, 500), 900, 950) == (0, 500, 900, 950)
    assert grid_with_target((0, 500), 900) == (0, 500, 900)
