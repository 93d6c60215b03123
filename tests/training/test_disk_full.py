"""A full disk while checkpointing: one line, the last checkpoint intact, and --resume (once there is space)
finishes with the same student as a run that never stopped. The disk is a real size-limited tmpfs."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import assert_same_student, minidisc, options

pytestmark = [pytest.mark.slow]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_when(path: Path, disk: Path, done: threading.Event) -> None:
    """Once `path` exists, take every free byte of `disk` (the next checkpoint cannot be written)."""
    while not path.exists() and not done.is_set():
        time.sleep(0.01)
    free = shutil.disk_usage(disk).free
    subprocess.run(["fallocate", "-l", str(free), str(disk / "filler")], check=False)


def test_a_full_disk_keeps_the_last_checkpoint_and_resume_finishes_identically(pruned_dirs, corpus, small_disk,
                                                                               tmp_path):
    args = ["--max-steps", "12", "--eval-every", "4", "--sample-tokens", "0"]
    reference = tmp_path / "reference"
    minidisc("distill", *options(pruned_dirs["llama_gqa"], corpus, reference), *args)

    out = small_disk / "run"
    checkpoints = out / "work" / "student" / "checkpoints"
    done = threading.Event()
    filler = threading.Thread(target=fill_when, args=(checkpoints / "latest", small_disk, done))
    filler.start()
    try:
        result = minidisc("distill", *options(pruned_dirs["llama_gqa"], corpus, out), *args, check=False)
    finally:
        done.set()
        filler.join()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("minidisc: error: no space left on device (")
    assert (checkpoints / "latest").read_text().strip() == "step0000004"  # the last complete checkpoint
    assert not (out / "student").exists() and not (out / "report.json").exists()

    (small_disk / "filler").unlink()
    minidisc("distill", *options(pruned_dirs["llama_gqa"], corpus, out), *args, "--resume")
    assert_same_student(reference, out)
