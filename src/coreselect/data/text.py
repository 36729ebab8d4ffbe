"""Plain text views of a record, shared by the lexical methods."""

from __future__ import annotations

from typing import Literal

from coreselect.data.records import Record

Scope = Literal["all", "prompt", "response"]

_ROLES: dict[str, frozenset[str]] = {
    "all": frozenset({"system", "user", "assistant"}),
    "prompt": frozenset({"system", "user"}),
    "response": frozenset({"assistant"}),
}


def record_text(record: Record, scope: Scope = "all") -> str:
    """Join the contents of the record's messages in ``scope`` with ``"\\n"``.

    ``"prompt"`` is the system and user turns, ``"response"`` the assistant turns, ``"all"``
    every turn, in conversation order. ``text`` records hold their text in a single
    assistant message, so they count as response (their prompt text is ``""``).
    """
    try:
        roles = _ROLES[scope]
    except KeyError:
        raise ValueError(f"scope must be one of {sorted(_ROLES)}, got {scope!r}") from None
    return "\n".join(m.content for m in record.messages if m.role in roles)
