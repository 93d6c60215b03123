"""How a run ends when the cluster interrupts it.

Pre-timeout signal (Slurm's `--signal=USR1@SECONDS`, or `kill -USR1`): every rank finishes its current step,
they agree at the step boundary, write a checkpoint together and exit with REQUEUE_EXIT, so a batch script
can `scontrol requeue` the job and the next run continues with `--resume`.

SIGTERM (`scancel`, Slurm preemption, a Kubernetes eviction, `kill`): the same inside a stage's training loop,
exiting 143; elsewhere (pruning, tokenising, the report: phases whose outputs are written whole or not at all)
the run stops at once. A second SIGTERM always stops at once.

A dead peer (killed, out of memory, node lost): the survivors' next collective fails (gloo: at once when the
peer's sockets close; NCCL or a hung peer: after the process-group timeout, MINIDISC_COMM_TIMEOUT seconds).
Every rank beats a counter in the rendezvous store; a survivor names the ranks whose counter stopped, and
the run fails with that one line instead of a stack trace or a hang.

A killed extension build (torch up to 2.14): its lock file would make every later build wait forever; runs refuse
instead, naming the file to delete (`check_build_locks`).

A full disk: checkpoints (DeepSpeed writes `latest` last) and outputs (built aside, renamed when whole) are never
left half-written under their real names, so the failed write is reported in one line and `--resume`, once
there is space, continues from the last complete checkpoint.
"""
from __future__ import annotations

import atexit
import errno
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from engine.core.errors import UserError

REQUEUE_SIGNAL = signal.SIGUSR1
REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later" -- the checkpoint is written, run again with --resume
TERMINATED_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended
HEARTBEAT_S = 2.0
COMM_TIMEOUT_S = float(os.environ.get("MINIDISC_COMM_TIMEOUT", 1800))

_requested = threading.Event()
_received: list[signal.Signals] = []  # the stop signals, in the order they came
_deferring = 0  # > 0 inside a training loop: a SIGTERM waits for the next step boundary there


class Preempted(Exception):
    """The run stopped on a signal (checkpointed, when a stage was training); `--resume` continues it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.exit_code = TERMINATED_EXIT if signal.SIGTERM in _received else REQUEUE_EXIT


class PeerLost(Exception):
    """Another rank of the job died; the message names it."""


# --- the pre-timeout signal ---------------------------------------------------------------------------------------
def install_signal_handler() -> None:
    """Record the signal; the training loop acts on it at the next step boundary (never mid-collective)."""
    signal.signal(REQUEUE_SIGNAL, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def _on_signal(signum: int, frame) -> None:
    signum = signal.Signals(signum)
    if signum == signal.SIGTERM and signal.SIGTERM in _received:  # the second one: stop now
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    _received.append(signum)
    _requested.set()
    if signum == signal.SIGTERM and not _deferring:
        raise Preempted("SIGTERM outside a training step: stopped at once (what was not finished is redone); run "
                        "again with --resume")


def signal_received() -> bool:
    """Whether this process got a stop signal (the trainer asks every rank, so all stop at the same step)."""
    return _requested.is_set()


def signal_name() -> str:
    return " and ".join(dict.fromkeys(s.name for s in _received)) or "no signal"


@contextmanager
def deferred_stops():
    """Inside it (a stage's training loop), SIGTERM waits for the next step boundary, where every rank agrees to
    checkpoint and stop, as on the requeue signal."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


# --- dead peers ---------------------------------------------------------------------------------------------------
# torch.distributed is imported where it is used: the CLI installs the signal handler before anything else,
# and `minidisc --help` should not wait for torch.
def _store(timeout_s: float):
    import torch.distributed as torch_dist

    return torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=timedelta(seconds=timeout_s))


def start_heartbeat(rank: int) -> None:
    """Count up `minidisc/alive/RANK` in the rendezvous store every HEARTBEAT_S seconds, in a thread that
    stops at exit (before the interpreter tears down the store it holds)."""
    stop = threading.Event()

    def beat():
        try:
            store = _store(60)
            while not stop.is_set():
                store.add(f"minidisc/alive/{rank}", 1)
                stop.wait(HEARTBEAT_S)
        except Exception:  # the store's host (rank 0) is gone: nothing left to tell
            return

    thread = threading.Thread(target=beat, name="minidisc-heartbeat", daemon=True)
    thread.start()

    def halt():
        stop.set()
        thread.join(timeout=5)

    atexit.register(halt)


def silent_ranks(world_size: int) -> list[int] | None:
    """Ranks whose heartbeat did not move over three beats; None when the store itself is unreachable, which
    means rank 0 (its host) is gone."""
    try:
        store = _store(5)
        before = [store.add(f"minidisc/alive/{r}", 0) for r in range(world_size)]
        time.sleep(3 * HEARTBEAT_S)
        after = [store.add(f"minidisc/alive/{r}", 0) for r in range(world_size)]
    except Exception:
        return None
    return [r for r in range(world_size) if after[r] == before[r]]


