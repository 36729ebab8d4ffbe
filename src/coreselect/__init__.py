"""coreselect: pick the few instruction-tuning examples worth training on."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_coreset", "select"]


def __getattr__(name: str):  # lazy: keep `import coreselect` cheap (no torch import)
    if name == "select":
        from coreselect.pipeline import select

        return select
    if name == "load_coreset":
        from coreselect.coreset import load_coreset

        return load_coreset
    raise AttributeError(name)
