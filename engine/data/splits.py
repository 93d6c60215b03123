"""A run's data: the training stream, dev and test, read from token files and described in OUT/work/data.json.

Rank 0 tokenises each source once (`token_file`) and writes the description: which documents of which token file
each split takes. Every rank then reads only the blocks of its own batches from the token files.
Dev and test come from their own files, or are the first documents of each --data source in its fixed hold-out
order, at most a tenth of its documents each, in proportion to the weights; they do not move with --seed or
--max-steps. Training takes the rest, less every document whose normalised text equals a dev or test record's.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from engine.core.errors import UserError
from engine.data.blocks import Blocks, Mixture, Split, token_blocks
from engine.data.chat import check_chat_template
from engine.data.sources import Source, holdout_order, load_records
from engine.data.tokens import TokenFile, token_file

log = logging.getLogger(__name__)
HOLDOUT_SHARE = 10  # a held-out split takes at most 1/10 of a source's documents


def shares(n: int, weights: list[float]) -> list[int]:
    """n split by the weights into integers (largest remainders)."""
    exact = [n * w / sum(weights) for w in weights]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
        counts[i] += 1
    return counts


def describe(sources: list[Source], splits: dict, text_field: str, tokenizer, seq_len: int, root: Path,
             workers: int = 0) -> dict:
    """Tokenise what is not yet (on one process) and say which documents each split takes. `splits` maps "dev" and
    "test" to (a file of their own or None, blocks wanted)."""
    files = [token_file(s.path, s.text_field or text_field, tokenizer, root, workers) for s in sources]
    opened = {f.key: f for f in files}
    weights = [s.weight for s in sources]
    cursors = [0] * len(files)
    described = {"seq_len": seq_len, "sources": [_source(s, f) for s, f in zip(sources, files)]}
    held = [name for name, (path, _) in splits.items() if not path]
    for name, (path, wanted) in splits.items():
        if path:
            own = token_file(path, text_field, tokenizer, root, workers)
            opened[own.key] = own
            blocks = min(wanted, len(Blocks(own, 0, len(own), seq_len)))
            described[name] = [{"key": own.key, "first": 0, "end": len(own), "blocks": blocks}]
        else:
            described[name] = [_hold_out(f, cursors, i, need, seq_len, len(held))
                               for i, (f, need) in enumerate(zip(files, shares(wanted, weights)))]
        _check_split(name, described[name], wanted, seq_len)
    described["train"] = [{"key": f.key, "first": cursors[i], "end": len(f), "weight": w}
                          for i, (f, w) in enumerate(zip(files, weights))]
    _drop_duplicates(described, opened, {name: path for name, (path, _) in splits.items()})
    for part, file, source in zip(described["train"], files, sources):
        if not len(Blocks(file, part["first"], part["end"], seq_len, part.get("drop", ()))):
            emptied = " and dropping its duplicates of held-out records" if part.get("drop") else ""
            raise UserError(f"--data {source.path}: no training block of --seq-len {seq_len} tokens is left after "
                            f"holding out dev and test{emptied}; give more text, --dev-data/--test-data or a "
                            "smaller --seq-len")
    return described


def _drop_duplicates(described: dict, opened: dict[str, TokenFile], own: dict) -> None:
    """Training documents whose normalised text (or conversation) equals a dev or test record's are left out of
    training (`drop` in each training part, counted in `duplicates`): a held-out record the model trained on
    measures memory, not generalisation. A held-out split whose every record occurs in training is refused: such
    data holds out nothing. `opened`: every token file by key; `own`: each split's own file (None: held out)."""
    def hashes(part):
        return opened[part["key"]].hashes[part["first"]: part["end"]]

    training = [hashes(part) for part in described["train"]]
    seen = np.concatenate(training)
    held = {}
    for name in ("dev", "test"):
        held[name] = np.concatenate([hashes(part) for part in described[name]])
        held[name] = held[name][held[name] != 0]
        if len(held[name]) and np.isin(held[name], seen).all():
            where = f"--{name}-data {own[name]}" if own[name] else f"the {name} records held out of --data"
            raise UserError(f"{where}: all {len(held[name])} of its records also occur in the training text of "
                            "--data; held-out text must be text the model does not train on: give other dev/test "
                            "text, or remove the repeated records from --data")
    every = np.concatenate(list(held.values()))
    for part, train in zip(described["train"], training):
        duplicate = np.isin(train, every) & (train != 0)
        part["duplicates"] = int(duplicate.sum())
        if part["duplicates"]:
            part["drop"] = (np.flatnonzero(duplicate) + part["first"]).tolist()


def _source(source: Source, file: TokenFile) -> dict:
    return {"path": source.path, "weight": source.weight, "field": file.meta["field"], "chat": file.chat,
            "key": file.key, "records": file.meta["records"], "records_split": file.meta["records_split"],
            "documents": len(file), "tokens": int(file.offsets[-1]), "tokenise_s": file.meta["seconds"]}


