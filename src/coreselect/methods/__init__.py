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


# ---- model-based baselines (TRIM App. C): RDS, LESS, TAGCOS, S2L, CLD
def _model_baseline(name: str) -> Factory:
    def factory(args: Any, ctx: Any) -> Any:
        from coreselect.methods.baselines.model_based import build

        return build(name, args, ctx)

    factory.__name__ = f"_{name}"
    return factory


_rds, _less, _tagcos, _s2l, _cld = (_model_baseline(n) for n in ("rds", "less", "tagcos", "s2l", "cld"))
FACTORIES.update({"rds": _rds, "less": _less, "tagcos": _tagcos, "s2l": _s2l, "cld": _cld})
MODEL_BASED |= {"rds", "less", "tagcos", "s2l", "cld"}


# ---- P2D (paper 003): task-sensitive heads pick the data
def _p2d(args: Any, ctx: Any) -> Any:
    from coreselect.methods.p2d import P2DConfig, P2DMethod

    opts = dict(args.method_options)
    cfg = P2DConfig(heads=opts.pop("heads", getattr(args, "heads", "auto")),
                    head_fraction=float(opts.pop("head_fraction", getattr(args, "head_fraction", 0.1))),
                    scope=args.scope, seed=args.seed, oov_penalty=args.oov_penalty, w_mean=args.w_mean,
                    w_max=args.w_max, coverage_weight=args.coverage_weight, w_row=args.w_row, w_col=args.w_col,
                    batch_tokens=args.batch_tokens, chunk_records=args.shard_records, **opts)
    return P2DMethod(ctx.runner, ctx.formatter, cfg, model_name=args.model, out_dir=args.out, progress=args.progress)


FACTORIES["p2d"] = _p2d
MODEL_BASED.add("p2d")
