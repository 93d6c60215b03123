"""The Slurm batch scripts on a real one-node Slurm cluster started for this module (2 tasks per job, gloo).

`.ci/run` installs Slurm and sets MINIDISC_REQUIRE_SLURM=1, so there a missing cluster fails instead of
skipping."""
from __future__ import annotations

import json
import os
import time

import pytest
from helpers import SCRIPTS, assert_same_student, script_env, write_recipe
from slurm_cluster import SlurmCluster, missing

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess, pytest.mark.slow]

TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]  # CPU-only node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing()
    if reason:
        if os.environ.get("MINIDISC_REQUIRE_SLURM") == "1":
            pytest.fail(f"MINIDISC_REQUIRE_SLURM=1 but no Slurm cluster can start: {reason}")
        pytest.skip(reason)
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield slurm
    slurm.stop()


def submit(cluster, script: str, recipe, log, *options) -> int:
    return cluster.sbatch(SCRIPTS / script, *TASKS, f"--output={log}", *options, env=script_env(RECIPE=recipe))


@pytest.fixture(scope="module")
def srun_run(cluster, trained_teacher, corpus, tmp_path_factory):
    """`sbatch slurm_srun.sbatch` running `minidisc compress` to the end; (out, log, wall seconds)."""
    root = tmp_path_factory.mktemp("srun")
    recipe = write_recipe(root / "recipe.yaml", trained_teacher, corpus, root / "out", max_steps=24)
    started = time.time()
    job = cluster.wait(submit(cluster, "slurm_srun.sbatch", recipe, root / "job.log"))
    wall = time.time() - started
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (root / "job.log").read_text()[-4000:]
    phases = json.loads((root / "out" / "report.json").read_text())["phases"]
    print(f"\n2-task Slurm compress (srun): {wall:.1f} s from sbatch to COMPLETED; phases (s): {phases}")
    return root / "out", root / "job.log", wall


def test_srun_script_runs_compress_with_two_tasks(srun_run):
    out, log, _ = srun_run
    text = log.read_text()
    assert "1 node(s) x 2 tasks" in text and "2 processes (2 per node), gloo" in text
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["parameters"] < report["teacher"]["parameters"]
    assert (out / "student" / "model.safetensors").is_file() and "--resume" not in text


def test_deepspeed_slurm_launcher_gives_the_same_student(cluster, srun_run, trained_teacher, corpus, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", trained_teacher, corpus, tmp_path / "out", max_steps=24)
    job = cluster.wait(submit(cluster, "slurm_deepspeed.sbatch", recipe, tmp_path / "job.log"))
    text = (tmp_path / "job.log").read_text()
    assert job["JobState"] == "COMPLETED", text[-4000:]
    assert "srun -n 2" in text and "2 processes (2 per node)" in text  # the launcher wrote the srun line
    assert_same_student(srun_run[0], tmp_path / "out")


def test_pre_timeout_signal_requeues_and_the_resumed_job_ends_the_same(cluster, srun_run, trained_teacher, corpus,
                                                                       tmp_path):
    """SIGUSR1 (what `--signal=USR1@600` sends before the time limit): the ranks checkpoint and exit 75, the
    script requeues the job, and the second start resumes to the same student as the uninterrupted job."""
    out, log = tmp_path / "out", tmp_path / "job.log"
    recipe = write_recipe(tmp_path / "recipe.yaml", trained_teacher, corpus, out, max_steps=24)
    job_id = submit(cluster, "slurm_srun.sbatch", recipe, log)
    latest = out / "work" / "sandwich" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.is_file():
        assert time.time() < deadline and cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), \
            log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.2)
    cluster.scancel(job_id, "--signal=USR1")  # to the job's steps, as Slurm does at the signal time
    requeued = cluster.wait(job_id, timeout=120, until=("PENDING",))
    assert requeued["Restarts"] == "1", log.read_text()[-3000:]
    assert not (out / "report.json").exists()
    cluster.release_requeued(job_id)
    job = cluster.wait(job_id)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED", text[-4000:]
    assert "stopped: stage" in text and "checkpointed at step" in text and "requeueing job" in text
    assert "start 1," in text and "resumed at step" in text
    assert_same_student(srun_run[0], out)
