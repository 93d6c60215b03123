"""Where text comes from: the sources of --data (files, globs, folders of shards, save_to_disk folders), with mixture
weights and their record field, read through `datasets`."""
from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.errors import UserError
from engine.core.hub import dataset_files, is_hub_id

HOLDOUT_SEED = 1234  # the documents' fixed order: held-out dev/test records are the same for every --seed
FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
CHAT_FIELD = "messages"  # used when the record field asked for is the default and absent (TRL's convention)


@dataclass(frozen=True)
class Source:
    """One entry of --data: a path (file, glob, folder of shards or save_to_disk folder), its share of the
    training blocks (weights are normalised over the sources) and the field holding its text or chat messages
    (None: --text-field)."""

    path: str
    weight: float = 1.0
    text_field: str | None = None


def parse_sources(spec) -> list[Source]:
    """--data as given: a path, or a list of paths, compact `PATH@WEIGHT` / `PATH@WEIGHT@FIELD` strings and (recipes)
    mappings {path, weight, text_field}."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    sources = [item if isinstance(item, Source) else _mapping(item) if isinstance(item, dict) else _compact(str(item))
               for item in items]
    if not sources:
        raise UserError("--data is empty: give a file, a folder, a glob or several of them")
    for source in sources:
        if not math.isfinite(source.weight) or source.weight <= 0:
            raise UserError(f"--data {source.path}: weight {source.weight:g} must be a positive number")
    return sources


def _mapping(item: dict) -> Source:
    unknown = set(item) - {"path", "weight", "text_field"}
    if unknown or "path" not in item:
        raise UserError(f"--data entry {item}: give the keys path (required), weight and text_field only")
    try:
        weight = float(item.get("weight", 1.0))
    except (TypeError, ValueError):
        raise UserError(f"--data {item['path']}: weight {item.get('weight')!r} is not a number") from None
    return Source(str(item["path"]), weight, item.get("text_field"))


def _compact(text: str) -> Source:
    if "@" not in text or Path(text).exists():
        return Source(text)
    head, _, tail = text.rpartition("@")
    if _number(tail):
        return Source(head, float(tail))
    path, _, weight = head.rpartition("@")
    if path and _number(weight):
        return Source(path, float(weight), tail)
    raise UserError(f"--data {text}: write PATH, PATH@WEIGHT or PATH@WEIGHT@FIELD (e.g. web/*.jsonl.gz@0.7)")


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def data_format(path) -> str | None:
    """The datasets builder of a data file by its extension (`.gz` is read through), None if unknown."""
    name = Path(path).name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return FORMATS.get(Path(name).suffix)


def resolve(path: str) -> tuple[str, list[str]]:
    """(builder, files) of a source path: one file, a glob's files, a folder's data files (recursively, sorted), or
    ("save_to_disk", [folder]), or a Hub data set's files (`engine.core.hub`). Checks without reading: they exist,
    are not empty, share one format."""
    if is_hub_id(path):
        files = dataset_files(path)
    elif any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"--data {path}: the pattern matches no file")
    elif Path(path).is_dir():
        if any((Path(path) / marker).is_file() for marker in DATASET_MARKERS):
            return "save_to_disk", [path]
        files = sorted(str(f) for f in Path(path).rglob("*") if f.is_file() and data_format(f)
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            raise UserError(f"{path} is a folder with neither data files ({', '.join(sorted(FORMATS))}, also .gz) "
                            "nor a dataset saved with save_to_disk")
    elif not Path(path).exists():
        raise UserError(f"data file {path} does not exist")
    else:
        files = [path]
    formats = {data_format(f) for f in files}
    if None in formats:
        bad = next(f for f in files if data_format(f) is None)
        raise UserError(f"data file {bad}: unsupported extension '{Path(bad).suffix}'; use one of {sorted(FORMATS)} "
                        "(optionally .gz)")
    if len(formats) > 1:
        raise UserError(f"--data {path} mixes formats ({', '.join(sorted(formats))}): give each as its own source")
    empty = next((f for f in files if Path(f).stat().st_size == 0), None)
    if empty:
        raise UserError(f"data file {empty} is empty")
    return formats.pop(), files


def load_records(path: str, text_field: str = "text"):
    """(records, field, is_chat) of a source: a `datasets.Dataset` and the field holding each record's text (a
    string) or conversation (a list of {role, content} messages)."""
    import datasets

    builder, files = resolve(path)
    if builder == "save_to_disk":
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError:
            raise UserError(f"{path} is a folder but not a dataset saved with save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{path} holds splits {list(ds)}; save the one to use as 'train'")
            ds = ds["train"]
    else:
        ds = _load_files(builder, files)
    if len(ds) == 0:
        raise UserError(f"data {path} has no records")
    field = text_field
    if field not in ds.column_names and field == "text" and CHAT_FIELD in ds.column_names:
        field = CHAT_FIELD
    if field not in ds.column_names:
        raise UserError(f"data {path} has no '{text_field}' field (it has {ds.column_names}); pass --text-field NAME "
                        "or PATH@WEIGHT@FIELD")
    return ds, field, _is_chat(ds, field, path)


def _load_files(builder: str, files: list[str]):
    import datasets

    options = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **options)
    except Exception as e:  # datasets wraps parser errors in many types, without naming the file
        culprit = _unreadable(builder, files, options) if len(files) > 1 else files[0]
        raise UserError(f"cannot read data file {culprit} as {builder}: {_cause(e)}") from None


def _unreadable(builder: str, files: list[str], options: dict) -> str:
    """The first file of a source that datasets cannot read alone (tried only after the whole source failed)."""
    import datasets

    for file in files[:100]:
        try:
            datasets.load_dataset(builder, data_files=[file], split="train", **options)
        except Exception:
            return file
    return f"among {files[0]} ... ({len(files)} files)"


def _cause(error: Exception) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _is_chat(ds, field: str, path: str) -> bool:
    first = next((value for value in ds.select(range(min(len(ds), 100)))[field] if value is not None), None)
    if not isinstance(first, list):
        return False
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in first):
        raise UserError(f"data {path}: field '{field}' holds lists, but not of {{role, content}} chat messages")
    return True


def holdout_order(n: int):
    """The fixed order of a source's records (HOLDOUT_SEED): held-out splits take its start, training the rest.
    A numpy array (`Dataset.select` takes it without a Python list of millions of ints)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED)).numpy()


def load_text_dataset(path, text_field: str = "text"):
    """The records of one plain-text source (--eval-text, `minidisc eval --text`, the built-in corpus)."""
    ds, field, chat = load_records(str(path), text_field)
    if chat:
        raise UserError(f"data {path}: field '{field}' holds chat messages; give plain text here")
    return ds
