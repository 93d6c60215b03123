"""Appending benchmark rows to benchmarks/results/NAME.csv. The header is the union of every row's columns: when new
rows bring new columns, the file is rewritten (atomically) with the wider header, old rows leaving them empty."""
from __future__ import annotations

import csv
import os
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def append_rows(name: str, rows: list[dict], fieldnames: list[str] | None = None) -> Path:
    path = RESULTS / name
    path.parent.mkdir(exist_ok=True)
    fields = list(fieldnames or dict.fromkeys(k for row in rows for k in row))
    old_fields, old_rows = [], []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_fields, old_rows = list(reader.fieldnames or []), list(reader)
    header = list(dict.fromkeys(old_fields + fields))
    if header == old_fields:
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=header).writerows(rows)
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(old_rows + rows)
    os.replace(tmp, path)
    return path
