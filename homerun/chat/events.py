"""The JSONL event schema of one chat turn (`homerun run --json`, `homerun chat --json`): reasoning and content
deltas, one record per tool call, and a closing done record with the turn's stats.
"""

from __future__ import annotations

from typing import Any

from homerun.chat.session import ChatSession, Delta, TurnDone


def turn_events(event: Delta | TurnDone, session: ChatSession) -> list[dict[str, Any]]:
    """JSONL events for one turn event: reasoning/content deltas, then one tool_call per call and a done record."""
    if isinstance(event, Delta):
        return [{"event": event.kind, "text": event.text}]
    calls = [{"event": "tool_call", "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in event.message.get("tool_calls") or []]
    stats = {**event.stats.to_dict(), **{k: v for k, v in session.stats().items() if k != "last_turn"}}
    placement = getattr(session.model, "placement", None)
    if placement is not None and hasattr(placement, "summary"):  # devices and layers per device
        stats["placement"] = placement.summary()
    done = {"event": "done", "finish_reason": event.stats.finish_reason, "parsed": event.parsed,
            "message": event.message, "stats": stats}
    if session.autosave:
        done["history_file"] = str(session.history_path)
    warning = [{"event": "warning", "message": event.warning}] if event.warning else []
    return calls + warning + [done]
