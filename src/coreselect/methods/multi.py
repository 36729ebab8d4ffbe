"""Several named targets for a method without native support (issue 14 §1): one instance per target.

:class:`PerTarget` fits one instance of the method per target and scores every slice of the
pool with each of them. **Cost: K targets cost K fits and K scoring passes over the pool**
(a model method runs its forward pass K times; BM25 / DSIR build their corpus statistics
K times). Methods that can do better set ``multi_target`` and override ``fit_targets``
(TRIM: K fingerprint dictionaries, one forward pass). Each instance's ``save_state`` goes
into ``OUT/target-<name>/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coreselect.data.records import Record
from coreselect.methods.base import (
    ScoreChunk,
    SelectionMethod,
    TargetSets,
    chunk_from_scores,
    record_chunks,
    scores_from_chunks,
)


class WholePoolMethod(SelectionMethod):
    """``score`` / ``score_chunks`` of a method that scores the whole pool at once, one column per
    target (BM25, DSIR, LESS): the subclass defines :meth:`_score_targets` and :meth:`_named_targets`."""

    def _score_targets(self, records: Sequence[Record]) -> dict[str, np.ndarray]:
        """``{target name: scores in pool order}``; a single target is the one entry."""
        raise NotImplementedError

    def _named_targets(self) -> bool:
        """Whether several named targets were fitted (the chunk then carries every column)."""
        raise NotImplementedError

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        """Scores (the first target's when there are several), in pool order."""
        return next(iter(self._score_targets(list(pool)).values()))

    def score_chunks(
        self, pool: Iterable[Record], total: int | None = None, chunk_records: int | None = None
    ) -> Iterator[ScoreChunk]:
        """One chunk for the whole pool; several targets: ``targets`` holds every target's column."""
        records = list(pool)
        per = self._score_targets(records)
        chunk = chunk_from_scores(records, next(iter(per.values())))
        if self._named_targets():
            chunk.targets = per
        yield chunk


class PerTarget(SelectionMethod):
    """K instances of one method, one per named target; chunks carry ``targets`` scores."""

    multi_target = True

    def __init__(self, make: Callable[[], SelectionMethod], names: Sequence[str]) -> None:
        super().__init__()
        self.instances: dict[str, SelectionMethod] = {n: make() for n in names}
        first = next(iter(self.instances.values()))
        self.name = first.name  # type: ignore[misc]  # the wrapped method's name, per instance
        self.streaming = first.streaming  # type: ignore[misc]
        self.needs_model = first.needs_model  # type: ignore[misc]

    def fit(self, target: Sequence[Record]) -> PerTarget:
        raise NotImplementedError("PerTarget is fitted with fit_targets")

    def fit_targets(self, targets: TargetSets) -> PerTarget:
        for name, inst in self.instances.items():
            inst.fit_targets({name: targets[name]})
        self._sync()
        return self

    def _sync(self) -> None:
        insts = list(self.instances.values())
        self.n_truncated = sum(i.n_truncated for i in insts)
        self.cost.forward_passes = sum(i.cost.forward_passes for i in insts)
        self.cost.backward_passes = sum(i.cost.backward_passes for i in insts)
        self.stats = {"per_target": {n: i.stats for n, i in self.instances.items()}}

    def _score_records(self, records: Sequence[Record]) -> ScoreChunk:
        per: dict[str, np.ndarray] = {}
        first: ScoreChunk | None = None
        for name, inst in self.instances.items():
            if inst.streaming:
                chunk = inst.score_batch(records)
            else:
                chunk = chunk_from_scores(records, scores_from_chunks(inst.score_chunks(records)))
            per[name] = chunk.score
            first = first or chunk
        assert first is not None
        out = chunk_from_scores(records, first.score, first.n_tokens, first.n_scored)
        out.targets = per
        return out

    def score_batch(self, records: Sequence[Record]) -> ScoreChunk:
        chunk = self._score_records(list(records))
        self._sync()
        return chunk

    def score_chunks(
        self, pool: Iterable[Record], total: int | None = None, chunk_records: int | None = None
    ) -> Iterator[ScoreChunk]:
        if self.streaming and chunk_records:
            for records in record_chunks(pool, chunk_records):
                yield self.score_batch(records)
            return
        yield self.score_batch(list(pool))

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        return scores_from_chunks(self.score_chunks(pool))

    def save_state(self, out: Path) -> list[Path]:
        files: list[Path] = []
        for name, inst in self.instances.items():
            sub = out / f"target-{name}"
            sub.mkdir(parents=True, exist_ok=True)
            written = inst.save_state(sub)
            if not written:
                sub.rmdir()
            files += written
        return files

    def load_state(self, out: Path) -> bool:
        return all(inst.load_state(out / f"target-{name}") for name, inst in self.instances.items())

    def settings(self) -> dict[str, Any]:
        return next(iter(self.instances.values())).settings()
