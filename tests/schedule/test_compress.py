"""`minidisc compress | distill | maxidisc` end to end on a briefly trained tiny teacher, through the console
script (the way users run it), with the report checked against the artifacts it describes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    FP32,
    MINIDISC,
    accuracy_on,
    assert_same_weights,
    free_port,
    held_out_blocks,
    kill_chain,
    minidisc,
    minidisc_forked,
    options,
    report_numbers,
    run_python,
    tracked_csv,
)

from engine.core import faults
from engine.distillation.selection import tradeoff

pytestmark = [pytest.mark.slow]


# The uninterrupted runs several tests read: the end-to-end checks, the 2-process comparison, the kill matrices.
# lam 0 and p = exp(-dev loss): a TA is chosen (a denser width's loss is lower; the tiny run's dev accuracies are
# too close to order them), so it is exported
COMPRESS_OPTIONS = ("--lam", "0", "--metric", "exp_loss", "--baselines", "kd-matched")
TRACKING = ("--log-every", "3", "--report-to", "tensorboard", "csv", "wandb")  # no effect on what is computed


@pytest.fixture(scope="module")
def compressed(trained_teacher, corpus, tmp_path_factory):
    """`minidisc compress` with COMPRESS_OPTIONS and TRACKING (W&B offline): (out, the finished process)."""
    out = tmp_path_factory.mktemp("compress") / "whole"
    shm_before = set(Path("/dev/shm").glob("deepspeed_*"))
    result = minidisc("compress", *options(trained_teacher, corpus, out, *COMPRESS_OPTIONS, *TRACKING),
                      env={"WANDB_MODE": "offline"})
    assert set(Path("/dev/shm").glob("deepspeed_*")) <= shm_before  # no leaked 70 MB communication buffers
    return out, result


@pytest.fixture(scope="module")
def maxidisc_run(trained_teacher, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("maxidisc") / "whole"
    minidisc("maxidisc", *options(trained_teacher, corpus, out))
    return out


def test_compress_end_to_end(compressed):
    out, result = compressed
    report = json.loads((out / "report.json").read_text())
    assert "MiniDisc TA candidates" in result.stdout
    # the choice is the argmax of the numbers the report shows
    rows = report["candidates"]
    assert [r["sparsity"] for r in rows] == [0.5, 0.7, 0.9]
    best = max(rows, key=lambda r: (r["p"] + report["lam"] * r["sparsity"], -r["sparsity"]))
    for row in rows:
        assert row["tradeoff"] == pytest.approx(tradeoff(row["p"], round(row["sparsity"] * 1000), report["lam"]))
        assert 0 < row["p"] <= 1.5 and 0 < row["accuracy"] < 1
    assert report["teacher"]["dev_accuracy"] > 0.05  # the trained teacher predicts something (chance: 1/512)
    selected = report["selected_ta"]
    if best["sparsity"] < 0.9:
        assert selected["sparsity"] == best["sparsity"] and (out / "ta" / "config.json").is_file()
        meta = json.loads((out / "ta" / "minidisc_export.json").read_text())
        assert meta["sparsity"] == best["sparsity"]
    else:
        assert selected is None and not (out / "ta").exists()
    # the student on disk is the model the report describes: on test, and on the dev split that selected it
    splits = held_out_blocks(out)
    student = report["student"]
    assert accuracy_on(out / "student", splits["test"]) == pytest.approx(student["accuracy"], abs=1e-9)
    assert accuracy_on(out / "student", splits["dev"]) == pytest.approx(student["dev_accuracy"], abs=1e-6)
    assert report["data"]["test_blocks"] == len(splits["test"]) == 16
    # compute: the sandwich trained 3 widths per step, the student's pipeline is both stages, and the kd-matched
    # baseline spent the same training FLOPs (to within half of one of its steps)
    sandwich, student_stage = report["compute"]["sandwich"], report["compute"]["student"]
    assert sandwich["width_tokens"] == 3 * sandwich["tokens"] == 3 * 8 * 4 * 32
    assert student["compute"]["train_flops"] == sandwich["train_flops"] + student_stage["train_flops"]
    matched = report["baselines"]["kd-matched"]["compute"]
    step_flops = matched["train_flops"] / matched["steps"]
    assert abs(matched["train_flops"] - student["compute"]["train_flops"]) <= step_flops / 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "student", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == student["parameters"]
    assert student["parameters"] < report["teacher"]["parameters"]
    for name in ("report.md", "tradeoff.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert set(report["phases"]) >= {"prune", "sandwich", "student", "total"}
    assert set(report["curves"]) == {"sandwich", "student", "baseline-kd-matched"}
    assert not any(out.rglob(".*.partial*"))  # no scratch left behind
    assert not any((out / "work").glob("*/checkpoints"))  # finished stages drop their optimiser states


def test_every_trained_width_exports_from_the_supernet(compressed, tmp_path):
    """OUT/supernet holds the sandwich's weights at its last step: each width it trained exports (`minidisc export`)
    to the model the report measured, and the same width of the pruned teacher is the report's one-shot figure."""
    from engine import UserError
    from engine.models.export import export

    out, result = compressed
    report = json.loads((out / "report.json").read_text())
    supernet = report["supernet"]
    assert supernet["step"] == report["compute"]["sandwich"]["steps"]
    assert [row["sparsity"] for row in supernet["widths"]] == [0.5, 0.7, 0.9]
    test = held_out_blocks(out)["test"]
    for row in supernet["widths"]:
        for side, source in (("trained", out / "supernet"), ("one_shot", out / "work" / "pruned")):
            exported = tmp_path / f"{side}-{row['sparsity']}"
            export(source, row["sparsity"], exported)
            assert accuracy_on(exported, test) == pytest.approx(row[side]["accuracy"], abs=1e-9), (side, row)
        gain = row["gain"]
        assert gain["accuracy"] == pytest.approx(row["trained"]["accuracy"] - row["one_shot"]["accuracy"])
        assert gain["accuracy_interval"][0] <= gain["accuracy"] <= gain["accuracy_interval"][1]
    assert json.loads((tmp_path / "trained-0.9" / "minidisc_export.json").read_text())["trained_in_sandwich"]
    with pytest.raises(UserError, match="drop --uniform"):
        export(out / "supernet", 0.9, tmp_path / "uniform", uniform=True)
    # the sandwich trained the weights it kept: the supernet is the pruned teacher's shape, not its weights
    with pytest.raises(AssertionError):
        assert_same_weights(out / "supernet", out / "work" / "pruned")
    assert "Trained widths" in result.stdout and "## Trained widths" in (out / "report.md").read_text()
    assert (out / "widths.png").stat().st_size > 0


