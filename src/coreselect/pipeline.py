"""``select`` and ``fingerprint``: read -> fit -> engine.score -> finalize -> write.

Nothing here knows a method by name: the method's registered capabilities decide whether a
model is loaded, its ``save_state`` / ``load_state`` carry the fit across resumes and Ray
actors, and the engine (:mod:`coreselect.engine`) decides where the pool is scored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coreselect.config import SelectArgs, args_from_dict
from coreselect.engine.base import Engine, EngineJob, Scored
from coreselect.errors import ConfigError
from coreselect.io import write_json
from coreselect.methods import registry
from coreselect.methods.base import SelectionMethod, peak_memory_mb
from coreselect.methods.multi import PerTarget
from coreselect.runlock import RunLock
from coreselect.runtime import (
    ModelContext,
    iter_pool,
    load_context,
    make_method,
    read_target,
    read_targets,
    scan_pool,
    versions,
)
from coreselect.selection import (
    check_coverage,
    check_out_dir,
    check_shard_out_dir,
    chunk_records,
    clear_outputs,
    finalize_multi,
    finalize_scores,
    parse_budget,
    remove_stale_temp,
    selected_indices,
    write_coreset,
)

log = logging.getLogger("coreselect")


def engine_for(args: SelectArgs) -> Engine:
    """The engine ``args`` ask for (Ray is imported only when asked)."""
    from coreselect.engine.local import LocalEngine, ShardedEngine

    if args.engine == "ray":
        from coreselect.engine.ray_engine import RayEngine

        return RayEngine()
    return ShardedEngine(args.num_shards, args.shard_index) if args.num_shards > 1 else LocalEngine()


def select(args: SelectArgs | None = None, /, **kwargs: Any) -> dict[str, Any]:
    """Rank the pool with ``args.method`` and write the top ``budget`` as the coreset.

    Call it with a :class:`SelectArgs` or with its fields (and the method's options) as
    keywords (``coreselect.select(pool=[...], target=[...], out="runs/x", budget="5%")``).
    Returns the ``run.json`` dictionary. The output folder is locked for the run's lifetime
    (:class:`coreselect.runlock.RunLock`): a second run into it fails with the holder's pid.
    """
    if args is None:
        args = args_from_dict(SelectArgs, kwargs, source="coreselect.select()")
    elif kwargs:
        raise ConfigError("pass either a SelectArgs or keyword arguments to select(), not both")
    t_start = time.perf_counter()
    args.validate()
    out, n_sh, i_sh = Path(args.out), args.num_shards, args.shard_index
    if n_sh > 1:
        check_shard_out_dir(out, n_sh, i_sh, overwrite=args.overwrite, resume=args.resume)
    else:
        check_out_dir(out, overwrite=args.overwrite, resume=args.resume)
    with RunLock(out, i_sh if n_sh > 1 else None, takeover=args.resume or args.overwrite):
        return _select_locked(args, out, t_start)


def _select_locked(args: SelectArgs, out: Path, t_start: float) -> dict[str, Any]:
    """The body of :func:`select`, run while this process holds the output folder's lock."""
    if args.overwrite:
        clear_outputs(out, args.num_shards, args.shard_index)
    if args.resume or args.overwrite:
        remove_stale_temp(out, args.num_shards, args.shard_index)  # what a killed run was writing
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    targets = read_targets(args)
    target = [r for recs in targets.values() for r in recs]
    n_pool, rejects = scan_pool(args)
    k = parse_budget(args.budget, n_pool)
    if rejects.count:
        rejects.write(out / "rejects.jsonl")
    timings["read_s"] = time.perf_counter() - t0

    ctx = load_context(args, out, n_pool) if registry.get(args.method).needs_model else None
    method = make_method(args, ctx)
    if len(targets) > 1 and not method.multi_target:  # generic fallback: one instance per target
        method = PerTarget(lambda: make_method(args, ctx), list(targets))
    method.target_names = list(targets)
    t0 = time.perf_counter()
    if not (args.resume and method.load_state(out)):
        method.fit_targets(targets or {"target": target})
    method.save_state(out)
    timings["fit_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scored = engine_for(args).score(method, EngineJob(args, out, n_pool, ctx))
    timings["score_s"] = time.perf_counter() - t0
    if scored.table is None:
        return _write_shard_run(args, out, method, ctx, n_pool, scored, timings, t_start)
    check_coverage(scored.table, n_pool, str(out))

    t0 = time.perf_counter()
    multi: dict[str, Any] | None = None
    if len(targets) > 1:
        table, multi = finalize_multi(scored.table, k, out, list(targets), args.combine, args.quota)
        multi["sizes"] = {n: len(recs) for n, recs in targets.items()}
    else:
        table = finalize_scores(scored.table, k, out)
    chosen = selected_indices(table)
    write_coreset(iter_pool(args), chosen, out)
    timings["write_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    scores = table.column("score").to_numpy()
    info = run_info(
        args,
        method,
        ctx,
        timings,
        {
            "pool": n_pool,
            "target": len(target),
            "selected": len(chosen),
            "rejected": rejects.count,
            "scored_minus_inf": int((scores == float("-inf")).sum()),
            "truncated": method.n_truncated,
            "resumed_shards": scored.resumed_shards,
        },
    )
    info["engine"] = scored.info
    if multi is not None:
        info["targets"] = multi
    info.update(method.run_info(table, info))  # method-specific run.json keys (P2D: "aer")
    write_json(out / "run.json", info)
    if method.n_truncated:
        log.warning("%d records longer than max_length=%d were truncated", method.n_truncated, args.max_length)
    return info


def run_info(
    args: SelectArgs,
    method: SelectionMethod,
    ctx: ModelContext | None,
    timings: dict[str, float],
    counts: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The run.json keys of every ``select`` run (whole run or one shard process); settles the method's cost."""
    method.cost.wall_s = timings["fit_s"] + timings["score_s"]
    method.cost.peak_memory_mb = max(
        method.cost.peak_memory_mb, peak_memory_mb(ctx.runner.device if ctx is not None else "cpu")
    )
    info = {
        "command": "select",
        "method": args.method,
        **extra,
        "settings": args.settings(),
        "method_settings": method.settings(),
        "versions": versions(),
        "counts": counts,
        "timings": timings,
        "cost": asdict(method.cost),
        "stats": method.stats,
    }
    if ctx is not None:
        from coreselect.models.loading import model_name

        info["model"] = {
            "name": args.model,
            "resolved": model_name(ctx.model),
            "dtype": str(next(ctx.model.parameters()).dtype),
            "device": str(ctx.runner.device),
            "warmup": ctx.warmup,
        }
    return info


def _write_shard_run(
    args: SelectArgs,
    out: Path,
    method: SelectionMethod,
    ctx: ModelContext | None,
    n_pool: int,
    scored: Scored,
    timings: dict[str, float],
    t_start: float,
) -> dict[str, Any]:
    """``--num-shards N > 1``: record what this process scored; ``coreselect merge`` finalizes."""
    timings["total_s"] = time.perf_counter() - t_start
    shard = {
        "num_shards": args.num_shards,
        "shard_index": args.shard_index,
        "chunks": scored.chunks,
        "records": chunk_records(scored.chunks, args.shard_records, n_pool),
    }
    counts = {"pool": n_pool, "selected": 0, "truncated": method.n_truncated, "resumed_shards": scored.resumed_shards}
    info = run_info(args, method, ctx, timings, counts, shard=shard)
    write_json(out / f"run-shard-{args.shard_index}.json", info)
    return info


def fingerprint(args: SelectArgs) -> dict[str, Any]:
    """Stage I only: warmup (if asked), then write ``fingerprints.safetensors`` and ``run.json``."""
    args.method = "trim"
    args.validate(need_pool=args.warmup == "auto")
    if len(args.target_sets()) > 1:
        raise ConfigError("coreselect fingerprint takes one target; several named targets: use select")
    out = Path(args.out)
    check_out_dir(out, overwrite=args.overwrite, resume=args.resume)
    with RunLock(out, takeover=args.resume or args.overwrite):
        target = read_target(args)
        n_pool = scan_pool(args)[0] if args.warmup == "auto" else 0
        ctx = load_context(args, out, n_pool)
        method = make_method(args, ctx)
        method.fit_targets({"target": target})
        method.save_state(out)
        info = {
            "command": "fingerprint",
            "settings": args.settings(),
            "versions": versions(),
            "counts": {"target": len(target), "classes": method.stats.get("stage1", {}).get("n_classes", 0)},
            "stats": method.stats,
            "model": {"name": args.model, "warmup": ctx.warmup},
        }
        write_json(out / "run.json", info)
    return info
