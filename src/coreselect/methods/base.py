"""The shape every selection method has: ``fit`` on the target, ``score`` on the pool.

Selection (top-k, budgets) and writing outputs are shared (``coreselect.selection``), never
re-implemented per method. A method that samples rather than ranks (``random``, DSIR's
resample mode) returns scores whose top-k *is* the sample (e.g. seeded Gumbel keys).
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
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


def peak_memory_mb(device: Any = "cpu") -> float:
    """Peak memory: CUDA max allocated on a GPU, else the process's max RSS (Linux reports KiB)."""
    import resource

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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

    #: True when ``score_chunks`` can score any contiguous slice of the pool on its own
    #: (per-record scores that do not depend on the rest of the pool), so the pool can be
    #: streamed shard by shard and resumed. Corpus-statistics methods (BM25, DSIR) are not.
    streaming: ClassVar[bool] = False

    def score_chunks(self, pool: Iterable[Record]) -> Iterator["ScoreChunk"]:
        """Score records, yielding :class:`ScoreChunk` s in pool order (default: one chunk)."""
        records = list(pool)
        yield chunk_from_scores(records, self.score(records))

    def settings(self) -> dict[str, Any]:
        """The method's settings, recorded in run.json."""
        return {}


@dataclass
class ScoreChunk:
    """Scores of a contiguous run of pool records (what one shard of ``scores.parquet`` holds).

    ``n_tokens`` / ``n_scored`` are token counts for token-level methods, 0 where a method
    does not tokenize.
    """

    index: np.ndarray  # int64 pool positions
    ids: list[str]
    sources: list[str]
    score: np.ndarray  # float64
    n_tokens: np.ndarray  # int64
    n_scored: np.ndarray  # int64

    def __len__(self) -> int:
        return int(len(self.index))


def chunk_from_scores(records: Sequence[Record], scores: np.ndarray, n_tokens: np.ndarray | None = None,
                      n_scored: np.ndarray | None = None) -> ScoreChunk:
    """Wrap a score array for ``records`` (token counts 0 where a method gives none)."""
    n = len(records)
    zeros = np.zeros(n, dtype=np.int64)
    return ScoreChunk(
        index=np.array([r.index for r in records], dtype=np.int64),
        ids=[r.id for r in records],
        sources=[r.source for r in records],
        score=np.asarray(scores, dtype=np.float64),
        n_tokens=zeros if n_tokens is None else np.asarray(n_tokens, dtype=np.int64),
        n_scored=zeros.copy() if n_scored is None else np.asarray(n_scored, dtype=np.int64),
    )


def record_chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    """Consecutive lists of ``size`` records (the last may be shorter), read lazily."""
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def scores_from_chunks(chunks: Iterable[ScoreChunk]) -> np.ndarray:
    """All chunk scores concatenated (a streaming method's ``score``)."""
    parts = [c.score for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0)
