"""Output directories written atomically, with the user's file modes.

An output directory is built under a hidden `.NAME.partial-PID` sibling and renamed into place only when
complete, so a killed job never leaves a directory that looks finished. A marker file says it is ours:
we replace our own outputs, but never a directory someone else wrote.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from engine.errors import UserError

MARKER = ".minidisc"


def is_ours(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def umask_mode(is_dir: bool = False) -> int:
    """The mode a new file (0644 under umask 022) or folder gets from the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def _apply_umask(directory: Path) -> None:
    """Give every file the mode the user's umask asks for. safetensors writes 0600 whatever the umask, and copies
    keep that mode: a teammate or a serving account could not read the model."""
    for path in directory.rglob("*"):
        path.chmod(umask_mode(path.is_dir()))


@contextmanager
def atomic_output_dir(out, kind: str):
    """Yield a scratch directory; on success it replaces `out` in one rename, on failure it is removed."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and (is_ours(out) or not any(out.iterdir()))):
        raise UserError(f"output {out} exists and was not written by minidisc: choose a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
        (scratch / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        _apply_umask(scratch)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            scratch.rename(out)
            shutil.rmtree(old)
        else:
            scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
