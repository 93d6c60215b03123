"""docs/options.md's option table, written from RunConfig (`make docs-options`; a test keeps the page in step)."""
from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

from engine.config import RunConfig

OPTIONS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "options.md"
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


def with_table(page: str) -> str:
    """The page's text with its option table replaced by the current one."""
    table = re.compile(re.escape(HEADER) + r"(?:\|.*\n)*")
    if not table.search(page):
        raise SystemExit(f"{OPTIONS_PAGE} has no option table (its header row was not found)")
    return table.sub(lambda _: options_table(), page, count=1)


if __name__ == "__main__":
    text = OPTIONS_PAGE.read_text()
    OPTIONS_PAGE.write_text(with_table(text))
    print("docs/options.md option table", "unchanged" if with_table(text) == text else "rewritten", file=sys.stderr)
