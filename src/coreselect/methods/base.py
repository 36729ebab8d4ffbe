"""The shape every selection method has: ``fit`` on the target, ``score`` on the pool.

Selection (top-k, budgets) and writing outputs are shared (``coreselect.select``), never
re-implemented per method. A method that samples rather than ranks (``random``, DSIR's
resample mode) returns scores whose top-k *is* the sample (e.g. seeded Gumbel keys).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from coreselect.data.records import Record


@dataclass
class Cost:
    """Selection cost a method reports in ``run.json``."""

    wall_s: float = 0.0
    forward_passes: int = 0
    backward_passes: int = 0
    peak_memory_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class SelectionMethod(ABC):
    """Base class. Subclasses set ``name`` and implement ``fit`` and ``score``."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.cost = Cost()
        self._t0 = time.perf_counter()

    @abstractmethod
    def fit(self, target: Sequence[Record]) -> "SelectionMethod":
        """Learn whatever the method needs from the few target examples."""

    @abstractmethod
    def score(self, pool: Iterable[Record]) -> np.ndarray:
        """Return one float64 score per pool record, in pool order; higher is better.

        ``-inf`` means "never select unless the budget forces it".
        """

    def settings(self) -> dict[str, Any]:
        """The method's settings, recorded in run.json."""
        return {}
