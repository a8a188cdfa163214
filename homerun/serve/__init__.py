"""Serve: the OpenAI-compatible HTTP server (`homerun serve`). It owns the request protocol (OpenAI's chat and
completions wire formats, validation, error JSON), the single-engine FIFO scheduler with cancellation, prefix reuse
of the live KV state across requests, and the Prometheus metrics. FastAPI + uvicorn do the HTTP.

- `homerun.serve.engine`: `Engine` (one model, one worker thread, a bounded FIFO queue, prefix reuse)
- `homerun.serve.prefix`: restorable points of a runtime Session (exact prefix reuse)
- `homerun.serve.protocol`: request validation and response/chunk builders (no I/O)
- `homerun.serve.app`: `create_app(engine, settings)` (FastAPI) and `run_server(...)` (uvicorn, SIGTERM handling)

No terminal output: the CLI (`homerun/cli/commands/serve.py`) renders.

May import: every layer below the CLI (homerun.errors, formats, kernels, models, profiles, plan, offload, engine,
chat). Never homerun.cli.
"""
