"""DSIR baseline: hashed n-gram importance weights, via the authors' ``data_selection``.

Several named targets (issue 14 §1, ``multi_target``): one target distribution and ONE
IMPORTANCE-WEIGHT VECTOR PER TARGET, from one pass over the pool. The library's own
``separate_targets`` mode fits the pool's n-gram distribution once and one distribution per
target file (``log_diff`` becomes ``[K, buckets]``); the pool is featurized (hashed) once and
each record's feature vector is dotted with every target's ``log_diff`` row
(:class:`_PerTargetDSIR`, one ``np.dot`` per row, the very call a single-target run makes, so
column k equals a single-target run on target k bit for bit). ``mode="resample"`` adds the
same seeded Gumbel noise to every column (what each single-target run with that seed would
draw). A target with no tokens gets all-zero weights, as a single-target run would.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from data_selection import HashedNgramDSIR, hashed_ngram_dsir

from coreselect.data.records import Record
from coreselect.data.text import Scope, record_text
from coreselect.errors import ConfigError
from coreselect.methods.base import TargetSets
from coreselect.methods.multi import WholePoolMethod
from coreselect.methods.registry import register


def _write_jsonl(path: Path, texts: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)  # ASCII-escaped: one record per line


def _wordpunct(text: str) -> list[str]:
    """The library's own ``wordpunct`` tokenizer, looked up at call time.

    ``HashedNgramDSIR`` stores the bound method ``wpt.tokenize``; pickling it into joblib
    workers breaks nltk>=3.10's timeout sentinel ("timeout not float or None"). A
    module-level function is pickled by reference, so workers use their own ``wpt``.
    """
    return hashed_ngram_dsir.wpt.tokenize(text)


def _unshard(directory: Path, num_shards: int, n: int, width: int | None = None) -> np.ndarray:
    """Undo ``data_selection``'s virtual sharding: shard j holds examples j, j+S, j+2S...

    ``width``: per-example vectors of that length (``[n, width]``; several targets), else scalars.
    """
    out = np.empty(n if width is None else (n, width), dtype=np.float64)
    for j in range(num_shards):
        out[j::num_shards] = np.load(directory / f"{j}.npy")
    return out


class _PerTargetDSIR(HashedNgramDSIR):
    """``separate_targets`` with one ``np.dot`` per target row (``log_diff`` is ``[K, buckets]``).

    The library's estimator computes ``log_diff @ features`` in one matrix-vector product,
    whose rounding may differ from the vector dot of a single-target run; a dot per row
    gives each target exactly the single-target value.
    """

    def importance_estimator(self, features: np.ndarray) -> np.ndarray:
        assert self.log_diff is not None
        return np.array([np.dot(row, features) for row in self.log_diff], dtype=np.float64)


@dataclass
class DSIRConfig:
    """Options of ``dsir`` (see :class:`DSIRMethod` for the choices).

    Attributes:
        mode: ``resample`` (seeded Gumbel importance resampling, as DSIR) or ``topk`` (log-weights).
        num_buckets: hashed n-gram buckets.
        ngrams: 2 = unigrams + bigrams.
        seed: seeds the resampling noise (inherited from the run's ``--seed``).
        scope: turns that form the text: ``all``, ``prompt`` or ``response``.
        min_example_length: records with fewer tokens score -inf (0 = off).
        num_proc: the library's worker processes.
    """

    mode: str = "resample"
    num_buckets: int = 10000
    ngrams: int = 2
    seed: int = 0
    scope: str = "all"
    min_example_length: int = 0
    num_proc: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("resample", "topk"):
            raise ConfigError(f"dsir mode must be resample or topk, got {self.mode!r}")
        if self.scope not in ("all", "prompt", "response"):
            raise ConfigError(f"scope must be all, prompt or response, got {self.scope!r}")
        if self.num_buckets < 1 or self.ngrams < 1 or self.num_proc < 1 or self.min_example_length < 0:
            raise ConfigError("dsir needs num_buckets, ngrams, num_proc >= 1 and min_example_length >= 0")


@register("dsir", config=DSIRConfig)
class DSIRMethod(WholePoolMethod):
    """DSIR (Xie et al., 2023; TRIM App. C) using ``data_selection.HashedNgramDSIR``.

    Choices:
      * Raw distribution = the POOL, target distribution = the target examples; both are
        the library's hashed n-gram bag-of-words (``ngrams``: 2 = unigrams + bigrams,
        ``num_buckets`` buckets, its default ``wordpunct`` tokenizer, lower-cased).
      * Texts go through temporary JSONL files (``{"text": ...}``) in a
        ``TemporaryDirectory``; the library fits both distributions
        (``fit_importance_estimator(num_tokens_to_fit="all")``) and writes per-record
        log-importance weights ``log p_target(x) - log p_raw(x)`` (up to the library's 1e-8
        smoothing) which are read back and un-sharded into pool order.
      * ``mode="topk"`` returns the log-weights. ``mode="resample"`` (default, as DSIR) adds
        Gumbel noise from ``Generator(PCG64(seed))``, so the top-k of the scores is
        importance resampling without replacement (the library's own ``resample`` does the
        same, but with unseeded noise and writing files, so it is not called).
      * The library's short-example filter (``min_example_length``, 100 tokens by default
        in DSIR) is OFF by default here, since instruction data is often short; when > 0,
        shorter records get ``-inf``.
      * ``num_proc`` is the library's worker count (default 1: no process pool).
      * Several named targets: one importance-weight vector (score column) per target, the
        pool featurized once (see the module docstring).
    """

    name: ClassVar[str] = "dsir"
    #: several targets natively: one target distribution and weight vector per target, one pool pass
    multi_target: ClassVar[bool] = True

    def __init__(
        self,
        mode: Literal["resample", "topk"] = "resample",
        num_buckets: int = 10000,
        ngrams: int = 2,
        seed: int = 0,
        scope: Scope = "all",
        min_example_length: int = 0,
        num_proc: int = 1,
    ) -> None:
        super().__init__()
        if mode not in ("resample", "topk"):
            raise ValueError(f"mode must be 'resample' or 'topk', got {mode!r}")
        self.mode = mode
        self.num_buckets = int(num_buckets)
        self.ngrams = int(ngrams)
        self.seed = int(seed)
        self.scope: Scope = scope
        self.min_example_length = int(min_example_length)
        self.num_proc = int(num_proc)
        self._targets: list[str] = []
        #: several targets: name -> that target's texts (empty for one target)
        self._target_texts: dict[str, list[str]] = {}
        self.log_weights: np.ndarray | None = None  # last pool's noiseless log-weights (first target's)
        #: several targets: name -> last pool's noiseless log-weights
        self.target_log_weights: dict[str, np.ndarray] = {}

    def _texts(self, target: Sequence[Record], name: str = "") -> list[str]:
        texts = [record_text(r, self.scope) for r in target]
        if not texts:
            raise ValueError(f"DSIR needs at least one target example{f' (target {name})' if name else ''}")
        return texts

    def fit(self, target: Sequence[Record]) -> DSIRMethod:
        self._targets = self._texts(target)
        self._target_texts = {}
        return self

    def fit_targets(self, targets: TargetSets) -> DSIRMethod:
        """One target: :meth:`fit`. Several: one target distribution per target, fitted while scoring."""
        if len(targets) <= 1:
            return self.fit(next(iter(targets.values()), []))
        self._target_texts = {name: self._texts(recs, name) for name, recs in targets.items()}
        self._targets = next(iter(self._target_texts.values()))
        return self

    def _log_weights(self, texts: list[str], target_sets: list[list[str]]) -> list[np.ndarray]:
        """Noiseless log-weights of ``texts`` per target set (one library run, pool featurized once)."""
        n, multi = len(texts), len(target_sets) > 1
        with tempfile.TemporaryDirectory(prefix="coreselect-dsir-") as tmp:
            d = Path(tmp)
            _write_jsonl(d / "raw.jsonl", texts)
            paths = [d / ("target.jsonl" if not multi else f"target-{k}.jsonl") for k in range(len(target_sets))]
            for path, target in zip(paths, target_sets, strict=True):
                _write_jsonl(path, target)
            dsir = (_PerTargetDSIR if multi else HashedNgramDSIR)(
                raw_datasets=[str(d / "raw.jsonl")],
                target_datasets=[str(p) for p in paths],
                cache_dir=str(d / "cache"),
                num_proc=self.num_proc,
                ngrams=self.ngrams,
                num_buckets=self.num_buckets,
                min_example_length=self.min_example_length,
                separate_targets=multi,
            )
            dsir.tokenizer = _wordpunct  # same tokenization, picklable (see above)
            with np.errstate(invalid="ignore"):
                dsir.fit_importance_estimator(num_tokens_to_fit="all")
            # a target (or the pool) with no tokens at all: no information, equal weights
            finite = np.isfinite(np.atleast_2d(dsir.log_diff)).all(axis=1)  # [K]
            if not finite.any():
                return [np.zeros(n, dtype=np.float64) for _ in target_sets]
            if multi:
                dsir.log_diff[~finite] = 0.0  # those columns are replaced by zeros below
            dsir.compute_importance_weights()
            shards = len(dsir._get_virtually_sharded_datasets(dsir.raw_datasets))
            logw = _unshard(dsir.log_importance_weights_dir, shards, n, len(target_sets) if multi else None)
            cols = [logw[:, k].copy() for k in range(len(target_sets))] if multi else [logw]
            if self.min_example_length > 0:
                lengths = _unshard(dsir.perexample_metadata_dir, shards, n)
                short = ~dsir.perexample_metadata_filter(lengths)
                for col in cols:
                    col[short] = -np.inf
            return [col if ok else np.zeros(n, dtype=np.float64) for col, ok in zip(cols, finite, strict=True)]

    def _score_targets(self, pool: Iterable[Record]) -> dict[str, np.ndarray]:
        """Scores per target (key ``""`` for one target), in pool order."""
        if not self._targets:
            raise RuntimeError("call fit() before score()")
        sets = self._target_texts or {"": self._targets}
        texts = [record_text(r, self.scope) for r in pool]
        n = len(texts)
        if n == 0:
            weights = [np.zeros(0, dtype=np.float64) for _ in sets]
        else:
            weights = self._log_weights(texts, list(sets.values()))
        self.log_weights = weights[0]
        self.target_log_weights = dict(zip(sets, weights, strict=True)) if self._target_texts else {}
        noise = None
        if self.mode == "resample":
            rng = np.random.Generator(np.random.PCG64(self.seed))
            noise = rng.gumbel(size=n)
        out = {}
        for name, logw in zip(sets, weights, strict=True):
            scores = logw.copy()
            if noise is not None:
                scores += noise
            out[name] = scores
        return out

    def _named_targets(self) -> bool:
        return bool(self._target_texts)

    def settings(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "num_buckets": self.num_buckets,
            "ngrams": self.ngrams,
            "seed": self.seed,
            "scope": self.scope,
            "min_example_length": self.min_example_length,
            "num_proc": self.num_proc,
        }
