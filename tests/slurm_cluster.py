"""A real one-node Slurm cluster on this machine (Debian's slurmctld, slurmd, munge), for the launch tests.

The controller and the node daemon run as root with their own slurm.conf, state and ports under a temporary
folder; clients find them through SLURM_CONF. Jobs run on this machine's CPUs.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [d for d in DAEMONS if not (shutil.which(d) or Path(f"/usr/sbin/{d}").exists())]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


def _run(*command, check=True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, check=check, **kwargs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._started_munge = False

    # --- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        self._start_munge()
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        _run("slurmctld", "-f", self.conf, env=self.env)
        _run("slurmd", "-f", self.conf, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = _run("sinfo", "-h", "-o", "%t", check=False, env=self.env).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node never became idle (sinfo: {state!r}); see {self.root / 'log'}")

    def stop(self) -> None:
        for pidfile in ("slurmd.pid", "slurmctld.pid"):
            path = self.root / pidfile
            if path.is_file():
                try:
                    os.kill(int(path.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
        if self._started_munge:
            _run("pkill", "-x", "munged", check=False)

    def _start_munge(self) -> None:
        if _run("munge", "-n", check=False).returncode == 0:
            return  # already running
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not Path("/etc/munge/munge.key").is_file():
            _run("runuser", "-u", "munge", "--", "mungekey", "--create")
        _run("runuser", "-u", "munge", "--", "munged")
        self._started_munge = True

    def _config(self) -> str:
        node = _run("slurmd", "-C").stdout.splitlines()[0]  # NodeName=<host> CPUs=... RealMemory=...
        fields = dict(item.split("=", 1) for item in node.split())
        memory = int(int(fields.pop("RealMemory")) * 0.8)
        described = " ".join(f"{k}={v}" for k, v in fields.items())
        root = self.root
        return f"""ClusterName=minidisc-test
SlurmctldHost={fields['NodeName']}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
{described} NodeAddr=127.0.0.1 RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    # --- jobs --------------------------------------------------------------------------------------------------
    def sbatch(self, script, *options, env=None) -> int:
        env = {**(env or os.environ), "SLURM_CONF": str(self.conf)}
        result = _run("sbatch", "--parsable", *options, script, env=env, check=False)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = _run("scontrol", "show", "job", "-o", job_id, env=self.env).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: int, timeout: float = 600, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if job["JobState"] in until:
                return job
            time.sleep(0.5)
        _run("scancel", job_id, check=False, env=self.env)
        raise TimeoutError(f"job {job_id} still {job['JobState']} after {timeout} s")

    def scancel(self, job_id: int, *options) -> None:
        _run("scancel", *options, job_id, env=self.env)

    def release_requeued(self, job_id: int) -> None:
        """A requeued job waits about two minutes before it is eligible again; start it as soon as the node has
        cleaned up the first run (a credential issued in the second its old one was revoked is refused)."""
        deadline = time.time() + 60
        while _run("sinfo", "-h", "-o", "%t", check=False, env=self.env).stdout.strip() != "idle":
            assert time.time() < deadline, "the node never became idle after the requeue"
            time.sleep(0.5)
        time.sleep(2)
        _run("scontrol", "update", f"JobId={job_id}", "StartTime=now", env=self.env)
