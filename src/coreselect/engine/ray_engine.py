"""``--engine ray``: scoring on a Ray Data actor pool (one model per actor), any streaming method.

The driver (``select``) runs the warmup and the method's ``fit`` once and saves its state
into the run folder (``save_state``: TRIM fingerprints, P2D heads, RDS target vectors). Then:

1. the pool is streamed once on the driver into ``DIR/ray/input/part-NNNNN.parquet``
   (pool position, id, source, kind, messages as JSON; ``shard_records`` rows a file) and
   read back with ``ray.data.read_parquet``, so workers never need the driver's memory
   and pool positions stay global;
2. ``map_batches`` runs :class:`MethodScorer` on ``ray_actors`` actors (``num_gpus=1`` each
   when CUDA is available, else ``num_cpus=1``); each actor loads the model (+ adapter),
   builds the method from the run's settings, restores its state (``load_state``; a
   method without saved state fits on the target again) and scores each batch with the
   public :meth:`~coreselect.methods.base.SelectionMethod.score_batch`;
3. ``write_parquet`` writes the per-record scores to ``DIR/ray/scores/``; the driver
   reads them back and the usual global ranking (``finalize_scores``) follows.

Several named targets (``--target a=F b=G``): each actor builds the method as ``select``
does (TRIM natively, other methods wrapped in :class:`~coreselect.methods.multi.PerTarget`),
restores every target's saved state and returns a ``score_<name>`` column per target; the
driver combines them (``finalize_multi``) like a local run.

For a multi-node cluster ``DIR`` must be on storage every node sees (NFS, a mounted
bucket), and every node needs coreselect installed (see docs/distributed.md).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from coreselect.config import SelectArgs
from coreselect.engine.base import Engine, EngineJob, Scored
from coreselect.errors import CoreselectError
from coreselect.methods.base import SelectionMethod
from coreselect.runtime import iter_pool

INPUT_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("messages", pa.string()),
    ]
)


class MethodScorer:
    """Ray Data callable class: one per actor; builds the model and the fitted method once.

    Args:
        settings: the run's ``SelectArgs.settings()`` (method, model, options, ...).
        adapter: the warmup adapter the driver's model used, or ``None``.
        state_dir: the run folder holding the method's saved state.
        torch_threads: torch threads per actor on CPU (0 = leave torch's default).
    """

    def __init__(self, settings: dict[str, Any], adapter: str | None, state_dir: str, torch_threads: int = 0) -> None:
        import torch

        from coreselect.methods.multi import PerTarget
        from coreselect.runtime import load_context, make_method, read_targets

        if torch_threads:
            torch.set_num_threads(torch_threads)
        args = SelectArgs.from_settings(
            {**settings, "warmup": adapter or "none", "progress": False, "resume": False, "overwrite": False}
        )
        ctx = load_context(args, Path(state_dir), 0) if _needs_model(args.method) else None
        targets = read_targets(args)
        self.method: SelectionMethod = make_method(args, ctx)
        if len(targets) > 1 and not self.method.multi_target:  # as select does: one instance per target
            self.method = PerTarget(lambda: make_method(args, ctx), list(targets))
        self.method.target_names = list(targets)
        self.target_names = list(targets) if len(targets) > 1 else []
        if not self.method.load_state(Path(state_dir)):
            self.method.fit_targets(targets or {"target": []})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from coreselect.data.records import Message, Record

        # the arg-type ignore: ``kind`` comes back from the staged parquet as a plain str (a Record's "chat" / "text")
        records = [
            Record(
                index=int(i),
                id=str(rid),
                source=str(src),
                raw={},
                kind=str(kind),  # type: ignore[arg-type]
                messages=tuple(Message(m["role"], m["content"]) for m in json.loads(msgs)),
            )
            for i, rid, src, kind, msgs in zip(
                batch["index"], batch["id"], batch["source"], batch["kind"], batch["messages"]
            )
        ]
        before = self.method.n_truncated
        chunk = self.method.score_batch(records)
        truncated = np.zeros(len(records), dtype=np.int64)
        if len(records):
            truncated[0] = self.method.n_truncated - before  # summed by the driver
        return {
            "index": chunk.index.astype(np.int64),
            "id": np.array(chunk.ids, dtype=object),
            "source": np.array(chunk.sources, dtype=object),
            "n_tokens": chunk.n_tokens.astype(np.int64),
            "n_scored": chunk.n_scored.astype(np.int64),
            "score": chunk.score.astype(np.float64),
            **{f"score_{n}": np.asarray(chunk.targets[n], dtype=np.float64) for n in self.target_names},
            "truncated": truncated,
        }


def _needs_model(method: str) -> bool:
    from coreselect.methods import registry

    return registry.get(method).needs_model


def stage_pool(args: SelectArgs, folder: Path) -> int:
    """Stream the pool into parquet parts Ray can read (global pool positions kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    n = part = 0

    def flush() -> None:
        nonlocal rows, part
        if rows:
            pq.write_table(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), folder / f"part-{part:05d}.parquet")
            part += 1
            rows = []

    for r in iter_pool(args):
        rows.append(
            {
                "index": r.index,
                "id": r.id,
                "source": r.source,
                "kind": r.kind,
                "messages": json.dumps(
                    [{"role": m.role, "content": m.content} for m in r.messages], ensure_ascii=False
                ),
            }
        )
        n += 1
        if len(rows) >= args.shard_records:
            flush()
    flush()
    return n


def score_with_ray(args: SelectArgs, out: Path, ctx: Any, method: SelectionMethod) -> tuple[pa.Table, dict[str, Any]]:
    """The scoring of ``select --engine ray``; returns the score table (SCORE_SCHEMA) and engine info."""
    try:
        import ray
    except ImportError:
        raise CoreselectError("--engine ray needs Ray Data: pip install 'ray[data]'") from None
    from coreselect.selection import SCORE_SCHEMA

    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=args.ray_address, log_to_driver=False, include_dashboard=False)
    work = out / "ray"
    shutil.rmtree(work, ignore_errors=True)  # no partial resume: Stage II is rescored as a whole
    n = stage_pool(args, work / "input")

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 and args.device != "cpu"
    actors = args.ray_actors or (gpus if use_gpu else 1)
    if use_gpu:
        res: dict[str, float] = {"num_gpus": 1}
    else:
        # leave one CPU for Ray Data's read / write tasks, or the actors starve them
        cpus = float(resources.get("CPU", 1))
        res = {"num_cpus": 1.0 if actors <= cpus - 1 else max(cpus - 1, cpus / 2) / actors}
    adapter = ctx.warmup.get("adapter") if ctx is not None else None
    settings = {**args.settings(), "device": "auto" if use_gpu else "cpu"}
    n_parts = len(list((work / "input").glob("part-*.parquet")))
    ds = ray.data.read_parquet(str((work / "input").resolve()), override_num_blocks=max(n_parts, 1))
    scored = ds.map_batches(
        MethodScorer,
        fn_constructor_kwargs={
            "settings": settings,
            "adapter": adapter,
            "state_dir": str(out.resolve()),
            "torch_threads": 0 if use_gpu else 1,
        },
        batch_size=args.shard_records,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=res.get("num_cpus"),
        num_gpus=res.get("num_gpus"),
    )
    scored.write_parquet(str((work / "scores").resolve()))
    table = pq.read_table(work / "scores").sort_by("index")
    n_trunc = int(np.asarray(table.column("truncated")).sum()) if "truncated" in table.column_names else 0
    names = list(args.target_sets()) if len(args.target_sets()) > 1 else []
    schema = pa.schema([*SCORE_SCHEMA, *(pa.field(f"score_{n}", pa.float64()) for n in names)])
    table = table.select(schema.names).cast(schema)
    dt = time.perf_counter() - t0
    tokens = int(table.column("n_tokens").to_numpy().sum())
    method.n_truncated += n_trunc
    method.cost.forward_passes += table.num_rows
    method.stats["stage2"] = {"wall_s": dt, "tokens": tokens, "tokens_per_s": tokens / max(dt, 1e-9)}
    return table, {"name": "ray", "actors": actors, "actor_resources": res, "records": n, "address": args.ray_address}


class RayEngine(Engine):
    """``--engine ray``: see the module doc. No partial resume: the pool is rescored as a whole."""

    name: ClassVar[str] = "ray"

    def score(self, method: SelectionMethod, job: EngineJob) -> Scored:
        table, info = score_with_ray(job.args, job.out, job.model, method)
        return Scored(table, info)
