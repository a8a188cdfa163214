"""Tables that never cut a value: every column keeps its values whole (no ellipsis, no fold inside a value), prose
columns wrap between words, and when the table cannot fit the terminal it switches to one block per row
("name" then "  column: value" lines). Piped output (not a terminal) gets the table at its natural width, so a
script or a file sees one line per row. User and data text is printed as text, never as rich markup."""

from __future__ import annotations

from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

# (column name, justify: "left" | "right")
Columns = Sequence[tuple[str, str]]
Cell = str | Text


def _text(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else Text(str(cell))


def build_table(title: str | None, columns: Columns, rows: Sequence[Sequence[Cell]], *, prose: Sequence[str] = (),
                row_styles: Sequence[str | None] | None = None, caption: str | None = None) -> Table:
    table = Table(title=escape(title) if title else None, title_justify="left",
                  caption=escape(caption) if caption else None)
    for name, justify in columns:
        table.add_column(escape(name), justify=justify, no_wrap=name not in prose, overflow="fold")  # type: ignore[arg-type]
    for i, row in enumerate(rows):
        table.add_row(*(_text(c) for c in row), style=row_styles[i] if row_styles else None)
    return table


def table_widths(console: Console, table: Table) -> tuple[int, int]:
    """(narrowest, natural) width of `table`: the narrowest has prose columns wrapped at their longest word."""
    m = console.measure(table, options=console.options.update_width(1 << 16))
    return m.minimum, m.maximum


def print_table(console: Console, title: str | None, columns: Columns, rows: Sequence[Sequence[Cell]], *,
                prose: Sequence[str] = (), row_styles: Sequence[str | None] | None = None,
                caption: str | None = None, block_key: int = 0) -> str:
    """Print rows as a table when it fits, else as blocks. Returns the layout used: "table", "wide" (piped, at the
    natural width) or "blocks"."""
    table = build_table(title, columns, rows, prose=prose, row_styles=row_styles, caption=caption)
    narrowest, natural = table_widths(console, table)
    if not console.is_terminal:
        print_wide(console, table, max(natural, console.width))
        return "wide"
    if narrowest <= console.width:
        console.print(table)
        return "table"
    print_blocks(console, title, columns, rows, row_styles=row_styles, caption=caption, key=block_key)
    return "blocks"


def print_wide(console: Console, renderable: Any, width: int) -> None:
    """Print at `width` even past the console's width (`print(width=)` is capped by it): for pipes and files."""
    saved = console._width  # noqa: SLF001 - rich has no public way to widen one print
    console.width = width
    try:
        console.print(renderable, crop=False)
    finally:
        console._width = saved  # noqa: SLF001


def print_blocks(console: Console, title: str | None, columns: Columns, rows: Sequence[Sequence[Cell]], *,
                 row_styles: Sequence[str | None] | None = None, caption: str | None = None, key: int = 0) -> None:
    """One block per row: the key column's value on its own line, then one `column: value` line per other column,
    wrapped between words under the value."""
    if title:
        console.print(Text(title, style="italic"))
    names = [name for name, _ in columns]
    pad = max((len(n) for i, n in enumerate(names) if i != key), default=0)
    for r, row in enumerate(rows):
        style = row_styles[r] if row_styles else None
        head = _text(row[key]).copy()
        head.stylize("bold")
        console.print(head, style=style or "")
        for i, cell in enumerate(row):
            if i == key:
                continue
            line = Text(f"  {names[i]:<{pad}}  ", style="dim")
            line.append_text(_text(cell))
            console.print(line, style=style or "", overflow="fold")
    if caption:
        console.print(Text(caption, style="dim"))


def plain(value: Any) -> str:
    """A data value as a person reads it (not a Python repr): lists comma-separated, None as "-", bools as
    true/false, floats without a trailing .0."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}" if value == value and abs(value) < 1e15 else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(v) for v in value) or "(none)"
    return str(value)


def toml_value(value: Any) -> str:
    """A data value in TOML syntax, as a profile file would hold it (None: "(not set)")."""
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)
