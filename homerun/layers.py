"""The layer order of the codebase, bottom first. A module may import its own layer and the layers below it, never
above; tests/test_layers.py checks every import (eager or lazy) against this table and forbids import cycles.

    cli          homerun.cli: the Typer app, one module per command, the output sink
    serve        homerun.serve: the OpenAI-compatible server
    bench        homerun.bench: model benchmarks, synthetic checkpoints, reports
    chat         homerun.chat: V4 chat encoding, streaming, chat session logic
    engine       homerun.engine: load, Model, Session, generate, sampling, backends, placement executor
    offload      offload: host store, expert cache, policies, transfers, prefetch, miss policy, devices, traces
    plan         homerun.plan: specs, cards, inventories, the pure planner, hardware detection
    profiles     profiles: hardware profiles as data
    models       homerun.models: model math (one module per architecture), linear layers, paged KV rows
    kernels      homerun.kernels: native CPU kernels and binding, reference formulas, kernel benchmarks
    formats      homerun.formats: tensor layout, FP8/FP4 formats, checkpoint read/write, tokenizer, download
    base         homerun (the package root), homerun.errors, homerun.version, this table
"""

from __future__ import annotations

# (layer, module prefixes), bottom first
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("homerun", "homerun.errors", "homerun.version", "homerun.layers")),
    ("formats", ("homerun.formats",)),
    ("kernels", ("homerun.kernels",)),
    ("models", ("homerun.models",)),
    ("profiles", ("profiles",)),
    ("plan", ("homerun.plan",)),
    ("offload", ("offload",)),
    ("engine", ("homerun.engine",)),
    ("chat", ("homerun.chat",)),
    ("bench", ("homerun.bench",)),
    ("serve", ("homerun.serve",)),
    ("cli", ("homerun.cli", "homerun.__main__")),
)


def layer_of(module: str) -> int | None:
    """Index of the layer a dotted module name belongs to (longest matching prefix), or None."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best
