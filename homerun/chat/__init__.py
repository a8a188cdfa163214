"""Chat: the V4 chat encoding (messages <-> prompt text, byte-exact to the official encoder), streaming of
generated ids into reasoning/content deltas, and the chat session logic (history, thinking modes, slash commands,
atomic save/load). No terminal I/O: the CLI renders it.

May import: homerun.errors, homerun.formats.
"""
