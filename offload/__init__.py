"""Expert offload: host expert store, GPU expert cache, transfers and CPU expert compute.
It plugs into the runtime by composition; nothing here imports the CLI."""
