"""One code path for 1 process and N processes: under the `deepspeed` launcher, torchrun or srun the rank
variables are set; run as a plain command we set them for a world of one. gloo on CPU, NCCL on GPU."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.core import faults
from engine.core.errors import UserError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Whether a launcher (deepspeed, torchrun, srun) started this process as one rank of a job."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def init() -> None:
    """Start the process group once (DeepSpeed's own initialisation, which reads the rank variables)."""
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:  # srun: one task per GPU
        _ranks_from_slurm()
    if "RANK" not in os.environ:  # a plain `minidisc ...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UserError(f"{name} is not set: the launcher (or your batch script) must export it on every "
                            "process, e.g. MASTER_ADDR=<first node's address> MASTER_PORT=29500")
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available():  # modulo: srun may bind a single GPU to each task
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    _skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, timeout=timedelta(seconds=faults.COMM_TIMEOUT_S))
    if world_size() > 1:
        faults.start_heartbeat(rank())
        if is_main():
            log.info("%d processes (%s per node), %s, rendezvous %s:%s", world_size(), os.environ["LOCAL_SIZE"],
                     dist.get_backend(), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])


def _ranks_from_slurm() -> None:
    """Rank variables of a task started by srun. MASTER_ADDR defaults to the step's first node and
    MASTER_PORT to one derived from the job id, so a bare `srun minidisc ...` works too."""
    env = os.environ
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    # Tasks per node (LOCAL_SIZE, read by DeepSpeed); srun writes "2(x3)" for 2 tasks on each of 3 nodes.
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE", "")
    if per_node and "LOCAL_SIZE" not in env:
        env["LOCAL_SIZE"] = per_node.split("(")[0].split(",")[0]
    if "MASTER_ADDR" not in env and env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST")):
        nodes = subprocess.run(["scontrol", "show", "hostnames", env.get("SLURM_STEP_NODELIST",
                                                                         env.get("SLURM_JOB_NODELIST"))],
                               capture_output=True, text=True).stdout.split()
        if nodes:
            env["MASTER_ADDR"] = nodes[0]
    if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
        env["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op (about a minute on first use) used only
    by its inference all-reduce, which we never call; each process then leaves a ~70 MB /dev/shm file behind.
    Marking the op incompatible makes DeepSpeed skip it (collectives go through torch.distributed)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy on the collective's device; returned on the input's device)."""
    if not dist.is_initialized() or world_size() == 1:
        return tensor
    work = tensor.to(device())
    dist.all_reduce(work)
    return work.to(tensor.device)


def from_main(tensor: torch.Tensor | None) -> torch.Tensor:
    """Rank 0's tensor on every rank (the others pass None): what one rank computed, such as tokenised data."""
    if not dist.is_initialized() or world_size() == 1:
        return tensor
    shape = [tuple(tensor.shape) if is_main() else None, tensor.dtype if is_main() else None]
    dist.broadcast_object_list(shape, src=0)
    work = tensor.to(device()) if is_main() else torch.empty(shape[0], dtype=shape[1], device=device())
    dist.broadcast(work, src=0)
    return work.cpu()


def any_rank(flag: bool) -> bool:
    return bool(all_sum(torch.tensor([float(flag)])).item())


@contextmanager
def main_first(what: str):
    """Rank 0 runs the block (writing files the others read); the others wait. An error on rank 0 is raised on
    every rank, so no process hangs in a collective waiting for one that gave up."""
    error = None
    if is_main():
        try:
            yield True
        except UserError as e:
            error = str(e)
        except faults.Preempted:  # SIGTERM: every rank got one and stops on its own
            raise
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            if world_size() == 1:
                raise
    else:
        yield False
    if world_size() > 1:
        message = [error]
        dist.broadcast_object_list(message, src=0)
        error = message[0]
    if error is not None:
        raise UserError(error if is_main() else f"rank 0 failed while {what}: {error}")