def test_distill_and_maxidisc_share_budget_and_report(trained_teacher, corpus, maxidisc_run, tmp_path):
    minidisc("distill", *options(trained_teacher, corpus, tmp_path / "kd"))
    kd = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert set(kd["curves"]) == {"student"} and kd["student"]["via"] == "teacher"
    assert max(point["step"] for point in kd["curves"]["student"]["train"]) == 8

    maxi = json.loads((maxidisc_run / "report.json").read_text())
    rows = {r["sparsity"]: r for r in maxi["candidates"]}
    assert set(rows) == {0.5, 0.7, 0.9}
    assert set(maxi["curves"]) == {"ta-0.5", "student-via-0.5", "ta-0.7", "student-via-0.7", "student-direct"}
    for curves in maxi["curves"].values():  # every stage got the same budget
        assert max(point["step"] for point in curves["train"]) == 8
    winner = max(rows, key=lambda s: (rows[s]["student_dev_accuracy"], s))  # dev selects, test reports
    assert maxi["student"]["accuracy"] == pytest.approx(rows[winner]["student_accuracy"])
    assert maxi["student"]["dev_accuracy"] == pytest.approx(rows[winner]["student_dev_accuracy"])
    assert (maxi["selected_ta"] is None) == (winner == 0.9)
    # the whole search is the winner's compute: every TA and student stage
    assert maxi["student"]["compute"]["steps"] == 5 * 8
    assert maxi["student"]["compute"]["train_flops"] == sum(c["train_flops"] for c in maxi["compute"].values())
    # the direct trial is plain KD: same data, same init, same budget -> the same student as `distill`
    assert rows[0.9]["student_accuracy"] == pytest.approx(kd["student"]["accuracy"], abs=1e-9)


