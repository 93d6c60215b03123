"""The DeepSpeed trainer's optimiser step equals a plain PyTorch reference, with 1 and 2 processes and with
gradient accumulation, with one collective per step and no step on a non-finite loss; the run configuration
(recipes and command line) and its errors."""
import json
import subprocess
import sys

import pytest
from helpers import WORKERS, launch_two_ranks

import engine  # noqa: F401
from engine.training.trainer import PARTS


def one_process(out, *args):
    worker = WORKERS / "trainer_step_worker.py"
    result = subprocess.run([sys.executable, worker, "--out", str(out), *map(str, args)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum,stack", [(1, 2), (2, 1), (1, 0)])  # 2: the 3 widths in two forwards
def test_trainer_step_matches_pytorch_one_process(grad_accum, stack, pruned_dirs, tmp_path):
    """(1, 0): all three widths in one forward, each layer recomputed in the backward."""
    report = one_process(tmp_path / "r.json", "--pruned", pruned_dirs["llama_gqa"], "--grad-accum", grad_accum,
                         "--stack", stack, "--checkpointing", int(stack == 0))
    assert report["world_size"] == 1
    assert report["moved"] > 1e-3  # the weights really changed
    assert report["error"] <= 1e-5, report
    assert report["collectives"] == [3 * len(PARTS) + 2] * 3, report["collectives"]  # 3 widths: one per step
    assert report["nan_step"] == {"finite": False, "unchanged": True}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("grad_accum,stack", [(1, 1), (2, 0)])
def test_trainer_step_matches_pytorch_two_processes(grad_accum, stack, pruned_dirs, tmp_path):
    """The widths one after another, or all stacked in one forward (ZeRO-3 gathering whole layers, each recomputed
    in the backward): both are the per-width reference's step."""
    report = launch_two_ranks("trainer_step_worker.py", tmp_path / "r.json", "--pruned", pruned_dirs["opt"],
                              "--grad-accum", grad_accum, "--stack", stack, "--checkpointing", int(stack == 0))
    assert report["world_size"] == 2
    assert report["moved"] > 1e-3
    assert report["error"] <= 1e-5, report
    # one all-reduce per step (3 losses, the finite check, the requeue flag), not one per width and micro-batch;
    # the third step's loss was not finite
    assert report["collectives"] == [3 * len(PARTS) + 2] * 3, report["collectives"]  # 3 widths: one per step
    assert report["nan_step"] == {"finite": False, "unchanged": True}


# --- configuration ------------------------------------------------------------------------------------------------
def parse(*argv):
    from engine.cli.main import build_parser
    from engine.config import resolve

    return resolve(build_parser().parse_args(["compress", *map(str, argv)]))


REQUIRED = ("--teacher", "t", "--data", "d.txt", "--out", "o")


def test_recipe_and_command_line_mean_the_same(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("teacher: t\ndata: d.txt\nout: o\ntarget_sparsity: 0.8\nlam: 0.35\nmax-steps: 12\n"
                      "grid: [0, 0.5, 0.8]\nuniform: true\nloss: jsd\n")
    from_recipe = parse("--config", recipe)
    from_cli = parse(*REQUIRED, "--target-sparsity", "0.8", "--lam", "0.35", "--max-steps", "12", "--grid", "0",
                     "0.5", "0.8", "--uniform", "--loss", "jsd")
    assert from_recipe == from_cli
    assert from_recipe.lam == 0.35 and isinstance(from_recipe.lam, float) and from_recipe.max_steps == 12
    assert parse("--config", recipe, "--lam", "0.1", "--max-steps", "3").lam == 0.1  # the command line wins
    assert parse(*REQUIRED, "--lam", "1e-1").lam == pytest.approx(0.1)


@pytest.mark.parametrize("recipe, message", [
    ("teacher: t\nlamda: 0.2\n", "unknown option 'lamda' (did you mean 'lam'?)"),
    ("teacher: t\ndata: d\nout: o\nmax_steps: 2.5\n", "option 'max_steps' expects int, got 2.5"),
    ("teacher: t\ndata: d\nout: o\nuniform: 'yes'\n", "option 'uniform' expects bool"),
    ("teacher: t\ndata: d\nout: o\nteacher_placement: int4\n",
     "--teacher-placement 'int4': choose from zero3, replicated, int8, nf4"),
    ("teacher: t\ndata: d\nout: o\noptimizer: adam\n", "--optimizer 'adam': choose from adamw, adamw8bit"),
    ("- a\n- b\n", "must be a mapping"),
    ("teacher: [unclosed\n", "cannot parse recipe"),
])
def test_bad_recipes_are_refused_clearly(recipe, message, tmp_path):
    from engine.core.errors import UserError

    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    with pytest.raises(UserError, match=pytest.importorskip("re").escape(message)):
        parse("--config", path)


@pytest.mark.parametrize("argv, message", [
    (("--target-sparsity", "1.2"), "outside [0, 1)"),
    (("--target-sparsity", "0"), "must be above 0"),
    (("--truncate", "0.95"), "is above --target-sparsity"),
    (("--max-steps", "0"), "--max-steps must be at least 1"),
    (("--warmup-ratio", "1"), "--warmup-ratio must be in [0, 1)"),
    (("--sandwich-share", "1"), "--sandwich-share 1: give a fraction between 0 and 1"),
    (("--sandwich-share", "0"), "--sandwich-share 0: give a fraction between 0 and 1"),
])
def test_bad_options_are_refused_clearly(argv, message):
    from engine.core.errors import UserError

    with pytest.raises(UserError, match=pytest.importorskip("re").escape(message)):
        parse(*REQUIRED, *argv)


def test_lam_must_be_a_number(capsys):
    from engine.cli.main import main

    with pytest.raises(SystemExit):
        main(["compress", *REQUIRED, "--lam", "abc"])
    assert "invalid float value: 'abc'" in capsys.readouterr().err