def is_comm_failure(error: BaseException) -> bool:
    """A collective failed because a peer went away (gloo/NCCL errors surface as these)."""
    import torch.distributed as torch_dist

    if isinstance(error, getattr(torch_dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        key in text for key in ("gloo", "Gloo", "NCCL", "Connection reset by peer", "Connection closed by peer",
                                "Socket Timeout", "timed out"))


def peer_lost(error: BaseException, rank: int, world_size: int) -> PeerLost:
    """Turn a failed collective into a message that names the rank(s) that died."""
    silent = silent_ranks(world_size)
    if silent is None:
        who = "rank 0 (it hosted the rendezvous store at MASTER_ADDR) is gone"
    elif silent:
        who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped responding"
    else:
        who = (f"every rank is alive, but a collective failed or waited longer than {COMM_TIMEOUT_S:g} s "
               "(MINIDISC_COMM_TIMEOUT)")
    text = str(error).strip()
    # "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:32157. This is typically ..."
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).split(". ")[0][:160] if text else type(error).__name__
    return PeerLost(f"rank {rank} of {world_size}: {who} ({detail}); see that rank's log for why. "
                    "The job stops here; the last evaluation's checkpoint is kept, so run again with --resume")


def is_disk_full(error: BaseException) -> bool:
    """A write failed for want of space, anywhere in the exception's chain (torch and safetensors re-raise the
    OSError as their own errors, keeping only its text)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(key in str(error) for key in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False


LOW_SPACE = 16 * 2**20  # bytes: less than this free after a failed write means the write ran out of space


def raise_if_disk_full(error: BaseException, directory: Path, what: str) -> None:
    """Re-raise a failed write of `what` in `directory` as ENOSPC when it ran out of space. torch's writer drops
    the errno ("iostream error"), so a nearly full file system after the failure is the evidence."""
    free = shutil.disk_usage(directory).free if Path(directory).exists() else LOW_SPACE
    if is_disk_full(error) or free < LOW_SPACE:
        raise OSError(errno.ENOSPC, f"writing {what} in {directory} failed with {free / 2**20:.1f} MiB free") \
            from error


def disk_full_message(error: BaseException) -> str:
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return (f"no space left on device ({detail}). Completed checkpoints and outputs are kept (each is written "
            "whole or not at all): free space and run the same command again with --resume")


# --- stale build locks ----------------------------------------------------------------------------------------------
BUILD_LOCK_S = 1800  # longer than any torch/DeepSpeed extension build takes (cpu_adam: about a minute)


def check_build_locks() -> None:
    """A torch/DeepSpeed JIT extension build (cpu_adam, ...) holds BUILD_DIR/lock while it compiles; a build that
    was killed leaves it, and every later build of that extension waits for it forever. Refuse with one line when a
    lock in this interpreter's build folder is older than any build takes and no process on this machine works in
    its folder. Other interpreters' and torch builds' folders are theirs: this run never waits on them. Newer torch
    (2.15) holds an OS-level lock on the file instead, which the kernel drops with a killed builder: a lock file is
    then harmless, and nothing is checked."""
    if not _lock_file_blocks():
        return
    old = [lock for lock in _build_folder().glob("*/lock") if time.time() - lock.stat().st_mtime > BUILD_LOCK_S]
    stale = [lock for lock in old if not _in_use(lock.parent)]
    if stale:
        minutes = (time.time() - min(lock.stat().st_mtime for lock in stale)) / 60
        raise UserError(f"a killed extension build left {' and '.join(map(str, stale))} (up to {minutes:.0f} min old, "
                        "no process here is building): every later build would wait for it forever; delete it "
                        f"(rm {' '.join(map(str, stale))}) and run again")


def _lock_file_blocks() -> bool:
    """Whether torch's extension builds wait while a `lock` file merely exists (its FileBaton), as up to 2.14 did."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton")


def _build_folder() -> Path:
    """Where torch builds this interpreter's extensions: TORCH_EXTENSIONS_DIR itself, or a folder per Python and
    torch build (py311_cpu, py311_cu124, ...) under the default root (torch.utils.cpp_extension._get_build_directory,
    private, so its rule is restated here)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR") is not None:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                   f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def _in_use(folder: Path) -> bool:
    """Whether a process we can see works in `folder` (a compiler or ninja runs there while it builds)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if cwd == folder or folder in cwd.parents:
            return True
    return False


# --- fault injection (tests) --------------------------------------------------------------------------------------
KILL_AT = "MINIDISC_KILL_AT"  # "POINT" or "POINT@N": SIGKILL this process the N-th (default 1st) time it reaches POINT
KILL_WITH = "MINIDISC_KILL_WITH"  # other signals to send there instead, e.g. "TERM" or "TERM,TERM"
_reached: dict[str, int] = {}


def kill_point(point: str) -> None:
    """A named moment of a run (`write:ta`, `sandwich:step`, `report:cards`, ...) where the fault-injection tests
    kill the process as a node failure or `scancel -s KILL` would. A no-op unless MINIDISC_KILL_AT names it."""
    wanted = os.environ.get(KILL_AT)
    if not wanted:
        return
    name, _, nth = wanted.partition("@")
    if name == point:
        _reached[point] = _reached.get(point, 0) + 1
        if _reached[point] == int(nth or 1):
            for signame in os.environ.get(KILL_WITH, "KILL").split(","):
                os.kill(os.getpid(), signal.Signals[f"SIG{signame}"])
