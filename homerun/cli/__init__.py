"""CLI: the Typer app, one module per command under commands/, and the single output sink. The only layer that
prints, reads the terminal, or turns a HomerunError into an exit code.

May import: every layer.
"""
