"""Token files: a source tokenised once, with `datasets` (batched, in --data-workers processes), into an array on
disk, reused by --resume and by every later run on the same files, field and tokenizer.

A token file is a folder TOKEN_CACHE/NAME-KEY/ holding
  tokens.bin    the documents' tokens one after another: uint16 when the vocabulary fits, else uint32
  offsets.bin   int64 [documents + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
  mask.bin      chat sources only, uint8 per token: 1 where the token is the assistant's
  hashes.bin    uint64 per document: a hash of its normalised text (`engine.data.overlap.record_hash`), which finds
                training documents that duplicate a held-out one
  meta.json     what it was made from, and how many records were split
It is built aside and renamed into place, so it is complete or absent. The documents come in the source's fixed
hold-out order (`holdout_order`): held-out dev and test are its first documents, training a contiguous rest.
A text record is one document, or, when longer than DOCUMENT_TOKENS, consecutive documents of that many tokens
(the last shorter): a book, or a corpus written as one line, can then be held out by token ranges. Training packs
consecutive documents, so its blocks are those of the unsplit text.
KEY hashes the files (path, size, modification time), the field and the tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np

from engine.core import faults
from engine.core.outputs import cache_dir, remove_stale
from engine.data.chat import chat_tokens, check_chat_template
from engine.data.overlap import record_hash
from engine.data.sources import holdout_order, load_records, resolve

log = logging.getLogger(__name__)
VERSION = 3  # 2: hashes.bin; 3: long text records split into documents
DOCUMENT_TOKENS = 8192  # the longest document a text record becomes (chat records are never split)
SMALL = 10_000  # records: below this, one process tokenises faster than starting workers
PROGRESS_RECORDS = 100_000  # records per part at least (a part starts its workers anew) ...
PROGRESS_PARTS = 20  # ... and at most this many parts, so a large source logs its progress ~20 times
PROGRESS_S = 10  # seconds at least between two progress lines


class FileArray:
    """A 1-D array in a file, read with pread. Not memory-mapped: reading a mapping at random places also maps in the
    pages around each read (the kernel's fault-around, even under MADV_RANDOM), so a rank's resident memory grew
    towards the whole token file (bench_data.py); this way a process holds only what it read."""

    def __init__(self, path, dtype: str):
        self.fd, self.dtype = os.open(path, os.O_RDONLY), np.dtype(dtype)
        self.size = os.fstat(self.fd).st_size // self.dtype.itemsize

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        if not isinstance(key, slice):
            index = int(key) + (self.size if int(key) < 0 else 0)
            return self[index: index + 1][0]
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise IndexError("FileArray reads contiguous slices only")
        width = self.dtype.itemsize
        return np.frombuffer(os.pread(self.fd, max(stop - start, 0) * width, start * width), self.dtype)

    def __del__(self):
        os.close(self.fd)


class TokenFile:
    """A token file opened read-only; reading a block reads that block only (`FileArray`)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.offsets = FileArray(self.folder / "offsets.bin", "int64")
        self.tokens = FileArray(self.folder / "tokens.bin", self.meta["dtype"])
        self.mask = FileArray(self.folder / "mask.bin", "uint8") if self.chat else None
        self.hashes = FileArray(self.folder / "hashes.bin", "uint64")

    @property
    def chat(self) -> bool:
        return self.meta["chat"]

    @property
    def key(self) -> str:
        return self.folder.name

    def __len__(self) -> int:
        return len(self.offsets) - 1


def token_cache(configured: str | None = None) -> Path:
    """--token-cache, else MINIDISC_CACHE/tokens (default ~/.cache/minidisc/tokens)."""
    return Path(configured) if configured else cache_dir() / "tokens"


def token_file(path: str, text_field: str, tokenizer, root: Path, workers: int = 0) -> TokenFile:
    """The token file of a source, built on first use (by one process: callers hold `dist.main_first`)."""
    folder = Path(root) / token_key(path, text_field, tokenizer)
    if not (folder / "meta.json").is_file():
        _build(folder, path, text_field, tokenizer, workers)
    return TokenFile(folder)


def token_key(path: str, text_field: str, tokenizer) -> str:
    """NAME-KEY of a source's token file: readable, and a hash of what its tokens depend on."""
    from datasets.fingerprint import Hasher

    _, files = resolve(path)
    if Path(files[0]).is_dir():  # a save_to_disk folder
        files = sorted(str(f) for f in Path(files[0]).rglob("*") if f.is_file())
    stats = [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    what = {"version": VERSION, "files": stats, "field": text_field, "tokenizer": Hasher.hash(tokenizer)}
    digest = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path.split("*")[0].rstrip("/") or "data").name)[:48] or "data"
    return f"{name}-{digest}"


