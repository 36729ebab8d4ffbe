"""``--engine ray``: TRIM Stage II on a Ray Data actor pool (one model per actor).

The driver (``select``) runs the warmup and Stage I once and saves the fingerprints. Then:

1. the pool is streamed once on the driver into ``DIR/ray/input/part-NNNNN.parquet``
   (pool position, id, source, kind, messages as JSON; ``shard_records`` rows a file) and
   read back with ``ray.data.read_parquet``, so workers never need the driver's memory
   and pool positions stay global;
2. ``map_batches`` runs :class:`TrimScorer` on ``ray_actors`` actors (``num_gpus=1`` each
   when CUDA is available, else ``num_cpus=1``); each actor loads the model (+ adapter)
   and the fingerprints file once, tokenizes its batch with
   :class:`~coreselect.data.formatting.Formatter` and scores it with
   :meth:`TrimMethod._score_encoded <coreselect.methods.trim.TrimMethod._score_encoded>`;
3. ``write_parquet`` writes the per-record scores to ``DIR/ray/scores/``; the driver
   reads them back and the usual global ranking (``finalize_scores``) follows.

For a multi-node cluster ``DIR`` must be on storage every node sees (NFS, a mounted
bucket), and every node needs coreselect installed (see docs/distributed.md).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from coreselect.errors import CoreselectError

INPUT_SCHEMA = pa.schema([("index", pa.int64()), ("id", pa.string()), ("source", pa.string()),
                          ("kind", pa.string()), ("messages", pa.string())])


class TrimScorer:
    """Ray Data callable class: one per actor; loads the model and fingerprints once."""

    def __init__(self, model: str, adapter: str | None, fingerprints: str, config: dict[str, Any],
                 dtype: str = "auto", device: str = "auto", max_length: int = 2048, template: str = "auto",
                 trust_remote_code: bool = False, torch_threads: int = 0,
                 template_date: str = "26 Jul 2024") -> None:
        import torch

        from coreselect.data.formatting import Formatter
        from coreselect.methods.trim import Fingerprints, TrimConfig, TrimMethod
        from coreselect.models.loading import load_model
        from coreselect.models.runner import ModelRunner

        if torch_threads:
            torch.set_num_threads(torch_threads)
        m, tok = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, adapter=adapter)
        self.formatter = Formatter(tok, max_length, template, template_date=template_date)  # type: ignore[arg-type]
        self.method = TrimMethod(ModelRunner(m, tok), self.formatter, TrimConfig(**config), progress=False)
        self.method.set_fingerprints(Fingerprints.load(fingerprints))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from coreselect.data.records import Message, Record

        records = [
            Record(index=int(i), id=str(rid), source=str(src), raw={}, kind=str(kind),  # type: ignore[arg-type]
                   messages=tuple(Message(m["role"], m["content"]) for m in json.loads(msgs)))
            for i, rid, src, kind, msgs in zip(batch["index"], batch["id"], batch["source"], batch["kind"],
                                               batch["messages"])
        ]
        encoded = [self.formatter.encode(r) for r in records]
        scores, n_scored = self.method._score_encoded(encoded)
        return {
            "index": np.array([r.index for r in records], dtype=np.int64),
            "id": np.array([r.id for r in records], dtype=object),
            "source": np.array([r.source for r in records], dtype=object),
            "n_tokens": np.array([len(e) for e in encoded], dtype=np.int64),
            "n_scored": n_scored.astype(np.int64),
            "score": scores.astype(np.float64),
            "truncated": np.array([bool(e.truncated) for e in encoded]),
        }


def stage_pool(args: Any, folder: Path) -> int:
    """Stream the pool into parquet parts Ray can read (global pool positions kept)."""
    from coreselect.api import iter_pool

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
        rows.append({"index": r.index, "id": r.id, "source": r.source, "kind": r.kind,
                     "messages": json.dumps([{"role": m.role, "content": m.content} for m in r.messages],
                                            ensure_ascii=False)})
        n += 1
        if len(rows) >= args.shard_records:
            flush()
    flush()
    return n


def score_with_ray(args: Any, out: Path, fp_path: Path, ctx: Any, method: Any) -> tuple[pa.Table, dict[str, Any]]:
    """Stage II of ``select --engine ray``; returns the score table (SCORE_SCHEMA) and engine info."""
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
    cfg = method.settings()
    n_parts = len(list((work / "input").glob("part-*.parquet")))
    ds = ray.data.read_parquet(str((work / "input").resolve()), override_num_blocks=max(n_parts, 1))
    scored = ds.map_batches(
        TrimScorer,
        fn_constructor_kwargs={
            "model": args.model, "adapter": adapter, "fingerprints": str(fp_path.resolve()), "config": cfg,
            "dtype": args.dtype, "device": "auto" if use_gpu else "cpu", "max_length": args.max_length,
            "template": args.template, "template_date": args.template_date, "trust_remote_code": args.trust_remote_code,
            "torch_threads": 0 if use_gpu else 1,
        },
        batch_size=args.shard_records, batch_format="numpy", concurrency=actors, **res,
    )
    scored.write_parquet(str((work / "scores").resolve()))
    table = pq.read_table(work / "scores").sort_by("index")
    n_trunc = int(np.asarray(table.column("truncated")).sum()) if "truncated" in table.column_names else 0
    table = table.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)
    dt = time.perf_counter() - t0
    tokens = int(table.column("n_tokens").to_numpy().sum())
    method.n_truncated += n_trunc
    method.cost.forward_passes += table.num_rows
    method.stats["stage2"] = {"wall_s": dt, "tokens": tokens, "tokens_per_s": tokens / max(dt, 1e-9)}
    return table, {"name": "ray", "actors": actors, "actor_resources": res, "records": n,
                   "address": args.ray_address}
