"""Appending benchmark rows to benchmarks/results/NAME.csv (header written once, when the file is new)."""
from __future__ import annotations

import csv
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def append_rows(name: str, rows: list[dict], fieldnames: list[str] | None = None) -> Path:
    path = RESULTS / name
    path.parent.mkdir(exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
