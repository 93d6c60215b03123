"""This process's memory around a stage: the CUDA allocator's bytes on a GPU, the resident set (Linux /proc) on a
CPU. A stage records where it started, its peak and what it left behind (`StageResult.memory`), so growth from
stage to stage shows in the report."""
from __future__ import annotations

import ctypes
import gc
import warnings
from pathlib import Path

import torch

from engine.core import distributed as dist

MB = 2**20
_STATUS = Path("/proc/self/status")


def give_back() -> None:
    """Collect what the caller has just dropped (reference cycles included: DeepSpeed binds methods on parameters)
    and hand the GPU allocator's cached blocks back, so the next model starts where this one did."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory() -> None:
    """Serve CPU allocations of 1 MiB and more by mmap, so that freeing them gives the pages back at once.

    glibc raises its mmap threshold to the size of each freed mapping (up to 32 MiB); from then on tensors below it
    come from heaps that fragment and are never returned. Loading, gathering and the optimiser step allocate and free
    many such tensors: a 6-layer, 151k-vocabulary model's sandwich kept 1.7 of its 8.1 GB resident holding nothing
    (a fixed threshold disables the raising). Only glibc has the call; elsewhere nothing changes."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 2**20)
    except (OSError, AttributeError):
        pass


def _cuda(device=None) -> bool:
    return (dist.device() if device is None else torch.device(device)).type == "cuda"


def status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, RssAnon, RssFile, ...), None where unreadable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak(device=None) -> None:
    """Start a new peak: the allocator's statistics, or the kernel's high-water mark of the resident set (of
    `device`, by default this rank's)."""
    if _cuda(device):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current resident set
    except OSError:
        pass  # not Linux or not allowed: the peak is then the process's


def usage(device=None) -> dict:
    """{"kind", "live_mb", "peak_mb"}: allocated bytes on the GPU, the resident set on a CPU (None if unreadable)."""
    if _cuda(device):
        return {"kind": "cuda allocated", "live_mb": round(torch.cuda.memory_allocated() / MB, 1),
                "peak_mb": round(torch.cuda.max_memory_allocated() / MB, 1)}
    live, peak = status_kb("VmRSS"), status_kb("VmHWM")
    return {"kind": "cpu resident", "live_mb": None if live is None else round(live / 1024, 1),
            "peak_mb": None if peak is None else round(peak / 1024, 1)}


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python still reaches (after a collection), counted once each: what a stage
    leaves behind, independent of how the allocator or the C library keep freed memory."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on deprecated aliases (torch.distributed.reduce_op) warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not obj.is_meta]
    for tensor in tensors:
        try:
            storage = tensor.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # subclasses without one storage (fake, functional tensors)
            continue
    return sum(storages.values())


class StageMemory:
    """`start()` before a stage's engines are built, `to_json()` after they are released: this process's memory
    at both ends and its peak, and the tensors left alive (`left_mb`: 0 when the stage freed all it made)."""

    def start(self) -> None:
        self.tensors = live_tensor_bytes()
        reset_peak()
        self.start_mb = usage()["live_mb"]

    def to_json(self) -> dict:
        now = usage()
        return {"kind": now["kind"], "start_mb": self.start_mb, "peak_mb": now["peak_mb"], "end_mb": now["live_mb"],
                "left_mb": round((live_tensor_bytes() - self.tensors) / MB, 1)}