def test_joint_student_stage_with_widths_past_the_target(trained_teacher, corpus, tmp_path):
    """--sparsest 0.95: the sandwich also trains 0.95, which is never a candidate TA. --student-stage joint: the TA's
    snapshot trains as a supernet at every width past the TA, and the student is the target's best dev snapshot.
    With query-head attention units: the TA's slice keeps every KV group's first query heads, not a flat prefix."""
    out = tmp_path / "joint"
    minidisc("compress", *options(trained_teacher, corpus, out, "--grid", "0", "0.5", "0.7", "0.9", "0.95",
                                  "--sparsest", "0.95", "--student-stage", "joint", "--lam", "0",
                                  "--attention-unit", "query-head"))
    assert json.loads((out / "work" / "pruned" / "pruning.json").read_text())["attention_unit"] == "query-head"
    report = json.loads((out / "report.json").read_text())
    trained = lambda stage: {point["width"] for point in report["curves"][stage]["train"]}  # noqa: E731
    assert trained("sandwich") == {0.5, 0.7, 0.9, 0.95}
    assert [row["sparsity"] for row in report["supernet"]["widths"]] == [0.5, 0.7, 0.9, 0.95]  # past the target too
    assert [r["sparsity"] for r in report["candidates"]] == [0.5, 0.7, 0.9]
    ta = (report["selected_ta"] or {}).get("sparsity")
    assert trained("student") == {s for s in (0.5, 0.7, 0.9, 0.95) if s > (ta or 0.85)}
    # the student is the target's first best dev point, whatever the other widths did
    target_evals = [p for p in report["curves"]["student"]["eval"] if p["width"] == 0.9]
    best = max(target_evals, key=lambda p: p["accuracy"])
    student = report["student"]
    assert student["best_step"] == best["step"] and student["dev_accuracy"] == pytest.approx(best["accuracy"])
    splits = held_out_blocks(out)
    assert accuracy_on(out / "student", splits["test"]) == pytest.approx(student["accuracy"], abs=1e-9)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "student", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == student["parameters"]
    stage = report["compute"]["student"]
    assert stage["width_tokens"] == len(trained("student")) * stage["tokens"]