def _hold_out(file: TokenFile, cursors: list[int], i: int, need: int, seq_len: int, splits: int) -> dict:
    """The next documents of source i yielding `need` blocks (capped at a tenth of its documents)."""
    first, total = cursors[i], len(file)
    if total <= splits:
        raise UserError(f"{file.meta['source']} has {total} record(s): too few to hold out dev and test at record "
                        "boundaries; give --dev-data and --test-data or more records")
    cap = min(first + max(1, total // HOLDOUT_SHARE), total - 1)
    offsets = file.offsets[first: cap + 1]
    end = first + need if file.chat else first + int(np.searchsorted(offsets, offsets[0] + need * seq_len))
    end = min(end, cap) if need else first
    cursors[i] = end
    return {"key": file.key, "first": first, "end": end, "blocks": min(need, len(Blocks(file, first, end, seq_len)))}


def _check_split(name: str, parts: list[dict], wanted: int, seq_len: int) -> None:
    got = sum(p["blocks"] for p in parts)
    if not got:
        raise UserError(f"the record(s) held out for {name} (at most 1/{HOLDOUT_SHARE} of --data) hold fewer than "
                        f"--seq-len {seq_len} tokens; give --{name}-data, more text or a smaller --seq-len")
    if got < wanted:
        log.info("%s: %d blocks, fewer than the %d asked for", name, got, wanted)


def open_data(described: dict, root: Path, seed: int):
    """(training Mixture, dev Split, test Split) of a description, token files opened read-only."""
    files: dict[str, TokenFile] = {}

    def blocks(part):
        if part["key"] not in files:
            if not (root / part["key"] / "meta.json").is_file():
                raise UserError(f"token file {root / part['key']} is missing: rank 0 builds it; put --token-cache on "
                                "a filesystem every node sees")
            files[part["key"]] = TokenFile(root / part["key"])
        return Blocks(files[part["key"]], part["first"], part["end"], described["seq_len"], part.get("drop", ()))

    train = Mixture([blocks(p) for p in described["train"]], [p["weight"] for p in described["train"]], seed)
    dev, test = (Split.of([(blocks(p), p["blocks"]) for p in described[name]]) for name in ("dev", "test"))
    return train, dev, test


def summary(described: dict, train: Mixture, dev: Split, test: Split, steps_blocks: int) -> dict:
    """What the report says of the data: each source's size, training blocks and passes over them, its training
    records dropped as duplicates of held-out ones, and the chat records cut at --seq-len and padding."""
    rows = []
    for source, part, share, held in zip(described["sources"], train.parts, train.weights, described["train"]):
        passes = steps_blocks * share / max(len(part), 1)
        rows.append({**{k: source[k] for k in ("path", "weight", "field", "chat", "records", "records_split",
                                               "documents", "tokens", "tokenise_s")},
                     "duplicates_dropped": held.get("duplicates", 0),
                     "train_blocks": len(part), "passes": round(passes, 3), "truncated": part.truncated(),
                     "padding": round(part.padding() / max(len(part) * part.seq_len, 1), 4)})
        if passes > 1:
            log.info("%s yields %d training blocks of %d tokens, fewer than its share of the run (%d): training "
                     "repeats them (%.1f passes)", source["path"], len(part), part.seq_len,
                     round(steps_blocks * share), passes)
    return {"sources": rows, "dev_truncated": dev.truncated, "test_truncated": test.truncated}


def held_out_texts(described: dict, name: str, root: Path, tokenizer) -> list[str]:
    """The documents of a held-out split's text sources (for the built-in lm-eval tasks): the records as written,
    or, from a source whose long records were split, each document's tokens decoded."""
    texts = []
    sources = {s["key"]: s for s in described["sources"]}
    for part in described[name]:
        source = sources.get(part["key"])  # None: the split's own file, which is not held out
        if source and not source["chat"] and source["records_split"]:
            file = TokenFile(root / part["key"])
            texts += [tokenizer.decode(file.tokens[file.offsets[d]: file.offsets[d + 1]], skip_special_tokens=True)
                      for d in range(part["first"], part["end"])]
        elif source and not source["chat"]:
            records, field, _ = load_records(source["path"], source["field"])
            texts += records.select(holdout_order(len(records))[part["first"]: part["end"]])[field]
    return texts


def calibration_blocks(sources: list[Source], text_field: str, tokenizer, seq_len: int, n: int, seed: int):
    """Pruning's calibration blocks [n, seq_len]: each source's share, packed from its records shuffled by `seed`
    and tokenised lazily (chat records as their rendered template)."""
    import torch

    parts = []
    for source, count in zip(sources, shares(n, [s.weight for s in sources])):
        if count:
            records, field, chat = load_records(source.path, source.text_field or text_field)
            if chat:
                check_chat_template(tokenizer, f"data {source.path}")
                records = records.map(lambda r: {"text": tokenizer.apply_chat_template(r[field], tokenize=False)},
                                      remove_columns=records.column_names)
                field = "text"
            parts.append(token_blocks(records, tokenizer, seq_len, count, seed, field))
    return torch.cat(parts)
