"""What a run records about where its outputs came from, in a form that can be shared: the software and hardware
it ran on, and its report with every path of the user's machine replaced by a name (`engine.core.hub.public_name`) or
by a path relative to --out."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from engine.core.hub import hub_id_of, public_name

PACKAGES = ("minidisc", "torch", "transformers", "deepspeed", "datasets", "accelerate", "bitsandbytes", "triton",
            "lm_eval")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def git_commit(source=Path(__file__).resolve().parents[1]) -> str | None:
    """The engine's source commit (`+dirty` with uncommitted changes) when it runs from its own git checkout (not
    from an installed copy that happens to sit inside another repository, such as a venv in a project)."""
    try:
        top = subprocess.run(["git", "-C", str(source), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        ours = not top.returncode and Path(top.stdout.strip()).resolve() == source and \
            (source / "pyproject.toml").is_file()  # a checkout of this project, not site-packages
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10) if ours else None
        if head is None or head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):  # no git
        return None


def environment(world_size: int) -> dict:
    """Versions, device and commit of this run (report.json's `environment`)."""
    import torch

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "packages": {p: v for p in PACKAGES if (v := _version(p))},
            "cuda": torch.version.cuda if cuda else None,
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
            "processes": world_size, "git_commit": git_commit()}


def shareable(value, out: Path, skip: tuple[str, ...] = ("samples",)):
    """`value` (a report) with its paths replaced: what is inside `out` by its path relative to `out`, other
    absolute paths by their public name. Strings under `skip` (generated text) are left alone."""
    out = Path(out).resolve()
    if isinstance(value, dict):
        return {k: v if k in skip else shareable(v, out, skip) for k, v in value.items()}
    if isinstance(value, list):
        return [shareable(v, out, skip) for v in value]
    if isinstance(value, str) and "\n" not in value and (os.path.isabs(value) or _inside(value, out)):
        path = Path(value).resolve()
        return str(path.relative_to(out)) if path.is_relative_to(out) else public_name(path)
    return value  # a relative path the user gave (their own naming), or not a path


def _inside(value: str, out: Path) -> bool:
    """A relative path (from the working directory) of something the run wrote under `out`."""
    try:
        return Path(value).exists() and Path(value).resolve().is_relative_to(out)
    except (OSError, ValueError):  # not a path: too long, or a NUL in it
        return False


def model_source(folder) -> dict:
    """Where a teacher came from, for the cards of what is made of it: its public name, Hub id and its card's
    license. A pruned teacher (`minidisc prune` output) carries its original's in pruning.json."""
    import json

    from huggingface_hub import metadata_load

    folder = Path(folder)
    if (folder / "pruning.json").is_file():
        recorded = json.loads((folder / "pruning.json").read_text()).get("source")
        if recorded:
            return recorded
    card = metadata_load(folder / "README.md") if (folder / "README.md").is_file() else None
    license = {k: card[k] for k in ("license", "license_name", "license_link") if card and card.get(k)}
    return {"name": public_name(folder), "hub_id": hub_id_of(folder), **license}