def tracked_tensorboard(out: Path, stage: str) -> dict[str, dict[int, float]]:
    """The scalars of OUT/tracking/tensorboard/STAGE as TensorBoard reads them (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tracking" / "tensorboard" / stage), size_guidance={"scalars": 0}).Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        assert len({p.step for p in points}) == len(points), f"{stage}: {tag} has a step twice"
        scalars[tag] = {p.step: p.value for p in points}
    return scalars


def assert_tracked_curves(out: Path, tracked) -> None:
    """Every stage's tracked losses and evaluations are report.json's curves, point for point."""
    report = json.loads((out / "report.json").read_text())
    for stage, curves in report["curves"].items():
        values = tracked(out, stage)
        expected = {}
        for point in curves["train"]:
            expected.setdefault(f"train/loss/s={point['width']:g}", {})[point["step"]] = point["loss"]
        for point in curves["eval"]:
            for key in ("accuracy", "loss", "p"):
                expected.setdefault(f"eval/{key}/s={point['width']:g}", {})[point["step"]] = point[key]
        for name, by_step in expected.items():
            assert values[name].keys() == by_step.keys(), (stage, name)
            for step, value in by_step.items():
                assert values[name][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (stage, name, step)
        assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/logit/s=0.9"} <= set(values), stage


def test_trackers_and_progress_lines_carry_the_reports_numbers(compressed):
    """--report-to tensorboard csv wandb: every curve point of report.json, once, in each tracker; the chosen TA at
    the end. --log-every 3 off a terminal: a line at the first, every third and the last step of every stage."""
    out, result = compressed
    report = json.loads((out / "report.json").read_text())
    assert_tracked_curves(out, tracked_csv)
    assert_tracked_curves(out, tracked_tensorboard)
    assert tracked_csv(out, "run")["selected_ta"] == {0: (report["selected_ta"] or {"sparsity": 0.0})["sparsity"]}
    runs = list((out / "tracking" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged = runs[0].read_bytes()  # W&B's record log holds each key and its value's JSON as plain bytes
    for point in report["curves"]["sandwich"]["eval"]:
        assert f"sandwich/eval/accuracy/s={point['width']:g}".encode() in logged
        assert json.dumps(point["accuracy"]).encode() in logged
    assert b"selected_ta" in logged
    lines = [line for line in result.stderr.splitlines() if " | loss s=" in line]
    steps = [line.split(" | ")[0].split()[-2] for line in lines if " sandwich " in line]
    assert steps == ["1/8", "3/8", "6/8", "8/8"], lines
    assert all("tok/s" in line and "ETA" in line for line in lines)


# Kill points, in the order a run reaches them; each is passed in the run resumed after the previous kill (the
# names are `faults.kill_point`'s: `write:PARENT/NAME` inside an atomic output's write, before its rename).
COMPRESS_KILLS = [
    "write:work/pruned",  # pruning: the reordered teacher written aside
    "data:token-file",  # tokenising: a source's token file written aside, not renamed into place
    "data:tokenised",  # tokenising: the run's data.json written aside
    "write:sandwich/best",  # sandwich, first evaluation: its best snapshot written aside, no checkpoint yet
    "sandwich:step@6",  # sandwich, between checkpoints (steps 5-6 are lost)
    "write:sandwich/supernet",  # sandwich trained: the weights every width shares written aside
    "sandwich:trained",  # sandwich trained and checkpointed, its result not written
    "write:killed/ta",  # the TA export
    "write:work/student_init",  # slicing the student's start from the TA
    "student:checkpoint",  # student stage, just after its first checkpoint
    "student:step@3",  # student stage, between checkpoints
    "write:killed/student",  # publishing the student
    "write:work/student_init-direct",  # the baseline's start
    "baseline-kd-matched:step@2",  # the baseline's training
    "write:baselines/kd-matched",  # publishing the baseline
    "report:scored",  # report: every model measured on test, nothing written
    "report:cards",  # report: model cards written, report.json not
]
MAXIDISC_KILLS = [
    "write:work/pruned", "data:tokenised", "write:work/ta_init-0.5", "ta-0.5:step@6", "ta-0.5:trained",
    "write:work/student_init-0.5", "student-via-0.5:checkpoint", "write:ta-0.7/best", "student-via-0.7:step@2",
    "write:work/student_init-direct", "student-direct:checkpoint@2", "write:killed/student", "report:cards",
]


def assert_killed_and_resumed_identically(runs, points, whole: Path, killed: Path) -> None:
    """Every kill landed where it was aimed, left no output looking complete, and the resumed run ends as the
    uninterrupted one: the same report numbers and bit-identical published weights."""
    assert [r["point"] for r in runs] == [*points, None]
    for run in runs[:-1]:
        assert run["exit"] == -signal.SIGKILL, f"not killed at {run['point']}: {Path(run['log']).read_text()[-3000:]}"
        assert "report.json" not in run["entries"], run["point"]
        assert all(complete for name, complete in run["models"].items() if not Path(name).name.startswith(".")), run
    assert runs[-1]["exit"] == 0, Path(runs[-1]["log"]).read_text()[-3000:]
    assert report_numbers(killed) == report_numbers(whole)
    published = [p.relative_to(whole) for p in [whole / "ta", whole / "student", whole / "supernet",
                                                 *(whole / "baselines").glob("*")] if (p / "config.json").is_file()]
    for folder in published:
        assert_same_weights(whole / folder, killed / folder)
    assert not any(killed.rglob(".*.partial*")) and not any(killed.rglob(".*.old-*"))  # killed writers' scratch


def test_a_kill_at_every_phase_of_compress_resumes_to_the_same_run(compressed, trained_teacher, corpus, tmp_path):
    whole, _ = compressed
    assert json.loads((whole / "report.json").read_text())["selected_ta"], "the reference run must export a TA"
    killed = tmp_path / "killed"
    tokens = tmp_path / "tokens"  # a token cache of its own, so that the chain builds the token files
    args = options(trained_teacher, corpus, killed, *COMPRESS_OPTIONS, "--report-to", "tensorboard", "csv",
                   "--token-cache", tokens)
    first = minidisc("compress", *args, check=False, env={faults.KILL_AT: COMPRESS_KILLS[0]})  # the console script
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    refused = minidisc("compress", *args, check=False)  # a killed run is continued only when asked to
    assert refused.returncode == 2 and "--resume" in refused.stderr
    runs = kill_chain("compress", [*args, "--resume"], COMPRESS_KILLS[1:], tmp_path / "logs")
    assert_killed_and_resumed_identically(runs, COMPRESS_KILLS[1:], whole, killed)
    assert sorted(p.name.split("-")[0] for p in tokens.iterdir()) == ["dev.txt", "train.txt"]  # no scratch left
    assert_tracked_curves(killed, tracked_csv)  # the steps a kill made the run redo are tracked once
    assert_tracked_curves(killed, tracked_tensorboard)


def test_a_kill_at_every_phase_of_maxidisc_resumes_to_the_same_run(maxidisc_run, trained_teacher, corpus, tmp_path):
    killed = tmp_path / "killed"
    runs = kill_chain("maxidisc", options(trained_teacher, corpus, killed), MAXIDISC_KILLS, tmp_path / "logs")
    assert_killed_and_resumed_identically(runs, MAXIDISC_KILLS, maxidisc_run, killed)


def test_sigterm_checkpoints_at_the_next_step_and_the_resumed_run_loses_no_step(trained_teacher, corpus, tmp_path):
    """scancel, Slurm preemption and evictions send SIGTERM. Outside a training loop the run stops at once (its
    outputs are written whole or not at all); inside one, the step in flight finishes, the next step boundary
    checkpoints and the run exits 143 with one line. Resumed, it ends as the uninterrupted run. A second SIGTERM
    stops at once."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    minidisc("distill", *options(trained_teacher, corpus, whole))
    args = options(trained_teacher, corpus, killed)
    runs = [minidisc("distill", *args, *resume, check=False, env={faults.KILL_AT: point, faults.KILL_WITH: "TERM"})
            for point, resume in (("data:tokenised", ()), ("student:step@3", ("--resume",)))]
    for run, message in zip(runs, ("SIGTERM outside a training step: stopped at once",
                                   "stage student: checkpointed at step 4 on SIGTERM")):
        assert run.returncode == 143, run.stderr[-3000:]
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith(f"minidisc: stopped: {message}") and last.endswith("run again with --resume"), last
        assert "Traceback" not in run.stderr and not (killed / "report.json").exists()
    resumed = minidisc("distill", *args, "--resume")
    assert "stage student: resumed at step 4" in resumed.stderr  # steps 1-4 were kept: the signal came in step 3
    assert report_numbers(killed) == report_numbers(whole)
    assert_same_weights(whole / "student", killed / "student")

    twice = minidisc("distill", *options(trained_teacher, corpus, tmp_path / "twice"), check=False,
                     env={faults.KILL_AT: "student:step@3", faults.KILL_WITH: "TERM,TERM"})
    assert twice.returncode == -signal.SIGTERM, twice.stderr[-3000:]


