"""`minidisc compress | distill | maxidisc` end to end on a briefly trained tiny teacher, through the console
script (the way users run it), with the report checked against the artifacts it describes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FP32, MINIDISC, accuracy_on, free_port, minidisc, options, run_python

from engine.distillation.selection import tradeoff

pytestmark = [pytest.mark.slow]


def test_compress_end_to_end(trained_teacher, corpus, tmp_path):
    out = tmp_path / "run"
    shm_before = set(Path("/dev/shm").glob("deepspeed_*"))
    result = minidisc("compress", *options(trained_teacher, corpus, out, "--lam", "0.05", "--baselines", "kd-matched"))
    assert set(Path("/dev/shm").glob("deepspeed_*")) <= shm_before  # no leaked 70 MB communication buffers
    report = json.loads((out / "report.json").read_text())
    assert "MiniDisc TA candidates" in result.stdout
    # the choice is the argmax of the numbers the report shows
    rows = report["candidates"]
    assert [r["sparsity"] for r in rows] == [0.5, 0.7, 0.9]
    best = max(rows, key=lambda r: (r["p"] + report["lam"] * r["sparsity"], -r["sparsity"]))
    for row in rows:
        assert row["tradeoff"] == pytest.approx(tradeoff(row["p"], round(row["sparsity"] * 1000), 0.05))
        assert 0 < row["p"] <= 1.5 and 0 < row["accuracy"] < 1
    assert report["teacher"]["dev_accuracy"] > 0.1  # the trained teacher predicts something
    selected = report["selected_ta"]
    if best["sparsity"] < 0.9:
        assert selected["sparsity"] == best["sparsity"] and (out / "ta" / "config.json").is_file()
        meta = json.loads((out / "ta" / "minidisc_export.json").read_text())
        assert meta["sparsity"] == best["sparsity"]
    else:
        assert selected is None and not (out / "ta").exists()
    # the student on disk is the model the report describes: on test, and on the dev split that selected it
    splits = torch.load(out / "work" / "data.pt")
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
    assert not any((out / "work").glob("*/checkpoints"))  # finished stages drop their optimiser states


def test_distill_and_maxidisc_share_budget_and_report(trained_teacher, corpus, tmp_path):
    minidisc("distill", *options(trained_teacher, corpus, tmp_path / "kd"))
    kd = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert set(kd["curves"]) == {"student"} and kd["student"]["via"] == "teacher"
    assert max(point["step"] for point in kd["curves"]["student"]["train"]) == 8

    minidisc("maxidisc", *options(trained_teacher, corpus, tmp_path / "maxi"))
    maxi = json.loads((tmp_path / "maxi" / "report.json").read_text())
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
    snapshot trains as a supernet at every width past the TA, and the student is the target's best dev snapshot."""
    out = tmp_path / "joint"
    minidisc("compress", *options(trained_teacher, corpus, out, "--grid", "0", "0.5", "0.7", "0.9", "0.95",
                                  "--sparsest", "0.95", "--student-stage", "joint", "--lam", "0"))
    report = json.loads((out / "report.json").read_text())
    trained = lambda stage: {point["width"] for point in report["curves"][stage]["train"]}  # noqa: E731
    assert trained("sandwich") == {0.5, 0.7, 0.9, 0.95}
    assert [r["sparsity"] for r in report["candidates"]] == [0.5, 0.7, 0.9]
    ta = (report["selected_ta"] or {}).get("sparsity")
    assert trained("student") == {s for s in (0.5, 0.7, 0.9, 0.95) if s > (ta or 0.85)}
    # the student is the target's first best dev point, whatever the other widths did
    target_evals = [p for p in report["curves"]["student"]["eval"] if p["width"] == 0.9]
    best = max(target_evals, key=lambda p: p["accuracy"])
    student = report["student"]
    assert student["best_step"] == best["step"] and student["dev_accuracy"] == pytest.approx(best["accuracy"])
    splits = torch.load(out / "work" / "data.pt")
    assert accuracy_on(out / "student", splits["test"]) == pytest.approx(student["accuracy"], abs=1e-9)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "student", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == student["parameters"]
    stage = report["compute"]["student"]
    assert stage["width_tokens"] == len(trained("student")) * stage["tokens"]


