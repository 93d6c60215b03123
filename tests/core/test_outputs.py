"""engine.core.outputs: a run's --out is claimed once, under a lock held by the process that runs it."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from engine.core.errors import UserError
from engine.core.outputs import LOCK, RUN_FILE, claim_run_dir

CONFIG = {"lam": 0.2, "out": "o"}
# A second process that claims OUT and holds it (as a running `minidisc compress` does) until it is killed.
HOLDER = ("import sys, time; from pathlib import Path; from engine.core.outputs import claim_run_dir\n"
          "lock = claim_run_dir(Path(sys.argv[1]), 'compress', {'lam': 0.2, 'out': 'o'}, sys.argv[2] == 'resume',\n"
          "                     set())\n"
          "print('holding', flush=True); time.sleep(600)\n")


def hold(out, resume=False) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "resume" if resume else "new"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_second_run_on_a_busy_out_is_refused_and_a_killed_runs_lock_does_not_block_resume(tmp_path):
    out = tmp_path / "run"
    holder = hold(out)
    try:
        assert json.loads((out / RUN_FILE).read_text()) == {"command": "compress", "config": CONFIG}
        with pytest.raises(UserError, match=rf"{out} is in use by another minidisc run \(pid {holder.pid} on "):
            claim_run_dir(out, "compress", CONFIG, True, set())
        assert f"pid {holder.pid}" in (out / LOCK).read_text()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = claim_run_dir(out, "compress", CONFIG, True, set())  # the dead holder's lock is gone with it
    assert lock is not None and "pid" in (out / LOCK).read_text()
    lock.close()


def test_a_second_new_run_is_told_who_holds_the_out(tmp_path):
    out = tmp_path / "run"
    holder = hold(out)
    try:
        with pytest.raises(UserError, match=rf"in use by another minidisc run \(pid {holder.pid} on "):
            claim_run_dir(out, "compress", CONFIG, False, set())
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(UserError, match="already holds a `minidisc compress` run: pass --resume"):
        claim_run_dir(out, "compress", CONFIG, False, set())


def test_a_refused_claim_writes_nothing(tmp_path):
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty"):
        claim_run_dir(foreign, "compress", CONFIG, False, set())
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = tmp_path / "run"
    claim_run_dir(out, "compress", CONFIG, False, set()).close()
    with pytest.raises(UserError, match=r"with other options \(lam: 0.2 -> 0.5\)"):
        claim_run_dir(out, "compress", {**CONFIG, "lam": 0.5}, True, set())
