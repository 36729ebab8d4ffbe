"""Random baseline: a seeded uniform sample without replacement."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coreselect.data.records import Record
from coreselect.methods.base import SelectionMethod
from coreselect.methods.registry import register


@dataclass
class RandomConfig:
    """Options of ``random``.

    Attributes:
        seed: seeds the keys (inherited from the run's ``--seed``).
    """

    seed: int = 0


@register("random", config=RandomConfig)
class RandomMethod(SelectionMethod):
    """Uniform random selection (TRIM App. C "Random").

    Scores are i.i.d. uniform keys from ``numpy.random.Generator(PCG64(seed))``, one per pool
    record; their top-k is a uniform sample of size k without replacement. The keys depend
    only on ``seed`` and the pool length, not on record contents or reading order.
    """

    name: ClassVar[str] = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)

    @classmethod
    def requires_target(cls, config: Any) -> bool:
        return False

    def fit(self, target: Sequence[Record]) -> RandomMethod:
        """Nothing to learn; the target is ignored."""
        return self

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        n = sum(1 for _ in pool)
        return np.random.Generator(np.random.PCG64(self.seed)).random(n).astype(np.float64)

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed}
