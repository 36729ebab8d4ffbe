"""What an engine is: it runs a fitted method's scoring over the pool and hands back the
score table. It never knows which method it runs (only ``streaming``, ``score_chunks`` and
``score_batch`` of :class:`~coreselect.methods.base.SelectionMethod`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from coreselect.config import SelectArgs
from coreselect.methods.base import SelectionMethod


@dataclass
class EngineJob:
    """One scoring job: the run's args, its output folder, the pool size, the loaded model."""

    args: SelectArgs
    out: Path
    n_pool: int
    model: Any = None  # coreselect.runtime.ModelContext | None


@dataclass
class Scored:
    """What an engine returns.

    Attributes:
        table: every pool record's scores (SCORE_SCHEMA), or ``None`` when this process scored
            only its shards (``--num-shards``; ``coreselect merge`` assembles them).
        info: run.json's ``engine`` entry.
        resumed_shards: shards found complete on disk and not scored again.
        chunks: shard chunks this process owns (sharded runs).
    """

    table: pa.Table | None
    info: dict[str, Any]
    resumed_shards: int = 0
    chunks: list[int] = field(default_factory=list)


class Engine(ABC):
    """Runs the scoring of a fitted method."""

    name: ClassVar[str] = ""

    @abstractmethod
    def score(self, method: SelectionMethod, job: EngineJob) -> Scored:
        """Score the whole pool (or this process's part of it)."""
