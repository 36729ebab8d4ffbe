"""Progress bars: records/s from tqdm, plus tokens/s and the ETA."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any


class _Bar:
    def __init__(self, total: int | None, desc: str, enabled: bool, unit: str = "rec") -> None:
        from tqdm.auto import tqdm

        self.tokens = 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(
            total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True, mininterval=0.5
        )

    def update(self, n: int, tokens: int = 0) -> None:
        if tokens:
            self.tokens += tokens
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens / dt:,.0f} tok/s", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool = True, unit: str = "rec") -> Iterator[Any]:
    """A tqdm bar (records, rate, ETA) whose ``update(n, tokens=...)`` also shows tokens/s."""
    bar = _Bar(total, desc, enabled, unit)
    try:
        yield bar
    finally:
        bar.close()
