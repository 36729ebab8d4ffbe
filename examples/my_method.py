"""A complete selection method: word overlap with the target vocabulary.

A pool record scores the share of its distinct words that occur anywhere in the target
examples. Each record's score depends on itself alone, so the method is ``streaming``: it
runs on every engine (local shards with resume, ``--num-shards``, ``--engine ray``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from coreselect.data.records import Record
from coreselect.data.text import record_text
from coreselect.errors import ConfigError
from coreselect.io import write_json
from coreselect.methods.base import SelectionMethod
from coreselect.methods.registry import register

WORD = re.compile(r"\w+")


@dataclass
class OverlapConfig:
    """Options of ``overlap`` (each field is a ``--flag`` and a YAML key).

    Attributes:
        scope: turns that form the text: ``all``, ``prompt`` or ``response``.
        min_words: records with fewer distinct words score -inf.
    """

    scope: str = "all"
    min_words: int = 1

    def __post_init__(self) -> None:
        if self.scope not in ("all", "prompt", "response"):
            raise ConfigError(f"scope must be all, prompt or response, got {self.scope!r}")
        if self.min_words < 1:
            raise ConfigError(f"min_words must be >= 1, got {self.min_words}")


def words(record: Record, scope: str) -> set[str]:
    return set(WORD.findall(record_text(record, scope).lower()))  # type: ignore[arg-type]


@register("overlap", config=OverlapConfig)
class OverlapMethod(SelectionMethod):
    """Share of a record's distinct words found in the target vocabulary."""

    streaming: ClassVar[bool] = True

    def __init__(self, scope: str = "all", min_words: int = 1) -> None:
        super().__init__()
        self.scope, self.min_words = scope, min_words
        self.vocab: set[str] = set()

    def fit(self, target: Sequence[Record]) -> OverlapMethod:
        if not target:
            raise ConfigError("overlap needs at least one target example")
        self.vocab = set().union(*(words(r, self.scope) for r in target))
        return self

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        out = []
        for r in pool:
            w = words(r, self.scope)
            out.append(len(w & self.vocab) / len(w) if len(w) >= self.min_words else -np.inf)
        return np.array(out, dtype=np.float64)

    def save_state(self, out: Path) -> list[Path]:
        write_json(out / "overlap_vocab.json", sorted(self.vocab))  # atomic, same file mode as every output
        return [out / "overlap_vocab.json"]

    def load_state(self, out: Path) -> bool:
        path = out / "overlap_vocab.json"
        if not path.is_file():
            return False
        self.vocab = set(json.loads(path.read_text(encoding="utf-8")))
        return True

    def settings(self) -> dict[str, object]:
        return {"scope": self.scope, "min_words": self.min_words}