def _build(folder: Path, path: str, text_field: str, tokenizer, workers: int) -> None:
    records, field, chat = load_records(path, text_field)
    if chat:
        check_chat_template(tokenizer, f"data {path}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(folder)
    processes = workers or (min(os.cpu_count() or 1, 8) if len(records) >= SMALL else 1)
    if processes > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # each worker is one tokeniser
    log.info("tokenising %s (%d records, %s, %d process%s) into %s", path, len(records), "chat" if chat else "text",
             processes, "es" if processes > 1 else "", folder)
    started = time.perf_counter()
    records = records.select(holdout_order(len(records)))
    mapped_dir = folder.parent / f".{folder.name}.map"  # datasets' cache of the map: a killed build resumes from it
    mapped = _tokenise(records, partial(_encode_chat if chat else _encode_text, tokenizer, field), chat, processes,
                       mapped_dir, path)
    scratch = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    scratch.mkdir()
    try:
        dtype = "uint16" if len(tokenizer) <= 2 ** 16 else "uint32"
        n_tokens, split = _write(mapped, scratch, dtype, chat)
        meta = {"version": VERSION, "source": os.path.abspath(path), "field": field, "chat": chat, "dtype": dtype,
                "records": len(records), "records_split": split, "documents": len(mapped), "tokens": n_tokens,
                "tokenizer": tokenizer.name_or_path, "seconds": round(time.perf_counter() - started, 1)}
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        del mapped
        faults.kill_point("data:token-file")
        try:
            scratch.rename(folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # else another run built the same file first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(mapped_dir, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info("tokenised %s: %s tokens in %d records, %.0f s (%.0f tokens/s)", path, f"{n_tokens:,}", len(records),
             seconds, n_tokens / max(seconds, 1e-9))
    if split:
        log.info("%s: %d record(s) longer than %d tokens split into documents of that length (held-out splits and "
                 "deduplication work on documents)", path, split, DOCUMENT_TOKENS)


def _tokenise(records, encode, chat: bool, processes: int, cache: Path, path: str):
    """`records` mapped through `encode` in consecutive parts (each its own cached map, so a killed build keeps the
    parts it finished), with a progress line after a part when PROGRESS_S have passed, and after the last."""
    import datasets

    total, parts, tokens = len(records), [], 0
    step = max(PROGRESS_RECORDS, -(-total // PROGRESS_PARTS))
    started = last = time.perf_counter()
    for first in range(0, max(total, 1), step):
        part = records.select(range(first, min(first + step, total)))
        parts.append(part.map(encode, batched=True, num_proc=processes if len(part) >= SMALL else 1,
                              remove_columns=records.column_names, features=_features(chat),
                              cache_file_name=str(cache / f"tokens-{first:012d}.arrow")))
        tokens += _token_count(parts[-1])
        done, now = first + len(part), time.perf_counter()
        if step < total and (now - last >= PROGRESS_S or done == total):
            last, rate = now, tokens / max(now - started, 1e-9)
            log.info("tokenising %s: %s of %s records (%.0f%%), %s tokens, %s tokens/s, ETA %s", path, f"{done:,}",
                     f"{total:,}", 100 * done / total, f"{tokens:,}", f"{rate:,.0f}",
                     _duration((now - started) * (total - done) / done))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _token_count(mapped) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(mapped.data.column("input_ids"))).as_py() or 0)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _write(mapped, folder: Path, dtype: str, chat: bool) -> tuple[int, int]:
    """Stream the map's arrow output into tokens.bin (and mask.bin), chunk by chunk; returns the token count and
    the number of records split into several documents."""
    import pyarrow.compute as pc

    lengths, split = [], 0
    with open(folder / "tokens.bin", "wb") as tokens, open(folder / "hashes.bin", "wb") as hashes, \
            (open(folder / "mask.bin", "wb") if chat else nullcontext()) as mask:
        for table in mapped.with_format("arrow").iter(batch_size=10_000):
            ids = table.column("input_ids")
            lengths.append(pc.list_value_length(ids).to_numpy(zero_copy_only=False))
            tokens.write(pc.list_flatten(ids).to_numpy().astype(dtype).tobytes())
            hashes.write(table.column("hash").to_numpy().astype("uint64").tobytes())
            split += int((table.column("piece").to_numpy() == 1).sum())  # a split record's second document
            if chat:
                mask.write(pc.list_flatten(table.column("mask")).to_numpy().astype("uint8").tobytes())
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths), dtype=np.int64)]) if lengths else np.zeros(1)
    offsets.astype(np.int64).tofile(folder / "offsets.bin")
    return int(offsets[-1]), split


def _features(chat: bool):
    import datasets

    columns = {"input_ids": datasets.Sequence(datasets.Value("int32")), "hash": datasets.Value("uint64"),
               "piece": datasets.Value("int32")}
    return datasets.Features({**columns, "mask": datasets.Sequence(datasets.Value("int8"))} if chat else columns)


def _encode_text(tokenizer, field: str, batch: dict) -> dict:
    """Each record's tokens, as one document or, past DOCUMENT_TOKENS, several (`piece` 0, 1, ...)."""
    texts = [t if t and t.strip() else "" for t in batch[field]]
    out = {"input_ids": [], "hash": [], "piece": []}
    for text, ids in zip(texts, tokenizer(texts)["input_ids"]):
        ids, whole = ids if text else [], record_hash(text)
        for piece in range(max(1, -(-len(ids) // DOCUMENT_TOKENS))):
            out["input_ids"].append(ids[piece * DOCUMENT_TOKENS: (piece + 1) * DOCUMENT_TOKENS])
            out["hash"].append(piece_hash(whole, piece))
            out["piece"].append(piece)
    return out


def piece_hash(whole: int, piece: int) -> int:
    """The hash of a record's `piece`-th document: the record's own for the first, so an unsplit record keeps it;
    the same piece of two equal records hashes the same, pieces of one record differ."""
    return whole if piece == 0 or whole == 0 else (whole + piece * 0x9E3779B97F4A7C15) % (1 << 63) or 1


def _encode_chat(tokenizer, field: str, batch: dict) -> dict:
    pairs = [chat_tokens(tokenizer, messages) if messages else ([], []) for messages in batch[field]]
    return {"input_ids": [ids for ids, _ in pairs], "mask": [mask for _, mask in pairs],
            "hash": [record_hash(messages) for messages in batch[field]], "piece": [0] * len(pairs)}
