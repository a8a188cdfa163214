"""The single output sink: data to stdout (rich in human mode, exactly one JSON document with --json),
progress, warnings and errors to stderr. Library code never prints; commands render through this."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable

from rich.console import Console


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class Output:
    def __init__(self, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.out = Console(soft_wrap=False, highlight=False)
        if not self.out.is_terminal:  # a pipe or a file: long lines stay whole, nothing wraps mid-value
            self.out.soft_wrap = True
        self.err = Console(stderr=True, highlight=False)

    def result(self, data: Any, render: Callable[[Console], None] | None = None) -> None:
        """Emit the command's result: one JSON document in --json mode, else the human rendering."""
        if self.json_mode:
            sys.stdout.write(json.dumps(_jsonable(data), indent=2, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        elif render is not None:
            render(self.out)
        else:
            self.out.print_json(json.dumps(_jsonable(data)))

    def event(self, data: dict[str, Any]) -> None:
        """One JSONL event (streaming commands in --json mode)."""
        sys.stdout.write(json.dumps(_jsonable(data), ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def info(self, msg: str) -> None:
        if not self.json_mode:
            self.err.print(msg)

    def warn(self, msg: str) -> None:
        self.err.print(f"[yellow]Warning:[/yellow] {msg}")

    def plain(self, msg: str, style: str = "") -> None:
        """Like info, for text that holds data (paths, names, library messages): printed as text, never markup."""
        if not self.json_mode:
            from rich.text import Text

            self.err.print(Text(str(msg), style=style))
