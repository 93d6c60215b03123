"""A wheel install, not only the editable one: `pip wheel .` of this checkout, installed on its own, runs a
dry run from an unrelated directory with the DeepSpeed configs it ships (no path into the checkout)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO, save_teacher

SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__", ".pytest_cache", "results")


@pytest.mark.slow
def test_wheel_install_runs_the_default_dry_run(corpus, tokenizer_dir, tmp_path):
    source = tmp_path / "source"  # a copy, so building leaves the checkout as it was
    shutil.copytree(REPO, source, ignore=SKIP)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", tmp_path / "dist", source], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("minidisc-*.whl"))
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("engine/ds_configs/")}
    assert shipped == {f"engine/ds_configs/{p.name}" for p in (REPO / "ds_configs").glob("*.json")}

    target = tmp_path / "site"
    subprocess.run(["git", "init", "-q", target], check=True)  # an install inside someone else's repository
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    shutil.rmtree(source)  # nothing may still point into the source tree
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"}  # ahead of the editable install's finder
    where = subprocess.run([sys.executable, "-c", "import engine.config as c; from engine.core.provenance import "
                            "git_commit; print(c.__file__, c.DS_CONFIGS, git_commit())"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    # the installed copy, its configs, and no commit: that repository's is not the engine's
    assert where.stdout.split() == [str(target / "engine" / "config.py"), str(target / "engine" / "ds_configs"), "None"]

    teacher = save_teacher("llama_gqa", tmp_path / "teacher", tokenizer_dir)
    run = subprocess.run([target / "bin" / "minidisc", "compress", "--teacher", teacher, "--data", corpus["jsonl"],
                          "--dev-data", corpus["dev"], "--out", tmp_path / "run", "--dry-run"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checks passed" in " ".join(run.stdout.split())
    assert not (tmp_path / "run").exists()
