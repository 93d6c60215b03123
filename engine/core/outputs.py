"""Output directories written atomically, with the user's file modes.

An output directory is built under a hidden `.NAME.partial-PID` sibling and renamed into place only when
complete, so a killed job never leaves a directory that looks finished. A marker file says it is ours:
we replace our own outputs, but never a directory someone else wrote. A run's --out is claimed once, under a
lock that its process holds while it runs (the kernel drops it when the process dies, so a killed run's lock
never blocks its --resume).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from engine.core import distributed as dist
from engine.core import faults
from engine.core.errors import UserError

log = logging.getLogger(__name__)
MARKER = ".minidisc"
LOCK = ".lock"  # in a run's --out: the pid and host of the process running it
RUN_FILE = "run.json"


def cache_dir() -> Path:
    """Where minidisc keeps what it reuses across runs (the built-in example, token files): MINIDISC_CACHE, else
    ~/.cache/minidisc."""
    if os.environ.get("MINIDISC_CACHE"):
        return Path(os.environ["MINIDISC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minidisc"


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
    make_dir(out.parent)
    remove_stale(out)
    scratch = out.parent / f".{out.name}.partial-{os.getpid()}"
    scratch.mkdir()
    try:
        yield scratch
        (scratch / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        _apply_umask(scratch)
        faults.kill_point(f"write:{out.parent.name}/{out.name}")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            scratch.rename(out)
            shutil.rmtree(old)
        else:
            scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_stale(out: Path) -> None:
    """Remove the scratch (`.NAME.partial-PID`) and replaced (`.NAME.old-PID`) folders a killed writer left."""
    for stale in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process is writing it now (a second `minidisc prune` to the same folder)
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def claim_run_dir(out: Path, command: str, config: dict, resume: bool, resumable: set[str]) -> IO | None:
    """Claim `out` for a run of `command` with `config` (a RunConfig's dict): no other process may be running
    there, a new run needs a fresh (or empty) --out, --resume the same options as the run it continues (but those
    in `resumable`). Rank 0 checks (its error is every rank's) and returns the lock, to hold while the run lasts."""
    lock = None
    with dist.main_first("claiming the output folder") as main:
        if main:
            make_dir(out)
            if any(p.name != LOCK for p in out.iterdir()) and not is_ours(out):
                raise UserError(f"output {out} exists and is not empty: choose a new --out or remove it")
            lock = _lock(out)
            try:
                _resume_or_record(out, command, config, resume, resumable)
            except UserError:
                lock.close()
                raise
    return lock


def _resume_or_record(out: Path, command: str, config: dict, resume: bool, resumable: set[str]) -> None:
    """Check the run saved in `out` against this one (--resume), or record this one in a fresh `out`."""
    run_file = out / RUN_FILE
    saved = json.loads(run_file.read_text()) if run_file.is_file() else None
    if saved and not resume:
        raise UserError(f"{out} already holds a `minidisc {saved['command']}` run: pass --resume to continue it, or "
                        "choose a new --out")
    if saved:
        changed = [k for k, v in config.items() if k not in resumable and saved["config"].get(k) != v]
        if saved["command"] != command or changed:
            what = ", ".join(f"{k}: {saved['config'].get(k)!r} -> {config[k]!r}" for k in changed)
            raise UserError(f"--resume: {out} was started as `minidisc {saved['command']}` with other options "
                            f"({what or 'command ' + saved['command']}); resume with the same options")
        log.info("resuming the run in %s", out)
    else:
        (out / MARKER).write_text(json.dumps({"kind": f"{command}-run"}) + "\n")  # first: a killed start is ours
        (out / "work").mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RUN_FILE}.partial"
        tmp.write_text(json.dumps({"command": command, "config": config}, indent=1) + "\n")
        tmp.replace(run_file)


def make_dir(path: Path, flag: str = "--out") -> None:
    """`mkdir -p`, with one line naming `flag` when the path cannot be a folder (a file in its way, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder; choose another {flag}") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create it ({e.strerror}); choose another {flag}") from None


def abandon_run_dir(out: Path, lock: IO | None, found: set[str] | None) -> None:
    """Undo a claim whose run stopped on bad input before training anything: --out goes back to how the claim found
    it (`found`: the names it held, None when it did not exist), so the same command with fixed inputs simply
    starts."""
    if lock is None:  # not rank 0
        return
    for item in out.iterdir():
        if item.name not in (found or set()) | {LOCK}:
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    if LOCK not in (found or set()):
        (out / LOCK).unlink()
    lock.close()
    if found is None:
        out.rmdir()


def _lock(out: Path) -> IO:
    """An exclusive lock on OUT/.lock, naming its holder; a held one is reported with the holder's pid and host."""
    make_dir(out)
    handle = open(out / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{out} is in use by another minidisc run ({holder}): wait for it to end, or choose another "
                        "--out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle
