"""Baseline selection methods (TRIM App. C). Other baseline families add their own dicts."""

from __future__ import annotations

from coreselect.methods.base import SelectionMethod
from coreselect.methods.baselines.bm25 import BM25Method
from coreselect.methods.baselines.dsir import DSIRMethod
from coreselect.methods.baselines.random import RandomMethod

LEXICAL: dict[str, type[SelectionMethod]] = {
    "random": RandomMethod,
    "bm25": BM25Method,
    "dsir": DSIRMethod,
}

__all__ = ["LEXICAL", "BM25Method", "DSIRMethod", "RandomMethod"]