def test_a_lock_left_by_a_killed_extension_build_is_named_before_anything_runs(trained_teacher, corpus, tmp_path):
    """A torch/DeepSpeed extension build (cpu_adam, ...) that was killed leaves BUILD_DIR/lock, and every later build
    waits for it forever. An old lock in this interpreter's build folder that no process works beside is named in
    one line, before --out is touched; a recent one, one a live build sits beside, or one in another torch build's
    folder is left alone."""
    dry = ("distill", *options(trained_teacher, corpus, tmp_path / "dry"), "--dry-run")
    old = time.time() - 2 * faults.BUILD_LOCK_S
    if not faults._lock_file_blocks():  # torch 2.15+: an OS-level lock the kernel drops; a lock file is harmless
        lock = tmp_path / "torch_extensions" / "cpu_adam" / "lock"
        lock.parent.mkdir(parents=True)
        lock.touch()
        os.utime(lock, (old, old))
        assert minidisc(*dry, env={"TORCH_EXTENSIONS_DIR": str(lock.parents[1])}, check=False).returncode == 0
        return
    # default root: one folder per Python and torch build; another build's stale lock is not this run's to wait on
    elsewhere = tmp_path / "cache" / "torch_extensions" / "py311_cu999" / "cpu_adam" / "lock"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.touch()
    os.utime(elsewhere, (old, old))
    assert "TORCH_EXTENSIONS_DIR" not in os.environ
    default_root = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert minidisc(*dry, env=default_root, check=False).returncode == 0

    extensions = tmp_path / "torch_extensions"  # TORCH_EXTENSIONS_DIR: the build folders sit right in it
    lock = extensions / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    env = {"TORCH_EXTENSIONS_DIR": str(extensions)}
    assert minidisc(*dry, env=env, check=False).returncode == 0  # recent: a build may be running
    os.utime(lock, (old, old))
    building = subprocess.Popen(["sleep", "120"], cwd=lock.parent)  # a compiler at work in the build folder
    try:
        assert minidisc(*dry, env=env, check=False).returncode == 0
    finally:
        building.kill()
        building.wait()
    for args in (dry, ("distill", *options(trained_teacher, corpus, tmp_path / "out"))):
        refused = minidisc(*args, env=env, check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert f"(rm {lock})" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() and lock.exists()  # named, not removed: the cache may be shared

    # the same stale lock in this interpreter's folder under the default root is named too
    mine = faults._build_folder().name
    here = tmp_path / "cache" / "torch_extensions" / mine / "cpu_adam" / "lock"
    here.parent.mkdir(parents=True)
    here.touch()
    os.utime(here, (old, old))
    refused = minidisc(*dry, env=default_root, check=False)
    assert refused.returncode == 2 and f"(rm {here})" in refused.stderr, refused.stderr[-3000:]


def test_nan_loss_stops_with_the_last_good_checkpoint(trained_teacher, corpus, tmp_path):
    out = tmp_path / "nan"
    # warm-up makes step 1 a no-op (lr 0), then an absurd learning rate blows the weights up; the hidden-state MSE
    # of weights near 1e30 overflows (the logit and CE terms of normed hidden states stay finite, only huge)
    result = minidisc("compress", *options(trained_teacher, corpus, out, "--lr", "1e30", "--warmup-ratio", "0.25",
                                           "--eval-every", "1", "--hidden-weight", "0.5"), check=False)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "not finite" in message or "became" in message, result.stderr[-3000:]
    assert "--lr" in message and "Traceback" not in result.stderr
    latest = out / "work" / "sandwich" / "checkpoints" / "latest"
    assert latest.is_file() and (latest.parent / latest.read_text().strip()).is_dir()
    assert not (out / "student").exists() and not (out / "report.json").exists()


@pytest.mark.multiprocess
def test_two_processes_match_one(compressed, trained_teacher, corpus, tmp_path):
    """The same run under the `deepspeed` launcher with 2 ZeRO-3 processes (gloo): same global batches, so
    the same selection and the same student up to float reduction order."""
    whole, _ = compressed
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [launcher, "--num_gpus", "2", "--master_port", free_port(), MINIDISC, "compress",
               *options(trained_teacher, corpus, tmp_path / "two", *COMPRESS_OPTIONS)]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    one = json.loads((whole / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["selected_ta"] == one["selected_ta"]
    for a, b in zip(one["candidates"], two["candidates"]):
        assert b["p"] == pytest.approx(a["p"], abs=1e-3) and b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert two["student"]["loss"] == pytest.approx(one["student"]["loss"], abs=1e-4)
    from safetensors.torch import load_file

    a = load_file(whole / "student" / "model.safetensors")
    b = load_file(tmp_path / "two" / "student" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)


def test_bad_inputs_fail_fast_with_one_line(trained_teacher, pruned_dirs, corpus, tmp_path):
    base = options(trained_teacher, corpus, tmp_path / "out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    bad_ds = tmp_path / "bad.json"
    bad_ds.write_text("{not json")
    short = tmp_path / "short.txt"  # the built-in lm-eval tasks need more test text: said before any training
    short.write_text("A few words.\n\nAnd a few more.\n")
    short_out = tmp_path / "short-test"
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(corpus["jsonl"], shards / "a.jsonl")
    (shards / "b.jsonl").write_text('{"text": "fine"}\n{broken\n')
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    a_file = tmp_path / "taken.txt"  # --out naming a file, or a folder under one
    a_file.write_text("not a folder")
    (tmp_path / "o3").mkdir()  # a refusal that comes once --out is claimed removes only what the run wrote there
    (tmp_path / "o3" / ".minidisc").write_text("{}")  # ours (a folder minidisc wrote before), so it may be used
    (tmp_path / "o3" / "notes.txt").write_text("kept")
    cases = [
        (["distill", *options(trained_teacher, corpus, a_file)], f"--out {a_file}: {a_file} is a file, not a folder"),
        (["distill", *options(trained_teacher, corpus, a_file / "run")], f"{a_file} is a file, not a folder"),
        (["distill", *base, "--data", shards], "cannot read data file " + str(shards / "b.jsonl")),
        (["distill", *base, "--data", f"{corpus['jsonl']}@3", f"{chat}@1"], "the tokenizer has no chat template"),
        (["distill", *base, "--data", f"{corpus['jsonl']}@0"], "weight 0 must be a positive number"),
        (["distill", *base, "--data", chat, "--text-field", "conversation"], "has no 'conversation' field"),
        (["compress", *base[:1], tmp_path / "missing", *base[2:]], "does not exist"),
        (["compress", *base, "--deepspeed", tmp_path / "none.json"], "DeepSpeed config"),
        (["compress", *options(pruned_dirs["opt"], corpus, tmp_path / "o2"), "--target-sparsity", "0.75"],
         "not on the grid"),
        (["compress", *options(pruned_dirs["opt"], corpus, tmp_path / "o3"), "--sparsest", "0.97"],
         "--sparsest 0.97 is not on the grid"),
        (["compress", *base, "--sparsest", "0.8"], "--sparsest 0.8 is below --target-sparsity 0.9"),
        (["distill", *base, "--student-stage", "joint"], "has no sandwich: drop them"),
        (["maxidisc", *base, "--no-supernet"], "has no sandwich: drop them"),
        (["compress", *options(trained_teacher, corpus, foreign)], "not empty"),
        (["distill", *base, "--deepspeed", bad_ds], "not valid JSON"),
        (["distill", *options(pruned_dirs["opt"], corpus, short_out), "--test-data", short, "--test-samples", "1",
          "--seq-len", "4", "--eval-tasks", "minidisc_ppl", "minidisc_cloze"], "minidisc_cloze needs 4 documents"),
    ]
    results = minidisc_forked([argv for argv, _ in cases], tmp_path / "logs")
    for (argv, message), result in zip(cases, results):
        assert result["exit"] == 2 and "Traceback" not in result["stderr"], (argv, result["stderr"][-3000:])
        assert message in result["stderr"].strip().splitlines()[-1], (argv, result["stderr"][-3000:])
    assert (foreign / "precious.txt").read_text() == "keep me" and a_file.read_text() == "not a folder"
    # refusals that need the pruned teacher or the token blocks come after --out is claimed; they undo the claim, so
    # the same command with fixed inputs starts without --resume
    assert not (tmp_path / "o2").exists() and not short_out.exists()
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == [".minidisc", "notes.txt"]


def test_resume_refuses_changed_options(pruned_dirs, corpus, tmp_path):
    args = options(pruned_dirs["llama_gqa"], corpus, tmp_path / "run", "--max-steps", "2", "--eval-every", "2")
    minidisc("distill", *args)
    result = minidisc("distill", *args, "--resume", "--lam", "0.4", check=False)
    assert result.returncode == 2 and "lam: 0.2 -> 0.4" in result.stderr
    # resuming a finished run redoes nothing and writes the same report
    before = json.loads((tmp_path / "run" / "report.json").read_text())
    minidisc("distill", *args, "--resume")
    after = json.loads((tmp_path / "run" / "report.json").read_text())
    assert after["student"] == before["student"]


def test_uniform_student_is_a_stock_checkpoint(pruned_dirs, trained_teacher, corpus, tmp_path):
    """A whole `compress --uniform` on a Qwen2 teacher (q/k/v biases, tied embeddings, sliding layers) gives a
    stock Qwen2 checkpoint that keeps the teacher's attention settings."""
    out = tmp_path / "uniform"
    minidisc("compress", *options(pruned_dirs["qwen2"], corpus, out, "--uniform", "--truncate", "0.7",
                                  "--max-steps", "4", "--sandwich-steps", "4", "--eval-every", "2"))
    config = json.loads((out / "student" / "config.json").read_text())
    teacher = json.loads((pruned_dirs["qwen2"] / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["num_attention_heads"] < teacher["num_attention_heads"]  # heads were pruned, uniformly
    assert [config[k] for k in ("sliding_window", "layer_types", "tie_word_embeddings")] == [
        teacher[k] for k in ("sliding_window", "layer_types", "tie_word_embeddings")]
    code = ("import sys, json; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print(json.dumps([type(m).__name__, sum(p.numel() for p in m.parameters())]))")
    result = run_python(code, out / "student", env={"PYTHONPATH": ""})
    name, parameters = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert name == "Qwen2ForCausalLM" and parameters == report["student"]["parameters"]
    from engine.models.export import export  # every uniform width of the supernet is a stock checkpoint too

    exported = export(out / "supernet", 0.7, tmp_path / "uniform-0.7", uniform=True)
    result = run_python(code, tmp_path / "uniform-0.7", env={"PYTHONPATH": ""})
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["Qwen2ForCausalLM", exported["parameters"]]
    refused = minidisc("compress", *options(trained_teacher, corpus, tmp_path / "u2", "--uniform",
                                            "--grid", "0", "0.5", "0.99", "--target-sparsity", "0.99",
                                            "--truncate", "0.99", "--ffn-multiple", "1"), check=False)
    assert refused.returncode == 2 and "keeps no units in a layer" in refused.stderr


def test_python_api_and_early_stopping(pruned_dirs, corpus, tmp_path):
    """engine.distill(RunConfig) as a user's script calls it; with a learning rate too small to change any
    weight, dev accuracy never improves after the first evaluation and --patience 1 stops the stage there."""
    code = (
        "import sys, json, engine\n"
        "cfg = engine.RunConfig(teacher=sys.argv[1], data=sys.argv[2], dev_data=sys.argv[3], out=sys.argv[4],\n"
        "    max_steps=8, eval_every=2, patience=1, lr=1e-30, batch_size=4, seq_len=32, eval_samples=8,\n"
        "    deepspeed=sys.argv[5]).validate()\n"
        "report = engine.distill(cfg)\n"
        "print(json.dumps(report.student.to_dict()))\n")
    out = tmp_path / "api"
    result = run_python(code, pruned_dirs["llama_gqa"], corpus["train"], corpus["dev"], out, FP32,
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    student = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    # the Python API's report is report.json's, with the run's own paths (report.json names them relative to --out)
    assert student == {**report["student"], "path": str(out / "student")} and student["best_step"] == 2
    steps = [point["step"] for point in report["curves"]["student"]["eval"]]
    assert steps == [2, 4]  # stopped after one evaluation without improvement, not at step 8


def test_a_stage_that_stopped_early_stays_stopped_on_resume(pruned_dirs, corpus, tmp_path):
    """Killed after its early-stop checkpoint but before its result file, a stage resumed with --resume ends
    where it stopped (patience used to be checked only after an evaluation, so it trained on)."""
    run = ("import sys, engine\n"
           "cfg = engine.RunConfig(teacher=sys.argv[1], data=sys.argv[2], dev_data=sys.argv[3], out=sys.argv[4],\n"
           "    max_steps=8, eval_every=2, patience=1, lr=1e-30, batch_size=4, seq_len=32, eval_samples=8,\n"
           "    deepspeed=sys.argv[5], resume=sys.argv[6] == 'resume').validate()\n"
           "engine.distill(cfg)\n")
    out, env = tmp_path / "api", {"OMP_NUM_THREADS": "1"}
    args = (pruned_dirs["llama_gqa"], corpus["train"], corpus["dev"], out, FP32)
    # killed the moment the stage would write its result
    assert run_python(run, *args, "first", env={**env, faults.KILL_AT: "student:trained"}).returncode == -9
    assert not (out / "work" / "student" / "result.json").exists()
    resumed = run_python(run, *args, "resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert [point["step"] for point in report["curves"]["student"]["eval"]] == [2, 4]


def test_a_bf16_teacher_hands_off_in_fp32_and_publishes_in_bf16(trained_teacher, corpus, tmp_path):
    """Stage hand-offs (best snapshots, sliced inits) keep the precision the stage trained in (fp32 here), so a stage
    does not start from weights rounded to the teacher checkpoint's dtype; what is published (ta/, student/,
    baselines/) is in that dtype."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tmp_path / "teacher-bf16"
    AutoModelForCausalLM.from_pretrained(trained_teacher, dtype=torch.bfloat16).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(trained_teacher).save_pretrained(teacher)
    out = tmp_path / "out"
    minidisc("compress", *options(teacher, corpus, out, "--lam", "0", "--truncate", "0", "--baselines", "kd"))

    def dtypes(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {f.get_slice(name).get_dtype() for name in f.keys()}

    assert json.loads((out / "report.json").read_text())["selected_ta"] is not None  # a TA -> student hand-off
    work = out / "work"
    for folder in (work / "sandwich" / "best", work / "sandwich" / "supernet", work / "student_init",
                   work / "student" / "best"):
        assert dtypes(folder) == {"F32"}, folder
    for folder in (out / "ta", out / "student", out / "supernet", out / "baselines" / "kd"):
        assert dtypes(folder) == {"BF16"}, folder
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
