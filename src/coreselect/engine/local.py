"""``--engine local``: score in this process, shard by shard, resuming complete shards."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pyarrow.parquet as pq

from coreselect.engine.base import Engine, EngineJob, Scored
from coreselect.errors import CoreselectError
from coreselect.methods.base import SelectionMethod
from coreselect.runtime import iter_pool
from coreselect.selection import (
    chunk_records,
    existing_shards,
    plan_shards,
    read_scores,
    write_shard,
)


class LocalEngine(Engine):
    """Streaming methods: shard ``j`` = pool positions ``[j*S, (j+1)*S)`` (``S`` =
    ``--shard-records``), each written as it finishes, so ``--resume`` skips complete shards.
    Whole-pool methods score in one go (resume restarts them unless every shard is there)."""

    name: ClassVar[str] = "local"
    num_shards: int = 1
    shard_index: int = 0

    def score(self, method: SelectionMethod, job: EngineJob) -> Scored:
        args, out, n_pool = job.args, job.out, job.n_pool
        if method.streaming:
            n_done, mine = self._stream(method, job)
        else:
            n_done, mine = self._whole(method, job), []
        if self.num_shards > 1:
            return Scored(None, {"name": self.name}, n_done, mine)
        shards = existing_shards(out)
        table = read_scores([shards[i] for i in sorted(shards)])
        if table.num_rows != n_pool:
            raise CoreselectError(
                f"{out}: score shards hold {table.num_rows} rows but the pool has {n_pool} "
                "(the pool changed since the interrupted run; use --overwrite)"
            )
        return Scored(table, {"name": args.engine}, n_done, mine)

    def _stream(self, method: SelectionMethod, job: EngineJob) -> tuple[int, list[int]]:
        args, out, n_pool, S = job.args, job.out, job.n_pool, job.args.shard_records
        done, todo = plan_shards(out, n_pool, S, self.num_shards, self.shard_index, resume=args.resume)
        if todo:
            wanted = set(todo)
            remaining = (r for r in iter_pool(args, todo[0] * S) if r.index // S in wanted)
            chunks = method.score_chunks(remaining, total=chunk_records(todo, S, n_pool), chunk_records=S)
            for j, chunk in zip(todo, chunks, strict=True):
                if len(chunk.index) and int(chunk.index[0]) != j * S:
                    raise CoreselectError(f"internal error: chunk for shard {j} starts at {chunk.index[0]}")
                write_shard(out, j, chunk)
        return len(done), sorted(done + todo)

    def _whole(self, method: SelectionMethod, job: EngineJob) -> int:
        """Whole-pool methods restart scoring unless a previous run left every shard."""
        done = existing_shards(job.out) if job.args.resume else {}
        n_done = 0
        while n_done in done:
            n_done += 1
        if sum(_rows(done[i]) for i in range(n_done)) < job.n_pool:
            n_done = 0
            for j, chunk in enumerate(method.score_chunks(iter_pool(job.args))):
                write_shard(job.out, j, chunk)
        return n_done


class ShardedEngine(LocalEngine):
    """``--num-shards N --shard-index I``: this process scores the shards ``j % N == I`` and
    stops; ``coreselect merge`` ranks once every process is done."""

    name: ClassVar[str] = "sharded"

    def __init__(self, num_shards: int, shard_index: int) -> None:
        self.num_shards, self.shard_index = num_shards, shard_index


def _rows(path: Path) -> int:
    return int(pq.ParquetFile(path).metadata.num_rows)
