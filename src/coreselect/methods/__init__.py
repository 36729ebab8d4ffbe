"""Selection methods. Each registers itself (:mod:`coreselect.methods.registry`); the
catalog (:mod:`coreselect.methods.catalog`) says which module to import for a name."""

from coreselect.methods.base import (
    MethodContext,
    ScoreChunk,
    SelectionMethod,
    TargetSets,
)
from coreselect.methods.registry import MethodSpec, get, names, register, specs

__all__ = [
    "MethodContext",
    "MethodSpec",
    "ScoreChunk",
    "SelectionMethod",
    "TargetSets",
    "get",
    "names",
    "register",
    "specs",
]
