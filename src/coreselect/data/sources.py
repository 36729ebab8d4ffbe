"""What the readers iterate: one input (a file, a folder, a ``datasets`` object) as rows.

Its own module so :mod:`coreselect.data.readers` and :mod:`coreselect.data.hf_datasets`
both use it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from coreselect.errors import BadRecordError

#: ``(position, raw value, error)`` of one row; the error is set when the row could not be decoded
Item = tuple[int, Any, "BadRecordError | None"]


@dataclass(frozen=True)
class Source:
    """One input: its name as given, default ``source`` name, position kind and row iterator."""

    file: str
    stem: str
    kind: str  # "line" or "row"
    rows: Callable[[], Iterator[Item]]
