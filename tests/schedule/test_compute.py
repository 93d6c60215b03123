"""engine.schedule.compute: a stage's compute read off its curves, the kd-matched and the sandwich's step counts."""
from pathlib import Path

import pytest

from engine.schedule.compute import matched_steps, sandwich_steps, stage_compute, step_flops, total
from engine.training.stage import StageResult

FLOPS = {0: 1000, 500: 600, 900: 200}  # forward FLOPs per token at each width


def result(train: list[tuple[int, float]], evals: list[tuple[int, float, int]], steps: int) -> StageResult:
    return StageResult(stage="s", teacher="t", student="u", widths=[500, 900], steps=steps, best_step=steps,
                       best_width=500, tradeoff=1.0, teacher_stats={}, best={}, best_dir=Path("b"), wall_s=2.5,
                       curves={"train": [{"step": s, "width": w, "loss": 1.0} for s, w in train],
                               "eval": [{"step": s, "width": w, "tokens": n} for s, w, n in evals]})


def test_sampled_widths_and_evaluations_are_counted_as_they_ran():
    # --sandwich-sample: step 1 trained both widths, step 2 only 0.9; one evaluation of both at step 2
    stage = result(train=[(1, 0.5), (1, 0.9), (2, 0.9)], evals=[(2, 0.5, 30), (2, 0.9, 30)], steps=2)
    compute = stage_compute(stage, FLOPS.__getitem__, teacher=0, tokens_per_step=10)
    assert compute == {"steps": 2, "tokens": 20, "width_tokens": 30,
                       "train_flops": 10 * (3 * 600 + 3 * 200 + 3 * 200) + 20 * 1000,
                       "eval_flops": 30 * 600 + 30 * 200 + 30 * 1000, "wall_s": 2.5}
    via_ta = stage_compute(stage, FLOPS.__getitem__, teacher=500, tokens_per_step=10)  # a TA teaches: cheaper
    assert compute["train_flops"] - via_ta["train_flops"] == 20 * (1000 - 600)
    both = total(compute, via_ta)
    assert both["steps"] == 4 and both["train_flops"] == compute["train_flops"] + via_ta["train_flops"]


def test_matched_steps_rounds_to_the_nearest_step():
    assert matched_steps(1049, 100) == 10 and matched_steps(1051, 100) == 11 and matched_steps(10, 100) == 1


@pytest.mark.parametrize("share, sample", [(0.2, 0), (0.2, 1), (0.5, 0), (0.05, 0)])
def test_sandwich_steps_spend_the_share_of_the_pipeline(share, sample):
    """The sandwich's steps are the ones whose FLOPs come closest to `share` of sandwich + student stage, with the
    student stage counted as plain KD from the teacher; --sandwich-sample 1 trains 3 of the 3 widths here."""
    widths, student_steps, target = [0, 500, 900], 600, 900
    n = sandwich_steps(share, student_steps, widths, sample, FLOPS.__getitem__, target)
    sandwich_step = sum(3 * FLOPS[w] for w in widths) + FLOPS[0]  # every width trained, the teacher once
    student = student_steps * (3 * FLOPS[target] + FLOPS[0])
    achieved = {k: k * sandwich_step / (k * sandwich_step + student) for k in (n - 1, n, n + 1)}
    assert min(achieved, key=lambda k: abs(achieved[k] - share)) == n


def test_sandwich_steps_average_the_sampled_widths_and_keep_one_step():
    widths = [0, 500, 900, 900, 900]  # --sandwich-sample 1: 3 of 5 widths per step, at their mean cost
    mean_step = 3 * sum(3 * FLOPS[w] for w in widths) / 5 + FLOPS[0]
    n = sandwich_steps(0.2, 1000, widths, 1, FLOPS.__getitem__, 900)
    assert n == round(0.25 * 1000 * (3 * FLOPS[900] + FLOPS[0]) / mean_step)
    assert sandwich_steps(0.01, 1, widths, 0, FLOPS.__getitem__, 900) == 1  # never an untrained sandwich


def test_the_teachers_head_is_charged_per_width_and_no_distillation_runs_no_teacher():
    # the fused loss recomputes the teacher's logits for every width after the first: step 1 trained two widths
    stage = result(train=[(1, 0.5), (1, 0.9), (2, 0.9)], evals=[(2, 0.5, 30), (2, 0.9, 30)], steps=2)
    plain = stage_compute(stage, FLOPS.__getitem__, teacher=0, tokens_per_step=10)
    with_head = stage_compute(stage, FLOPS.__getitem__, teacher=0, tokens_per_step=10, head=70)
    assert with_head["train_flops"] - plain["train_flops"] == 10 * 70  # one extra width, 10 tokens
    assert with_head["eval_flops"] == plain["eval_flops"]
    alone = stage_compute(stage, FLOPS.__getitem__, teacher=None, tokens_per_step=10, head=70)
    assert alone["train_flops"] == 10 * (3 * 600 + 3 * 200 + 3 * 200)  # the students' steps and nothing else
    assert alone["eval_flops"] == plain["eval_flops"]  # the dev pass still scores the teacher
    assert step_flops(10, [900], None, FLOPS.__getitem__) == 10 * 3 * 200
    assert step_flops(10, [500, 900], 0, FLOPS.__getitem__, head=70) == 10 * (3 * 600 + 3 * 200 + 1000 + 70)
