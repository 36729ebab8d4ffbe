"""DSIR baseline: hashed n-gram importance weights, via the authors' ``data_selection``."""

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
from coreselect.methods.base import SelectionMethod
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


def _unshard(directory: Path, num_shards: int, n: int) -> np.ndarray:
    """Undo ``data_selection``'s virtual sharding: shard j holds examples j, j+S, j+2S..."""
    out = np.empty(n, dtype=np.float64)
    for j in range(num_shards):
        out[j::num_shards] = np.load(directory / f"{j}.npy")
    return out


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
class DSIRMethod(SelectionMethod):
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
    """

    name: ClassVar[str] = "dsir"

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
        self.log_weights: np.ndarray | None = None  # last pool's noiseless log-weights

    def fit(self, target: Sequence[Record]) -> DSIRMethod:
        self._targets = [record_text(r, self.scope) for r in target]
        if not self._targets:
            raise ValueError("DSIR needs at least one target example")
        return self

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        if not self._targets:
            raise RuntimeError("call fit() before score()")
        texts = [record_text(r, self.scope) for r in pool]
        n = len(texts)
        if n == 0:
            self.log_weights = np.zeros(0, dtype=np.float64)
        else:
            with tempfile.TemporaryDirectory(prefix="coreselect-dsir-") as tmp:
                d = Path(tmp)
                _write_jsonl(d / "raw.jsonl", texts)
                _write_jsonl(d / "target.jsonl", self._targets)
                dsir = HashedNgramDSIR(
                    raw_datasets=[str(d / "raw.jsonl")],
                    target_datasets=[str(d / "target.jsonl")],
                    cache_dir=str(d / "cache"),
                    num_proc=self.num_proc,
                    ngrams=self.ngrams,
                    num_buckets=self.num_buckets,
                    min_example_length=self.min_example_length,
                )
                dsir.tokenizer = _wordpunct  # same tokenization, picklable (see above)
                with np.errstate(invalid="ignore"):
                    dsir.fit_importance_estimator(num_tokens_to_fit="all")
                if not np.all(np.isfinite(dsir.log_diff)):
                    # pool or target has no tokens at all: no information, equal weights
                    logw = np.zeros(n, dtype=np.float64)
                else:
                    dsir.compute_importance_weights()
                    shards = len(dsir._get_virtually_sharded_datasets(dsir.raw_datasets))
                    logw = _unshard(dsir.log_importance_weights_dir, shards, n)
                    if self.min_example_length > 0:
                        lengths = _unshard(dsir.perexample_metadata_dir, shards, n)
                        logw[~dsir.perexample_metadata_filter(lengths)] = -np.inf
            self.log_weights = logw
        scores = self.log_weights.copy()
        if self.mode == "resample":
            rng = np.random.Generator(np.random.PCG64(self.seed))
            scores += rng.gumbel(size=n)
        return scores

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
