"""Names that travel. Models and data sets named by Hugging Face Hub id resolve to folders of the local Hub cache
(downloaded first when the Hub is reachable, as `transformers` and `datasets` do), and what a run publishes names
its inputs by Hub id or file name, never by a path of the user's machine.

    --teacher org/name[@revision]        a model snapshot: its folder is then used as any checkpoint folder
    --data org/dataset[:config][:split]  a data set snapshot: the data files `datasets` assigns to that config (which
                                         must be named when there are several) and split (default "train") are then
                                         read as local files
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from engine.core.errors import UserError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a model needs from its snapshot (the weights, in safetensors where the repository has them, else .bin):
# repositories also hold originals, other frameworks' weights and GGUF copies, often as large as the model.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]
DATA_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".parquet", ".csv", ".gz")


def is_hub_id(name) -> bool:
    """`org/name` (a model's `@revision`, a data set's `:config:split` stripped) that is not an existing path."""
    text = str(name)
    return (not Path(text).exists() and not text.lower().endswith(DATA_SUFFIXES)
            and _HUB_ID.fullmatch(re.split(r"[@:]", text, maxsplit=1)[0]) is not None)


def hub_id_of(path) -> str | None:
    """The Hub id of a Hub id, or of a path inside a Hub cache snapshot (`.../models--org--name/snapshots/REV/`);
    None for anything else."""
    if is_hub_id(path):
        return re.split(r"[@:]", str(path), maxsplit=1)[0]
    for part in reversed(Path(str(path)).parts):
        match = re.fullmatch(r"(?:models|datasets)--(.+)", part)
        if match:
            return match.group(1).replace("--", "/")  # the cache's spelling of org/name (ids cannot hold "--")
    return None


def public_name(path) -> str:
    """How an input is named in what a run publishes: a Hub id as given (with its revision or config and split),
    the Hub id of a cache snapshot, else its file or folder name."""
    return str(path) if is_hub_id(path) else hub_id_of(path) or Path(str(path)).resolve().name or str(path)


def _download_hint(repo_id: str, repo_type: str, revision: str | None) -> str:
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    return f"hf download {repo_id}{kind}" + (f" --revision {revision}" if revision else "")


def snapshot(repo_id: str, repo_type: str, revision: str | None = None, patterns: list[str] | None = None,
             complete: Callable[[Path], bool] = lambda folder: True) -> Path:
    """The snapshot folder of a Hub repository: from the cache when `complete` says it holds what is needed, else
    downloaded (`patterns` of its files; unless the Hub is offline), else a one-line error naming the command
    that downloads it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    what = "dataset" if repo_type == "dataset" else "model"
    hint = _download_hint(repo_id, repo_type, revision)
    try:
        cached = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True))
        if complete(cached):
            return cached
        missing = f"{what} {repo_id} is in the Hugging Face cache without the files a run needs"
    except LocalEntryNotFoundError:
        missing = f"{what} {repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{missing} and the Hub is offline (HF_HUB_OFFLINE): download it where the Hub is reachable "
                        f"with `{hint}`")
    try:
        folder = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns))
    except Exception as error:  # no network, no such repository or revision, gated, disk full
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise UserError(f"{missing}, and downloading it failed ({reason}); download it with `{hint}` (gated "
                        "models: `hf auth login` first), or give a local path") from None
    if not complete(folder):
        raise UserError(f"{what} {repo_id} was downloaded but lacks the files a run needs: check the repository")
    return folder


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(any(folder.glob(f"*.{kind}")) for kind in ("safetensors", "bin"))


def model_folder(name: str, weights: bool = True) -> str:
    """A checkpoint folder for --teacher and other model arguments: the path as given, or a Hub id's snapshot
    (with its weights, or only its config.json when `weights` is False)."""
    if not is_hub_id(name):
        return name
    repo_id, _, revision = str(name).partition("@")
    if not weights:
        return str(snapshot(repo_id, "model", revision or None, ["config.json"],
                            lambda folder: (folder / "config.json").is_file()))
    try:
        return str(snapshot(repo_id, "model", revision or None, MODEL_FILES, _has_weights))
    except UserError:  # an older repository with .bin weights only
        return str(snapshot(repo_id, "model", revision or None, MODEL_FILES + ["*.bin"], _has_weights))


def dataset_files(spec: str) -> list[str]:
    """The local data files of `org/dataset[:config][:split]`: the snapshot's files that `datasets` assigns to that
    config (its README's `configs`, else its folder layout) and split."""
    import datasets

    repo_id, config, split = (spec.split(":") + [None, None])[:3]
    folder = snapshot(repo_id, "dataset")
    try:
        builder = datasets.load_dataset_builder(str(folder), config or None)
    except ValueError:  # no config given where there are several, or an unknown one
        names = datasets.get_dataset_config_names(str(folder))
        problem = f"has no config '{config}'" if config else "has several configs"
        raise UserError(f"dataset {spec} {problem} ({', '.join(names)}): write {repo_id}:CONFIG or "
                        f"{repo_id}:CONFIG:SPLIT") from None
    splits = builder.config.data_files or {}
    split = split or "train"
    if split not in splits:
        raise UserError(f"dataset {spec} has no split '{split}' (it has {', '.join(splits) or 'none'}): write "
                        f"{repo_id}:{config or builder.config.name}:SPLIT")
    return sorted(str(f) for f in splits[split])
