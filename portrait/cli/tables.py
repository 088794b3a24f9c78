"""Every table the CLI prints goes through `show`: rich for a person, whole values for a pipe.

rich sizes a table to the terminal, and to 80 columns when stdout is not one, so
`portrait models list | grep ...` used to read `ip-adapte…` and `non-comm…`. When stdout is
not a terminal, `show` prints plain tab-separated rows instead: an optional `# title` line,
the header row (when the table has one), then one line per row, every value whole and
without markup, so `cut -f`, `awk -F'\\t'` and `grep` work. `--json` stays the structured door.
"""

from __future__ import annotations

import sys
from typing import IO, Any


def _plain(cell: Any) -> str:
    from rich.text import Text

    if isinstance(cell, Text):
        return cell.plain
    text = Text.from_markup(cell) if isinstance(cell, str) else Text(str(cell))
    return text.plain.replace("\t", " ").replace("\n", " ")


def rows_of(table) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of a rich Table as plain strings."""
    headers = [_plain(column.header) for column in table.columns]
    cells = [[_plain(cell) for cell in column.cells] for column in table.columns]
    rows = [list(row) for row in zip(*cells)] if cells else []
    return headers, rows


def show(table, *, file: IO[str] | None = None, tty: bool | None = None) -> None:
    """Print `table` (a rich Table): drawn on a terminal, tab-separated in a pipe or file."""
    out = file or sys.stdout
    if tty is None:
        tty = out.isatty()
    if tty:
        from rich.console import Console

        Console(file=out).print(table)
        return
    headers, rows = rows_of(table)
    if table.title:
        out.write(f"# {_plain(table.title)}\n")
    if table.show_header:
        out.write("\t".join(headers) + "\n")
    for row in rows:
        out.write("\t".join(row) + "\n")
    out.flush()
