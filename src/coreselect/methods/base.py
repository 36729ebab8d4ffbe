"""The contract every selection method keeps: ``fit`` on the targets, ``score`` the pool.

Selection (top-k, budgets), engines (local, sharded, Ray) and writing outputs are shared
(:mod:`coreselect.selection`, :mod:`coreselect.engine`), never re-implemented per method. A
method that samples rather than ranks (``random``, DSIR's resample mode) returns scores
whose top-k *is* the sample (e.g. seeded Gumbel keys).

What a method declares (class attributes) and what callers may rely on:

* ``needs_model`` / ``uses_warmup``: the pipeline loads the scoring model (and runs the
  warmup) only for methods that ask for it;
* ``streaming``: ``score_batch`` scores any slice of the pool on its own, so any engine can
  split the pool (shards, resume, Ray actors);
* ``n_truncated`` (records cut at ``max_length``), ``cost`` and ``stats``: counters every
  method has, read by the pipeline for ``run.json``;
* ``save_state`` / ``load_state``: what ``fit`` learned, written into the output folder
  (TRIM fingerprints, P2D heads, RDS target representations), so a resumed run or a Ray
  actor scores without fitting again;
* ``run_info``: extra ``run.json`` keys once the selection is known.

Several target sets (issue 14): :meth:`SelectionMethod.fit_targets` takes them by name. A
method that handles more than one overrides it (and sets ``multi_target``); the default
accepts exactly one set and calls :meth:`~SelectionMethod.fit`, so single-target methods
need no change when multi-target selection arrives.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError

#: several named target sets: ``{"csqa": [...], "siqa": [...]}`` (one unnamed set: ``{"target": [...]}``)
TargetSets = Mapping[str, Sequence[Record]]


@dataclass
class Cost:
    """Selection cost a method reports in ``run.json`` (``wall_s`` is set by the pipeline)."""

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


@dataclass(frozen=True)
class ExperimentRow:
    """One row a method contributes to ``coreselect experiment`` (a ``methods:`` entry).

    Every method contributes its plain row (select with it, LoRA-train on the coreset); a
    method may add variants through :meth:`SelectionMethod.experiment_rows` (P2D's three rows).

    Attributes:
        key: the ``methods:`` entry, also the run folders' prefix.
        select: the method whose coreset is trained on.
        label: the row's name in results.md.
        train_heads_from: a method whose selection folder holds ``train_heads_file``; when set,
            training updates only those heads (``train --heads``) instead of LoRA.
        train_heads_file: that file's name.
        extra_cost: ``(method, stats key)`` pairs: seconds from that selection's run.json
            ``stats`` added to this row's selection cost.
    """

    key: str
    select: str
    label: str
    train_heads_from: str | None = None
    train_heads_file: str = "heads.json"
    extra_cost: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ReportFigure:
    """A figure a method adds to ``coreselect report`` of its run folder (:meth:`SelectionMethod.report_figures`).

    Attributes:
        key: the panel's anchor, also the PNG's name in ``report/``.
        title: the panel's heading.
        png: the image.
        alt: its alt text.
        note: a line shown above it.
    """

    key: str
    title: str
    png: bytes
    alt: str
    note: str = ""


@dataclass
class MethodContext:
    """What a method may use when it is built (:meth:`SelectionMethod.create`).

    Attributes:
        model: the loaded scoring model (:class:`coreselect.runtime.ModelContext`: ``model``,
            ``tokenizer``, ``runner``, ``formatter``, ``warmup``) for ``needs_model`` methods, else ``None``.
        model_name, dtype, device, trust_remote_code: how that model was loaded (checkpoint
            methods reload the base model the same way).
        budget: the run's budget (set-selecting methods such as TAGCOS select exactly it).
        out: the run's output folder.
        progress: show progress bars.
    """

    model: Any = None
    model_name: str = ""
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    budget: str = "5%"
    out: str = ""
    progress: bool = True

    def require_model(self, method: str) -> Any:
        if self.model is None:
            raise CoreselectError(f"internal error: {method} needs the scoring model but none was loaded")
        return self.model


class SelectionMethod(ABC):
    """Base class. Subclasses register with :func:`coreselect.methods.registry.register`
    and implement ``fit`` and ``score`` (streaming ones ``score_batch``)."""

    name: ClassVar[str] = ""
    #: the pipeline loads the scoring model for this method
    needs_model: ClassVar[bool] = False
    #: the model is the warmed-up scorer (``--warmup``); False for methods that use the base model
    uses_warmup: ClassVar[bool] = False
    #: ``score_batch`` scores any contiguous slice of the pool on its own (per-record scores that
    #: do not depend on the rest of the pool), so engines may split, resume and distribute the
    #: pool. Corpus-statistics methods (BM25, DSIR) and set selectors (TAGCOS, S2L) are not.
    streaming: ClassVar[bool] = False
    #: ``fit_targets`` accepts several named target sets
    multi_target: ClassVar[bool] = False

    def __init__(self) -> None:
        self.cost = Cost()
        self.n_truncated = 0  # records longer than max_length, cut (fit and score)
        self.stats: dict[str, Any] = {}
        #: the run's target names (several targets: what ``load_state`` restores)
        self.target_names: list[str] = []

    @classmethod
    def experiment_rows(cls) -> list[ExperimentRow]:
        """The rows this method adds to ``coreselect experiment`` (default: its plain row)."""
        return [ExperimentRow(cls.name, cls.name, cls.name)]

    @classmethod
    def report_summary(cls, run: dict[str, Any]) -> list[tuple[str, object]]:
        """Rows this method adds to the report's summary panel, from its ``run.json`` (default: none)."""
        return []

    @classmethod
    def report_figures(cls, run_dir: Path, run: dict[str, Any]) -> list[ReportFigure]:
        """Figures this method adds to the report, from its run folder (P2D: the heads' heat map; default: none)."""
        return []

    @classmethod
    def requires_target(cls, config: Any) -> bool:
        """Whether a run with ``config`` needs target examples (``random`` does not)."""
        return True

    @classmethod
    def create(cls, config: Any, ctx: MethodContext) -> SelectionMethod:
        """Build the method from its registered config (default: the config's fields as keywords)."""
        return cls(**asdict(config))

    # ------------------------------------------------------------------ fit
    @abstractmethod
    def fit(self, target: Sequence[Record]) -> SelectionMethod:
        """Learn whatever the method needs from the few target examples."""

    def fit_targets(self, targets: TargetSets) -> SelectionMethod:
        """Fit on named target sets; single-target methods take exactly one."""
        if len(targets) > 1 and not self.multi_target:
            raise ConfigError(f"{self.name} takes one target set, got {len(targets)} ({', '.join(targets)})")
        return self.fit(next(iter(targets.values()), []))

    # ------------------------------------------------------------------ score
    @abstractmethod
    def score(self, pool: Iterable[Record]) -> np.ndarray:
        """Return one float64 score per pool record, in pool order; higher is better.

        ``-inf`` means "never select unless the budget forces it".
        """

    def score_batch(self, records: Sequence[Record]) -> ScoreChunk:
        """Scores of one slice of the pool (streaming methods; what engines call per chunk)."""
        if not self.streaming:
            raise CoreselectError(f"{self.name} scores the whole pool at once (not a streaming method)")
        return chunk_from_scores(records, self.score(records))

    def score_chunks(
        self, pool: Iterable[Record], total: int | None = None, chunk_records: int | None = None
    ) -> Iterator[ScoreChunk]:
        """Score records, yielding :class:`ScoreChunk` s in pool order.

        A streaming method yields one chunk per ``chunk_records`` records (the engine's shard
        size; default: its own setting), by calling :meth:`score_batch`; a method may override
        this to overlap reading with scoring. Others yield one chunk for the whole pool.
        """
        if self.streaming and chunk_records:
            for records in record_chunks(pool, chunk_records):
                yield self.score_batch(records)
            return
        records = list(pool)
        yield chunk_from_scores(records, self.score(records))

    # ------------------------------------------------------------------ state and run.json
    def save_state(self, out: Path) -> list[Path]:
        """Write what ``fit`` learned into ``out``; return the files written (default: none)."""
        return []

    def load_state(self, out: Path) -> bool:
        """Restore what :meth:`save_state` wrote into ``out``; False when there is nothing to restore."""
        return False

    def run_info(self, table: Any, info: dict[str, Any]) -> dict[str, Any]:
        """Extra ``run.json`` keys once the selection is known (``table`` = final scores)."""
        return {}

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
    #: several targets (issue 14 §1): float64 scores per target name (``score`` then holds the
    #: first target's, a placeholder until the combined score is computed at finalize)
    targets: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)


def chunk_from_scores(
    records: Sequence[Record],
    scores: np.ndarray,
    n_tokens: np.ndarray | None = None,
    n_scored: np.ndarray | None = None,
) -> ScoreChunk:
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