def test_resume_after_sigkill_gives_the_same_student(trained_teacher, corpus, tmp_path):
    args = options(trained_teacher, corpus, tmp_path / "whole", "--eval-every", "2", "--lam", "0.05")
    minidisc("compress", *args)
    killed_out = tmp_path / "killed"
    killed = options(trained_teacher, corpus, killed_out, "--eval-every", "2", "--lam", "0.05")
    process = subprocess.Popen([MINIDISC, "compress", *map(str, killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = killed_out / "work" / "sandwich" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step0000004") and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_out / "report.json").exists() and not (killed_out / "student").exists()
    refused = minidisc("compress", *killed, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    minidisc("compress", *killed, "--resume")
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    resumed = json.loads((killed_out / "report.json").read_text())
    assert resumed["selected_ta"] == whole["selected_ta"]
    assert [r["p"] for r in resumed["candidates"]] == [r["p"] for r in whole["candidates"]]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "student" / "model.safetensors")
    b = load_file(killed_out / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_nan_loss_stops_with_the_last_good_checkpoint(trained_teacher, corpus, tmp_path):
    out = tmp_path / "nan"
    # warm-up makes step 1 a no-op (lr 0), then an absurd learning rate blows the weights up
    result = minidisc("compress", *options(trained_teacher, corpus, out, "--lr", "1e30", "--warmup-ratio", "0.25",
                                           "--eval-every", "1"), check=False)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "not finite" in message or "became" in message, result.stderr[-3000:]
    assert "--lr" in message and "Traceback" not in result.stderr
    latest = out / "work" / "sandwich" / "checkpoints" / "latest"
    assert latest.is_file() and (latest.parent / latest.read_text().strip()).is_dir()
    assert not (out / "student").exists() and not (out / "report.json").exists()


@pytest.mark.multiprocess
def test_two_processes_match_one(trained_teacher, corpus, tmp_path):
    """The same run under the `deepspeed` launcher with 2 ZeRO-3 processes (gloo): same global batches, so
    the same selection and the same student up to float reduction order."""
    minidisc("compress", *options(trained_teacher, corpus, tmp_path / "one", "--lam", "0.05"))
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [launcher, "--num_gpus", "2", "--master_port", free_port(), MINIDISC, "compress",
               *options(trained_teacher, corpus, tmp_path / "two", "--lam", "0.05")]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["selected_ta"] == one["selected_ta"]
    for a, b in zip(one["candidates"], two["candidates"]):
        assert b["p"] == pytest.approx(a["p"], abs=1e-3) and b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert two["student"]["loss"] == pytest.approx(one["student"]["loss"], abs=1e-4)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "one" / "student" / "model.safetensors")
    b = load_file(tmp_path / "two" / "student" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)


def test_bad_inputs_fail_fast_with_one_line(trained_teacher, pruned_dirs, corpus, tmp_path):
    def error(*args):
        result = minidisc(*args, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        return result.stderr.strip().splitlines()[-1]

    base = options(trained_teacher, corpus, tmp_path / "out")
    assert "does not exist" in error("compress", *base[:1], tmp_path / "missing", *base[2:])
    assert "DeepSpeed config" in error("compress", *base, "--deepspeed", tmp_path / "none.json")
    assert "not on the grid" in error("compress", *options(pruned_dirs["opt"], corpus, tmp_path / "o2"),
                                      "--target-sparsity", "0.75")
    assert "--sparsest 0.97 is not on the grid" in error("compress", *options(pruned_dirs["opt"], corpus,
                                                                             tmp_path / "o3"), "--sparsest", "0.97")
    assert "--sparsest 0.8 is below --target-sparsity 0.9" in error("compress", *base, "--sparsest", "0.8")
    assert "has no sandwich: drop them" in error("distill", *base, "--student-stage", "joint")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    assert "not empty" in error("compress", *options(trained_teacher, corpus, foreign))
    assert (foreign / "precious.txt").read_text() == "keep me"
    bad_ds = tmp_path / "bad.json"
    bad_ds.write_text("{not json")
    assert "not valid JSON" in error("distill", *base, "--deepspeed", bad_ds)
    # the built-in lm-eval tasks need enough test text: said before any training, not after it
    short = tmp_path / "short.txt"
    short.write_text("A few words.\n\nAnd a few more.\n")
    out = tmp_path / "short-test"
    message = error("distill", *options(pruned_dirs["opt"], corpus, out), "--test-data", short, "--test-samples", "1",
                    "--seq-len", "4", "--eval-tasks", "minidisc_ppl", "minidisc_cloze")
    assert "minidisc_cloze needs 4 documents" in message and not (out / "work" / "student").exists()


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
    out = tmp_path / "uniform"
    minidisc("compress", *options(pruned_dirs["opt"], corpus, out, "--uniform", "--truncate", "0.7",
                                  "--max-steps", "4", "--sandwich-steps", "4", "--eval-every", "2"))
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["model_type"] == "opt" and config["architectures"] == ["OPTForCausalLM"]
    code = ("import sys, json; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print(json.dumps([type(m).__name__, sum(p.numel() for p in m.parameters())]))")
    result = run_python(code, out / "student", env={"PYTHONPATH": ""})
    name, parameters = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert name == "OPTForCausalLM" and parameters == report["student"]["parameters"]
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
        "print(json.dumps(report['student']))\n")
    out = tmp_path / "api"
    result = run_python(code, pruned_dirs["llama_gqa"], corpus["train"], corpus["dev"], out, FP32,
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    student = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert student == report["student"] and student["best_step"] == 2
    steps = [point["step"] for point in report["curves"]["student"]["eval"]]
    assert steps == [2, 4]  # stopped after one evaluation without improvement, not at step 8


def test_a_stage_that_stopped_early_stays_stopped_on_resume(pruned_dirs, corpus, tmp_path):
    """Killed after its early-stop checkpoint but before its result file, a stage resumed with --resume ends
    where it stopped (patience used to be checked only after an evaluation, so it trained on)."""
    run = ("import sys, os, engine\n"
           "from engine.training import trainer\n"
           "cfg = engine.RunConfig(teacher=sys.argv[1], data=sys.argv[2], dev_data=sys.argv[3], out=sys.argv[4],\n"
           "    max_steps=8, eval_every=2, patience=1, lr=1e-30, batch_size=4, seq_len=32, eval_samples=8,\n"
           "    deepspeed=sys.argv[5], resume=sys.argv[6] == 'resume').validate()\n"
           "if not cfg.resume:  # die the moment the stage would write its result, as a SIGKILL there would\n"
           "    trainer.write_result = lambda *args, **kwargs: os._exit(9)\n"
           "engine.distill(cfg)\n")
    out, env = tmp_path / "api", {"OMP_NUM_THREADS": "1"}
    args = (pruned_dirs["llama_gqa"], corpus["train"], corpus["dev"], out, FP32)
    assert run_python(run, *args, "first", env=env).returncode == 9
    assert not (out / "work" / "student" / "result.json").exists()
    resumed = run_python(run, *args, "resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert [point["step"] for point in report["curves"]["student"]["eval"]] == [2, 4]


def test_a_bf16_teacher_hands_off_in_fp32_and_publishes_in_bf16(trained_teacher, corpus, tmp_path):
    """Stage hand-offs (best snapshots, sliced inits) keep fp32, so a stage does not start from weights rounded to
    the teacher checkpoint's dtype; what is published (ta/, student/, baselines/) is in that dtype."""
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
    for folder in (work / "sandwich" / "best", work / "student_init", work / "student" / "best"):
        assert dtypes(folder) == {"F32"}, folder
    for folder in (out / "ta", out / "student", out / "baselines" / "kd"):
        assert dtypes(folder) == {"BF16"}, folder
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
