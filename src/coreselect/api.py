"""The Python API, re-exported from the modules that own it (nothing in the package imports
this module; it is for users).

``select(SelectArgs(...))`` runs Algorithm 3 of the TRIM paper (warmup -> Stage I ->
Stage II -> selection) or any other registered method, and writes the outputs described
in :mod:`coreselect.selection`. See docs/architecture.md for where each step lives.
"""

from __future__ import annotations

from coreselect.config import SelectArgs, WarmupSettings, args_from_dict, known_methods
from coreselect.coreset import load_coreset
from coreselect.pipeline import fingerprint, select
from coreselect.runtime import (
    ModelContext,
    iter_pool,
    load_context,
    make_method,
    read_target,
    scan_pool,
    versions,
    warmup_model,
)

__all__ = [
    "ModelContext",
    "SelectArgs",
    "WarmupSettings",
    "args_from_dict",
    "fingerprint",
    "iter_pool",
    "known_methods",
    "load_context",
    "load_coreset",
    "make_method",
    "read_target",
    "scan_pool",
    "select",
    "versions",
    "warmup_model",
]
