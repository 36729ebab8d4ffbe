"""BM25 baseline: lexical relevance of each pool record to the target examples.

Several named targets (issue 14 §1, ``multi_target``): each target's examples are its own
set of queries; the pool is tokenized and indexed ONCE (IDF and average length are pool
statistics, so they do not depend on the target), every query of every target is scored
against that one index, and each target's queries are aggregated (``max`` / ``mean``) into
that target's own score column. Column k is exactly what a single-target run on target k
gives (same index, same per-query scores, same aggregation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import bm25s
import numpy as np

from coreselect.data.records import Record
from coreselect.data.text import Scope, record_text
from coreselect.errors import ConfigError
from coreselect.methods.base import TargetSets
from coreselect.methods.multi import WholePoolMethod
from coreselect.methods.registry import register


@dataclass
class BM25Config:
    """Options of ``bm25`` (see :class:`BM25Method` for the choices).

    Attributes:
        aggregate: ``max`` (a record close to any target ranks high) or ``mean`` over target queries.
        scope: turns that form the text: ``all``, ``prompt`` or ``response``.
        k1: BM25 term-frequency saturation.
        b: BM25 length normalization.
        stopwords: ``english`` to drop English stopwords (default: keep every word).
    """

    aggregate: str = "max"
    scope: str = "all"
    k1: float = 1.5
    b: float = 0.75
    stopwords: str | None = None

    def __post_init__(self) -> None:
        if self.aggregate not in ("max", "mean"):
            raise ConfigError(f"bm25 aggregate must be max or mean, got {self.aggregate!r}")
        if self.scope not in ("all", "prompt", "response"):
            raise ConfigError(f"scope must be all, prompt or response, got {self.scope!r}")
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ConfigError(f"bm25 needs k1 >= 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}")


@register("bm25", config=BM25Config)
class BM25Method(WholePoolMethod):
    """BM25 (Robertson et al., 2009; TRIM App. C) built on ``bm25s``.

    Choices:
      * The POOL is the indexed corpus (IDF and average length are corpus statistics);
        each target example's text is one query.
      * A record's score aggregates its BM25 scores over all target queries with
        ``aggregate="max"`` (default: a record close to *any* target ranks high) or
        ``"mean"``.
      * Tokenization is ``bm25s.tokenize`` (lower-case, ``\\b\\w\\w+\\b`` tokens, no
        stemming) with English stopword removal OFF by default (``stopwords=None``), so
        short function-word patterns of the task still count; pass ``stopwords="english"``
        to turn it on. Scoring variant is bm25s' default ("lucene") with ``k1``, ``b``.
      * ``scope`` selects which turns form the text (see ``record_text``), for both pool and
        target. Query terms absent from the pool contribute nothing; an empty query scores 0.
      * Several named targets: one pool index, one query set and one score column per
        target (see the module docstring).
    """

    name: ClassVar[str] = "bm25"
    #: several targets natively: one index over the pool, per-target queries and scores
    multi_target: ClassVar[bool] = True

    def __init__(
        self,
        aggregate: Literal["max", "mean"] = "max",
        scope: Scope = "all",
        k1: float = 1.5,
        b: float = 0.75,
        stopwords: str | list[str] | None = None,
    ) -> None:
        super().__init__()
        if aggregate not in ("max", "mean"):
            raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
        self.aggregate = aggregate
        self.scope: Scope = scope
        self.k1 = float(k1)
        self.b = float(b)
        self.stopwords = stopwords
        self._queries: list[str] = []
        #: several targets: name -> that target's queries (empty for one target)
        self._target_queries: dict[str, list[str]] = {}

    def _texts(self, target: Sequence[Record], name: str = "") -> list[str]:
        queries = [record_text(r, self.scope) for r in target]
        if not queries:
            raise ValueError(f"BM25 needs at least one target example{f' (target {name})' if name else ''}")
        return queries

    def fit(self, target: Sequence[Record]) -> BM25Method:
        self._queries = self._texts(target)
        self._target_queries = {}
        return self

    def fit_targets(self, targets: TargetSets) -> BM25Method:
        """One target: :meth:`fit`. Several: one query set per target (the index is the pool's)."""
        if len(targets) <= 1:
            return self.fit(next(iter(targets.values()), []))
        self._target_queries = {name: self._texts(recs, name) for name, recs in targets.items()}
        self._queries = next(iter(self._target_queries.values()))
        return self

    def _tokenize(self, texts: list[str], return_ids: bool) -> Any:
        return bm25s.tokenize(texts, stopwords=self.stopwords, return_ids=return_ids, show_progress=False)

    def _score_targets(self, pool: Iterable[Record]) -> dict[str, np.ndarray]:
        """Scores per query set (key ``""`` for one target), from one index over the pool."""
        if not self._queries:
            raise RuntimeError("call fit() before score()")
        query_sets = self._target_queries or {"": self._queries}
        texts = [record_text(r, self.scope) for r in pool]
        corpus = self._tokenize(texts, return_ids=False)
        if not any(tok for doc in corpus for tok in doc):  # no pool words: all scores 0
            return {name: np.zeros(len(texts), dtype=np.float64) for name in query_sets}
        retriever = bm25s.BM25(k1=self.k1, b=self.b)
        retriever.index(corpus, show_progress=False)
        vocab = retriever.vocab_dict
        out = {}
        for name, queries in query_sets.items():
            rows = []
            for tokens in self._tokenize(queries, return_ids=False):
                known = [t for t in tokens if t and t in vocab]
                rows.append(retriever.get_scores(known) if known else np.zeros(len(texts)))
            matrix = np.asarray(rows, dtype=np.float64)  # (n_queries, n_pool)
            out[name] = matrix.max(axis=0) if self.aggregate == "max" else matrix.mean(axis=0)
        return out

    def _named_targets(self) -> bool:
        return bool(self._target_queries)

    def settings(self) -> dict[str, Any]:
        return {
            "aggregate": self.aggregate,
            "scope": self.scope,
            "k1": self.k1,
            "b": self.b,
            "stopwords": self.stopwords,
        }
