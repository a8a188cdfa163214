"""Chat: the V4 chat encoding (messages <-> prompt text, byte-exact to the official encoder), streaming of
generated ids into reasoning/content deltas, and the chat session logic (history, thinking modes, slash commands,
atomic save/load). No terminal I/O: the CLI renders it.

May import: homerun.errors, homerun.formats.
"""

from homerun.chat.encoding import encode_messages, parse_message_from_completion_text  # noqa: F401,E402 - public API
