"""The launch scripts, run for real on this machine: one node with 2 ranks, two "nodes" with a launcher each
(the no-ssh multi-node form), a rank that dies, and the scripts' own input checks."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import SCRIPTS, assert_same_student, free_port, run_script, script_env, write_recipe


def start_two_nodes(recipe: Path, tmp_path: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two launchers, as on two nodes that cannot ssh to each other: `NODE_RANK=r multi_node.sh`."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port, launchers, logs = free_port(), [], []
    for node_rank in (0, 1):
        log = tmp_path / f"node{node_rank}.log"
        env = script_env(RECIPE=recipe, HOSTFILE=hostfile, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                         NODE_RANK=node_rank)
        launchers.append(subprocess.Popen(["bash", SCRIPTS / "multi_node.sh"], stdout=log.open("w"),
                                          stderr=subprocess.STDOUT, env=env))
        logs.append(log)
    return launchers, logs


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_nodes_give_the_same_student_as_one_node(trained_teacher, corpus, tmp_path):
    one = run_script("single_node.sh", NUM_GPUS=2, MASTER_PORT=free_port(),
                     RECIPE=write_recipe(tmp_path / "one.yaml", trained_teacher, corpus, tmp_path / "one"))
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    assert "2 processes (2 per node), gloo" in one.stderr

    launchers, logs = start_two_nodes(write_recipe(tmp_path / "two.yaml", trained_teacher, corpus,
                                                   tmp_path / "two"), tmp_path)
    codes = [launcher.wait(timeout=600) for launcher in launchers]
    assert codes == [0, 0], logs[0].read_text()[-4000:] + logs[1].read_text()[-4000:]
    assert "2 processes (1 per node), gloo" in logs[0].read_text()
    assert_same_student(tmp_path / "one", tmp_path / "two")


def _worker_of_rank(launchers, rank: int, timeout: float = 60) -> psutil.Process:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for launcher in launchers:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == str(rank) and "minidisc" in " ".join(child.cmdline()):
                        return child
                except psutil.Error:
                    continue
        time.sleep(0.2)
    raise AssertionError(f"no worker process with RANK={rank}")


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("dead", [1, 0])
def test_a_dead_rank_fails_the_job_with_its_name(dead, trained_teacher, corpus, tmp_path):
    """No launcher kills the other node's ranks in the no-ssh form: the survivor must notice by itself."""
    out = tmp_path / "run"
    launchers, logs = start_two_nodes(write_recipe(tmp_path / "r.yaml", trained_teacher, corpus, out,
                                                   max_steps=400, eval_every=2), tmp_path)
    latest = out / "work" / "sandwich" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.is_file():
        assert time.time() < deadline and all(p.poll() is None for p in launchers), logs[0].read_text()[-3000:]
        time.sleep(0.2)
    _worker_of_rank(launchers, dead).kill()
    survivor = 1 - dead
    code = launchers[survivor].wait(timeout=120)  # bounded: no hang in a collective
    launchers[dead].wait(timeout=60)
    text = logs[survivor].read_text()
    assert code != 0
    message = [line for line in text.splitlines() if line.startswith("minidisc: error:")]
    assert message, text[-3000:]
    if dead == 0:
        assert f"rank {survivor} of 2: rank 0 (it hosted the rendezvous store" in message[0]
    else:
        assert f"rank {survivor} of 2: rank {dead} stopped responding" in message[0]
    assert "--resume" in message[0] and "Traceback" not in text
    assert latest.is_file()  # the last evaluation's checkpoint survives for --resume


def test_scripts_say_which_variable_is_missing(tmp_path):
    result = run_script("single_node.sh")
    assert result.returncode == 2 and "set RECIPE" in result.stderr
    result = run_script("single_node.sh", RECIPE=tmp_path / "none.yaml")
    assert result.returncode == 2 and "does not exist" in result.stderr
    (tmp_path / "r.yaml").write_text("{}\n")
    result = run_script("multi_node.sh", RECIPE=tmp_path / "r.yaml", MASTER_ADDR="node0")
    assert result.returncode == 2 and "set HOSTFILE" in result.stderr
    (tmp_path / "hosts").write_text("node0 slots=8\nnode1 slots=8\n")
    result = run_script("multi_node.sh", RECIPE=tmp_path / "r.yaml", MASTER_ADDR="node0",
                        HOSTFILE=tmp_path / "hosts", NODE_RANK=2)
    assert result.returncode == 2 and "NODE_RANK=2 must be 0..1" in result.stderr
    for name in ("slurm_srun.sbatch", "slurm_deepspeed.sbatch"):
        result = run_script(name, RECIPE=tmp_path / "r.yaml")
        assert result.returncode == 2 and "submit this script with sbatch" in result.stderr
