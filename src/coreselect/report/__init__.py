"""See why: an interpretable HTML report of a selection run (``coreselect report``) and a
terminal view of one record's token scores (``coreselect explain``).

Submodules import lazily (matplotlib and the model are only loaded when used).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExplainArgs", "ReportArgs", "explain", "report"]


def __getattr__(name: str) -> Any:
    if name in ("ReportArgs", "report"):
        from coreselect.report import build

        return getattr(build, name)
    if name in ("ExplainArgs", "explain"):
        from coreselect.report import terminal

        return getattr(terminal, name)
    raise AttributeError(name)
