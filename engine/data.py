"""Local text data through `datasets`: text, jsonl/json, parquet, csv files or a `save_to_disk` folder.

Records are tokenised with the model's tokenizer, concatenated and cut into fixed-length blocks (the
`run_clm` convention), lazily, so calibration on a large corpus tokenises only what it uses.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.errors import UserError

log = logging.getLogger(__name__)
HOLDOUT_SEED = 1234  # the dev/test records are the same for every --seed and --max-steps
HOLDOUT_SHARE = 10  # a held-out split takes at most 1/10 of the records

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def check_data_path(path) -> str:
    """The cheap checks of a data path, without reading it: exists, a known format. Returns the format."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
            raise UserError(f"{path} is a folder but not a dataset saved with save_to_disk")
        return "save_to_disk"
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"data file {path}: unsupported extension '{path.suffix}'; use one of {sorted(BUILDERS)}")
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty")
    return builder


def load_text_dataset(path, text_field: str = "text"):
    """A `datasets.Dataset` of records with a `text_field` column, from a local file or saved folder."""
    import datasets

    path = Path(path)
    builder = check_data_path(path)
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise UserError(f"{path} is a folder but not a dataset saved with save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{path} holds splits {list(ds)}; save the one to use as 'train'")
            ds = ds["train"]
    else:
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as e:  # datasets wraps parser errors in many types
            raise UserError(f"cannot read data file {path} as {builder}: {str(e).strip().splitlines()[0]}") from None
    if len(ds) == 0:
        raise UserError(f"data file {path} has no records")
    if text_field not in ds.column_names:
        raise UserError(f"data file {path} has no '{text_field}' field (it has {ds.column_names}); "
                        "pass --text-field NAME")
    return ds


def token_blocks(ds, tokenizer, seq_len: int, max_blocks: int | None = None, seed: int | None = 0,
                 text_field: str = "text", chunk: int = 256) -> torch.Tensor:
    """Blocks of `seq_len` token ids [n, seq_len] from the (shuffled, if `seed`) records."""
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    buffer: list[int] = []
    blocks: list[list[int]] = []
    for start in range(0, len(ds), chunk):
        texts = [t for t in ds[start : start + chunk][text_field] if t and t.strip()]
        for ids in tokenizer(texts)["input_ids"] if texts else []:
            buffer.extend(ids)
        while len(buffer) >= seq_len:
            blocks.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
        if max_blocks is not None and len(blocks) >= max_blocks:
            break
    if not blocks:
        raise UserError(f"the data holds fewer than {seq_len} tokens, not one block of --seq-len {seq_len}; "
                        "give more text or a smaller --seq-len")
    if max_blocks is not None and len(blocks) < max_blocks:
        log.info("the data yields %d blocks of %d tokens, fewer than the %d asked for: training repeats them "
                 "(%.1f epochs)", len(blocks), seq_len, max_blocks, max_blocks / len(blocks))
    return torch.tensor(blocks[:max_blocks], dtype=torch.long)


def hold_out(ds, tokenizer, seq_len: int, wanted: dict[str, int], text_field: str = "text", chunk: int = 64):
    """Held-out splits cut out of `ds` at record boundaries: for each name in `wanted` (in order), the records of
    one fixed permutation (HOLDOUT_SEED) until they yield wanted[name] blocks or a tenth of the records.
    Returns ({name: blocks [n, seq_len]}, {name: its records' texts}, the remaining records for training)."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(HOLDOUT_SEED)).tolist()
    cap = max(1, len(ds) // HOLDOUT_SHARE)
    if len(ds) <= len(wanted):
        raise UserError(f"the data has {len(ds)} record(s): too few to hold out {' and '.join(wanted)} at record "
                        f"boundaries; give {' and '.join('--' + name + '-data' for name in wanted)} or more records")
    splits, records, used = {}, {}, 0
    for name, n_blocks in wanted.items():
        buffer: list[int] = []
        taken, records[name] = 0, []
        while len(buffer) < n_blocks * seq_len and taken < cap and used + taken < len(ds) - 1:
            size = min(chunk, cap - taken, len(ds) - 1 - used - taken)
            texts = ds.select(order[used + taken: used + taken + size])[text_field]
            for text, ids in zip(texts, tokenizer([t or "" for t in texts])["input_ids"]):
                buffer.extend(ids if text and text.strip() else [])
                records[name].append(text)
                taken += 1
                if len(buffer) >= n_blocks * seq_len:
                    break
        used += taken
        blocks = [buffer[i: i + seq_len] for i in range(0, len(buffer) - seq_len + 1, seq_len)][:n_blocks]
        if not blocks:
            raise UserError(f"the {taken} record(s) held out for {name} (at most 1/{HOLDOUT_SHARE} of --data) hold "
                            f"fewer than --seq-len {seq_len} tokens; give --{name}-data, more text or a smaller "
                            "--seq-len")
        if len(blocks) < n_blocks:
            log.info("%s: %d held-out blocks (1/%d of the records), fewer than the %d asked for", name, len(blocks),
                     HOLDOUT_SHARE, n_blocks)
        splits[name] = torch.tensor(blocks, dtype=torch.long)
    return splits, records, ds.select(order[used:])
