"""Method registry: ``--method NAME`` -> a factory ``(SelectArgs, ModelContext | None) -> SelectionMethod``.

A method module registers itself by adding an entry to :data:`FACTORIES` (model-based
methods also to :data:`MODEL_BASED`). Factories import lazily so ``import coreselect``
stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Factory = Callable[[Any, Any], Any]


def _trim(args: Any, ctx: Any) -> Any:
    from coreselect.api import trim_config
    from coreselect.methods.trim import TrimMethod

    return TrimMethod(ctx.runner, ctx.formatter, trim_config(args), progress=args.progress)


def _random(args: Any, ctx: Any) -> Any:
    from coreselect.methods.baselines.random import RandomMethod

    return RandomMethod(seed=args.seed, **args.method_options)


def _bm25(args: Any, ctx: Any) -> Any:
    from coreselect.methods.baselines.bm25 import BM25Method

    return BM25Method(scope=args.scope, **args.method_options)


def _dsir(args: Any, ctx: Any) -> Any:
    from coreselect.methods.baselines.dsir import DSIRMethod

    return DSIRMethod(seed=args.seed, scope=args.scope, **args.method_options)


FACTORIES: dict[str, Factory] = {"trim": _trim, "random": _random, "bm25": _bm25, "dsir": _dsir}
MODEL_BASED: set[str] = {"trim"}


def registry() -> dict[str, Factory]:
    return dict(FACTORIES)


def needs_model(name: str) -> bool:
    return name in MODEL_BASED
