"""`homerun download REPO [--revision R] [--local-dir D] [--json]`: fetch a checkpoint's weights, configs and
tokenizer from the Hugging Face Hub, with progress (GB, GB/s, ETA) on stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def download(
        repo: Annotated[str, typer.Argument(help="Hub repo id, e.g. deepseek-ai/DeepSeek-V4-Flash.")],
        revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit (default main).")] = None,
        local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Put the files here instead of the "
                                                                           "Hugging Face cache.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    ) -> None:
        """Download only what inference needs (*.safetensors, index, config, generation config, tokenizer).

        Interrupted downloads resume; complete files are skipped. Sizes are checked against the repo and the
        index, and the exact commit is written to homerun-download.json next to the files.

        Examples:
          homerun download deepseek-ai/DeepSeek-V4-Flash
          homerun download deepseek-ai/DeepSeek-V4-Flash --revision 60d8d707 --local-dir ~/models/v4-flash
          homerun download deepseek-ai/DeepSeek-V4-Pro --json
        """
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        from homerun.formats.download import download as run_download
        from homerun.cli.output import Output

        out = Output(json_out)
        # Progress always goes to stderr, so --json keeps stdout to exactly one document.
        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn(), console=out.err, transient=True, disable=json_out)
        task = bar.add_task("listing", total=None)

        def on_progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        with bar:
            result = run_download(repo, revision=revision, local_dir=local_dir, progress=on_progress)

        def render(console) -> None:
            from rich.text import Text

            skipped = sum(1 for f in result.files if f.skipped)
            console.print(Text(f"{result.repo} @ {result.commit}"))
            console.print(Text(f"  {len(result.files)} files, {result.total_bytes / 1e9:.2f} GB in {result.local_dir}"))
            console.print(f"  fetched {result.fetched_bytes / 1e9:.2f} GB in {result.elapsed_s:.0f} s "
                          f"({result.fetched_gbps:.2f} GB/s); {skipped} already complete")

        out.result(result, render)
