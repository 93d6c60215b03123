"""The README's option table, written from RunConfig (`make readme-options`; a test keeps the README in step)."""
from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

from engine.config import RunConfig

README = Path(__file__).resolve().parents[2] / "README.md"
HEADER = "| option (recipe key) | default | what it does |\n| --- | --- | --- |\n"


def _default(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def options_table() -> str:
    rows = []
    for f in fields(RunConfig):
        help_text = f.metadata["help"].replace("%%", "%").replace("||", "\\|\\|")
        if f.metadata.get("choices"):
            help_text += f" (one of: {', '.join(f.metadata['choices'])})"
        rows.append(f"| `--{f.name.replace('_', '-')}` (`{f.name}`) | {_default(f.default)} | {help_text} |\n")
    return HEADER + "".join(rows)


def with_table(readme: str) -> str:
    """The README text with its option table replaced by the current one."""
    table = re.compile(re.escape(HEADER) + r"(?:\|.*\n)*")
    if not table.search(readme):
        raise SystemExit("README.md has no option table (its header row was not found)")
    return table.sub(lambda _: options_table(), readme, count=1)


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(with_table(text))
    print("README.md option table", "unchanged" if with_table(text) == text else "rewritten", file=sys.stderr)
