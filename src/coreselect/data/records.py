"""The one record type every stage passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
#: what a reader does with a bad record: raise, or skip it (logged to ``rejects.jsonl``)
OnBadRecord = Literal["error", "skip"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Record:
    """One pool or target example, normalized.

    Attributes:
        index: position in the concatenated input (all pool files in order), 0-based.
        id: the record's own ``id`` field as a string, else ``"<source>:<position in file>"``.
        source: the record's ``dataset`` field if present, else the file's stem.
        messages: the conversation. ``text`` records have ``kind == "text"`` and one
            ``assistant`` message holding the text (no prompt part, see formatting).
        raw: the input record verbatim; written back unchanged into ``coreset.jsonl``.
        file: path of the file the record came from.
        line: 1-based line number for JSON Lines / JSON arrays, 0-based row for Parquet/Arrow.
        kind: ``"chat"`` (messages / prompt-completion / Alpaca) or ``"text"``.
    """

    index: int
    id: str
    source: str
    messages: tuple[Message, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)
    file: str = ""
    line: int = 0
    kind: Literal["chat", "text"] = "chat"
