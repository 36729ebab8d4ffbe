"""The Python API. Every CLI command is a thin wrapper over a function here.

``select(SelectArgs(...))`` runs Algorithm 3 of the TRIM paper (warmup -> Stage I ->
Stage II -> selection) or any other registered method, and writes the outputs described
in :mod:`coreselect.selection`.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from coreselect.data.readers import RejectLog, read_records
from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.io import write_json
from coreselect.runlock import RunLock
from coreselect.methods import MODEL_BASED
from coreselect.methods.base import SelectionMethod, peak_memory_mb
from coreselect.selection import (
    check_coverage,
    check_out_dir,
    check_shard_out_dir,
    chunk_records,
    clear_outputs,
    existing_shards,
    finalize_scores,
    parse_budget,
    plan_shards,
    read_scores,
    remove_stale_temp,
    selected_indices,
    write_coreset,
    write_shard,
)

log = logging.getLogger("coreselect")

#: methods that need the scoring model (an alias of the registry's set)
MODEL_METHODS = MODEL_BASED


def known_methods() -> list[str]:
    from coreselect.methods import registry

    return sorted(registry())


@dataclass
class WarmupSettings:
    """The scorer warmup (paper §3; Table 7 recipe), shared by select, compare and experiment.

    Attributes:
        warmup: ``auto`` (LoRA warmup on a random pool fraction, paper §3), ``none`` (base
            model), or the path of a saved adapter to reuse.
        warmup_fraction: fraction of the pool used for the warmup (paper: ~5%).
        warmup_epochs, warmup_lr, warmup_lora_r, warmup_lora_alpha, warmup_batch_size,
            warmup_grad_accum: the warmup recipe (Table 7 defaults).
    """

    warmup: str = "auto"
    warmup_fraction: float = 0.05
    warmup_epochs: float = 4.0
    warmup_lr: float = 2e-5
    warmup_lora_r: int = 128
    warmup_lora_alpha: int = 512
    warmup_batch_size: int = 2
    warmup_grad_accum: int = 32

    def warmup_settings(self) -> dict[str, Any]:
        """These fields as a dict (to pass them on to another command's args)."""
        return {f.name: getattr(self, f.name) for f in fields(WarmupSettings)}


@dataclass
class SelectArgs(WarmupSettings):
    """Arguments of ``coreselect select`` (YAML config keys are the same names).

    Attributes:
        pool: pool files (JSONL / JSON / Parquet / ``load_from_disk`` folder / hub name); from
            Python also ``datasets.Dataset`` / ``IterableDataset`` objects.
        target: the few target examples (same formats).
        out: output folder.
        method: selection method (``trim``, ``random``, ``bm25``, ``dsir``, ...).
        model: causal LM: folder, ``.gguf`` file, hub id, or ``smollm2`` (the packaged default).
        budget: ``5%`` of the pool or an absolute count.
        layers: last L layers whose attention feeds Stage I (Table 8: 6).
        scope: ``all``, ``prompt`` or ``response`` tokens (App. B.1).
        oov_penalty: lambda of eq. 12, or ``None`` to skip unseen token classes.
        coverage_weight: eta of eq. 15.
        coverage: TRIM's kappa of eq. 15: ``length`` (|M(c)| / (|M(c)| + 32)), ``tokens``
            (|M(c)| / all tokens, template included) or ``content`` (|M(c)| / content tokens);
            see TrimConfig.
        saliency_minmax: TRIM's eq. 6 min-max over the fingerprinted ``scope`` positions or
            ``all`` non-pad positions (where the attention sink sets the max).
        min_context: TRIM fingerprints and scores only tokens with at least this many
            content tokens before them (0 = all; 1 drops each record's first content token,
            whose state depends on that token alone: the shared-prefix rule).
        w_mean, w_max, w_row, w_col: pooling and saliency weights (eq. 7, 15).
        fingerprints: reuse a fingerprints file (skip Stage I).
        heads: P2D's task-sensitive heads: ``auto`` (locate them on the target), ``random``
            (same count, seeded: the falsification test) or a ``heads.json`` file.
        head_fraction: P2D: share of all attention heads used (paper: 10%, at least 1).
        max_length: truncate records longer than this many tokens.
        batch_tokens: padded-token budget per forward batch.
        shard_records: records per score shard (streaming and resume granularity).
        num_shards, shard_index: score only the shard chunks ``j`` with ``j % num_shards ==
            shard_index`` (one process per GPU); with ``num_shards > 1`` nothing is finalized:
            run ``coreselect merge`` once every shard process is done.
        engine: ``local`` (this process) or ``ray`` (Stage II on a Ray Data actor pool).
        ray_address: Ray cluster to join (default: ``RAY_ADDRESS`` or a local Ray).
        ray_actors: scoring actors for ``--engine ray`` (0 = one per GPU, else 1).
        template: ``auto`` / ``chat`` / ``plain`` prompt formatting.
        template_date: the date chat templates see (``date_string`` / ``strftime_now``; Llama 3.x
            writes it into every prompt), fixed so a record renders the same on every day.
        seed: seeds the warmup subset, training and sampling methods.
        dtype, device: ``auto`` = fp32 on CPU, bf16 on GPU.
        trust_remote_code: allow model code from the hub (off unless asked).
        on_bad_record: ``error`` (stop at the first bad record) or ``skip`` (log it to rejects.jsonl).
        overwrite: replace a previous run in ``out``.
        resume: continue an interrupted run in ``out``.
        progress: show progress bars.
        method_options: extra keyword options for the method's constructor.
    """

    pool: list[str] = field(default_factory=list)
    target: list[str] = field(default_factory=list)
    out: str = ""
    method: str = "trim"
    model: str = "smollm2"
    budget: str = "5%"
    layers: int = 6
    scope: str = "all"
    oov_penalty: float | None = 1.0
    coverage_weight: float = 0.05
    coverage: str = "length"
    saliency_minmax: str = "scope"
    min_context: int = 1
    w_mean: float = 0.5
    w_max: float = 0.5
    w_row: float = 0.5
    w_col: float = 0.5
    fingerprints: str | None = None
    heads: str = "auto"
    head_fraction: float = 0.1
    max_length: int = 2048
    batch_tokens: int = 8192
    shard_records: int = 2048
    num_shards: int = 1
    shard_index: int = 0
    engine: str = "local"
    ray_address: str | None = None
    ray_actors: int = 0
    template: str = "auto"
    template_date: str = "26 Jul 2024"
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    on_bad_record: str = "error"
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.pool, str):
            self.pool = [self.pool]
        if isinstance(self.target, str):
            self.target = [self.target]
        from coreselect.data.hf_datasets import as_inputs

        self.pool, self.target = as_inputs(self.pool), as_inputs(self.target)  # Dataset objects: labelled str
        self.budget = str(self.budget)
        if isinstance(self.oov_penalty, str):
            self.oov_penalty = None if self.oov_penalty.lower() in ("none", "null", "") else float(self.oov_penalty)

    def validate(self, *, need_target: bool = True, need_pool: bool = True) -> None:
        """Cheap checks that run before any heavy work."""
        if need_pool and not self.pool:
            raise ConfigError("no pool given (--pool FILE [FILE ...])")
        if need_target and not self.target and self.method != "random" and not self.fingerprints:
            raise ConfigError("no target given (--target FILE)")
        if not self.out:
            raise ConfigError("no output folder given (--out DIR)")
        if self.method not in known_methods():
            raise ConfigError(f"unknown method {self.method!r} (known: {', '.join(known_methods())})")
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"on_bad_record must be error or skip, got {self.on_bad_record!r}")
        from coreselect.data.formatting import parse_template_date

        parse_template_date(self.template_date)  # a bad --template-date fails before the model loads
        if self.scope not in ("all", "prompt", "response"):
            raise ConfigError(f"scope must be all, prompt or response, got {self.scope!r}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        if self.shard_records < 1:
            raise ConfigError(f"shard_records must be >= 1, got {self.shard_records}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"need num_shards >= 1 and 0 <= shard_index < num_shards, "
                              f"got {self.num_shards} / {self.shard_index}")
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"engine must be local or ray, got {self.engine!r}")
        if self.engine == "ray" and self.method != "trim":
            raise ConfigError(f"--engine ray runs TRIM only, not {self.method!r}")
        if self.engine == "ray" and self.num_shards > 1:
            raise ConfigError("--engine ray distributes the pool itself; drop --num-shards")
        if self.num_shards > 1 and self.warmup == "auto":
            raise ConfigError("with --num-shards > 1 pass --warmup none or a saved adapter (train it once first, "
                              "e.g. with coreselect fingerprint --warmup auto)")
        if self.ray_actors < 0:
            raise ConfigError(f"ray_actors must be >= 0, got {self.ray_actors}")
        if not 0 < self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction must be in (0, 1], got {self.warmup_fraction}")
        if self.warmup not in ("auto", "none") and not (Path(self.warmup) / "adapter_config.json").exists():
            raise ConfigError(f"{self.warmup}: --warmup must be auto, none or a saved adapter folder")
        for p in [*self.pool, *self.target]:
            if not isinstance(p, str):
                raise ConfigError(f"pool/target entries must be paths or datasets.Dataset objects, "
                                  f"got {type(p).__name__}")
            local = p.startswith((".", "/", "~")) or Path(p).suffix in (".jsonl", ".json", ".parquet", ".gz")
            if local and not Path(p).expanduser().exists():
                raise CoreselectError(f"{p}: no such file")
        if self.fingerprints and not Path(self.fingerprints).is_file():
            raise CoreselectError(f"{self.fingerprints}: no such fingerprints file")


# ------------------------------------------------------------------------------ helpers


def read_target(args: SelectArgs) -> list[Record]:
    return list(read_records(args.target, on_bad_record="error")) if args.target else []


def scan_pool(args: SelectArgs) -> tuple[int, RejectLog]:
    """First pass over the pool: validate every record and count them (no model yet)."""
    rejects = RejectLog()
    n = 0
    for _ in read_records(args.pool, on_bad_record=args.on_bad_record, rejects=rejects):  # type: ignore[arg-type]
        n += 1
    if n == 0:
        raise CoreselectError("the pool is empty" + (f" ({rejects.count} records rejected)" if rejects.count else ""))
    return n, rejects


def iter_pool(args: SelectArgs, start: int = 0):
    """Stream the pool (bad records already reported by :func:`scan_pool` are skipped)."""
    for r in read_records(args.pool, on_bad_record="skip", check_duplicate_ids=False):
        if r.index >= start:
            yield r


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("coreselect", "torch", "transformers", "peft", "datasets", "safetensors", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class ModelContext:
    """The loaded scoring model, shared by every model-based method of a run."""

    model: Any
    tokenizer: Any
    runner: Any
    formatter: Any
    warmup: dict[str, Any]


def warmup_model(args: SelectArgs, out_dir: Path, n_pool: int) -> tuple[str | None, dict[str, Any]]:
    """Resolve ``--warmup``: train (paper §3, Table 7) or reuse an adapter; return its folder."""
    if args.warmup == "none":
        return None, {"mode": "none"}
    if args.warmup != "auto":
        return args.warmup, {"mode": "reused", "adapter": args.warmup}
    adapter = out_dir / "warmup" / "adapter"
    if args.overwrite and (out_dir / "warmup").exists():
        import shutil

        shutil.rmtree(out_dir / "warmup")  # a previous run's warmup may be of another model or pool
    elif args.resume and (adapter / "adapter_config.json").exists():
        return str(adapter), {"mode": "auto", "adapter": str(adapter), "reused_from_previous_run": True}
    from coreselect.data.formatting import Formatter
    from coreselect.models.loading import load_model
    from coreselect.train.lora import TrainArgs, train_lora, warmup_subset

    t0 = time.perf_counter()
    picks = set(warmup_subset(n_pool, args.warmup_fraction, args.seed))
    records = [r for r in iter_pool(args) if r.index in picks]
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    targs = TrainArgs(
        lora_r=args.warmup_lora_r, lora_alpha=args.warmup_lora_alpha, lr=args.warmup_lr, epochs=args.warmup_epochs,
        batch_size=args.warmup_batch_size, grad_accum=args.warmup_grad_accum, max_length=args.max_length,
        seed=args.seed,
    )
    formatter = Formatter(tok, args.max_length, args.template,  # type: ignore[arg-type]
                          template_date=args.template_date)
    res = train_lora(model, tok, records, targs, out_dir / "warmup", progress=args.progress,
                     resume=args.resume, formatter=formatter)
    del model
    info = {"mode": "auto", "adapter": str(res.adapter_dir), "n_records": len(records), "steps": res.steps,
            "wall_s": time.perf_counter() - t0, "final_loss": res.losses[-1] if res.losses else None,
            "checkpoints": [str(c.path) for c in res.checkpoints]}
    return str(res.adapter_dir), info


def load_context(args: SelectArgs, out_dir: Path, n_pool: int) -> ModelContext:
    from coreselect.data.formatting import Formatter
    from coreselect.models.loading import load_model
    from coreselect.models.runner import ModelRunner

    adapter, info = warmup_model(args, out_dir, n_pool)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device,
                            trust_remote_code=args.trust_remote_code, adapter=adapter)
    info["model_load_s"] = time.perf_counter() - t0
    formatter = Formatter(tok, args.max_length, args.template,  # type: ignore[arg-type]
                          template_date=args.template_date)
    return ModelContext(model, tok, ModelRunner(model, tok), formatter, info)


def make_method(args: SelectArgs, ctx: ModelContext | None) -> SelectionMethod:
    from coreselect.methods import registry

    factory = registry()[args.method]
    return factory(args, ctx)


# ------------------------------------------------------------------------------ commands


def select(args: SelectArgs | None = None, /, **kwargs: Any) -> dict[str, Any]:
    """Rank the pool with ``args.method`` and write the top ``budget`` as the coreset.

    Call it with a :class:`SelectArgs` or with its fields as keywords
    (``coreselect.select(pool=[...], target=[...], out="runs/x", budget="5%")``).
    Returns the ``run.json`` dictionary. The output folder is locked for the run's lifetime
    (:class:`coreselect.runlock.RunLock`): a second run into it fails with the holder's pid.
    """
    if args is None:
        args = args_from_dict(SelectArgs, kwargs, source="coreselect.select()")
    elif kwargs:
        raise ConfigError("pass either a SelectArgs or keyword arguments to select(), not both")
    t_start = time.perf_counter()
    args.validate()
    out = Path(args.out)
    n_sh, i_sh = args.num_shards, args.shard_index
    if n_sh > 1:
        check_shard_out_dir(out, n_sh, i_sh, overwrite=args.overwrite, resume=args.resume)
    else:
        check_out_dir(out, overwrite=args.overwrite, resume=args.resume)
    with RunLock(out, i_sh if n_sh > 1 else None, takeover=args.resume or args.overwrite):
        return _select_locked(args, out, t_start)


def _select_locked(args: SelectArgs, out: Path, t_start: float) -> dict[str, Any]:
    """The body of :func:`select`, run while this process holds the output folder's lock."""
    from coreselect.methods import needs_model

    n_sh, i_sh = args.num_shards, args.shard_index
    if args.overwrite:
        clear_outputs(out, n_sh, i_sh)
    if args.resume or args.overwrite:
        remove_stale_temp(out, n_sh, i_sh)  # what a killed run was writing
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    target = read_target(args)
    n_pool, rejects = scan_pool(args)
    k = parse_budget(args.budget, n_pool)
    if rejects.count:
        rejects.write(out / "rejects.jsonl")
    timings["read_s"] = time.perf_counter() - t0

    ctx = load_context(args, out, n_pool) if needs_model(args.method) else None
    method = make_method(args, ctx)
    if n_sh > 1 and not method.streaming:
        raise ConfigError(f"--num-shards needs a per-record method; {args.method} scores the whole pool at once")

    # Stage I (or the method's fit)
    t0 = time.perf_counter()
    fp_path = out / "fingerprints.safetensors"
    if args.method == "trim":
        from coreselect.methods.trim import Fingerprints

        if args.fingerprints:
            method.set_fingerprints(Fingerprints.load(args.fingerprints))  # type: ignore[attr-defined]
        elif args.resume and fp_path.exists():
            method.set_fingerprints(Fingerprints.load(fp_path))  # type: ignore[attr-defined]
        else:
            method.fit(target)
        method.fingerprints.save(fp_path)  # type: ignore[attr-defined]
    else:
        method.fit(target)
    timings["fit_s"] = time.perf_counter() - t0

    # Stage II (or the method's score), shard by shard
    t0 = time.perf_counter()
    n_done = 0
    mine: list[int] = []  # this process's shard chunks (streaming methods)
    engine_info: dict[str, Any] = {"name": args.engine}
    if args.engine == "ray":
        from coreselect.engine.ray_engine import score_with_ray

        table, engine_info = score_with_ray(args, out, fp_path, ctx, method)
    elif method.streaming:
        # shard j = pool positions [j*S, (j+1)*S): resume skips complete shards, wherever they are
        S = args.shard_records
        done, todo = plan_shards(out, n_pool, S, n_sh, i_sh, resume=args.resume)
        n_done, mine = len(done), sorted(done + todo)
        if todo:
            wanted = set(todo)
            remaining = (r for r in iter_pool(args, todo[0] * S) if r.index // S in wanted)
            total = chunk_records(todo, S, n_pool)
            chunks = method.score_chunks(remaining, total=total)  # type: ignore[call-arg]
            for j, chunk in zip(todo, chunks, strict=True):
                if len(chunk.index) and int(chunk.index[0]) != j * S:
                    raise CoreselectError(f"internal error: chunk for shard {j} starts at {chunk.index[0]}")
                write_shard(out, j, chunk)
    else:
        done_w = existing_shards(out) if args.resume else {}
        while n_done in done_w:
            n_done += 1
        if sum(_rows(done_w[i]) for i in range(n_done)) < n_pool:
            n_done = 0  # whole-pool methods restart scoring from scratch
            for j, chunk in enumerate(method.score_chunks(iter_pool(args))):
                write_shard(out, j, chunk)
    timings["score_s"] = time.perf_counter() - t0
    if n_sh > 1:
        return _write_shard_run(args, out, method, ctx, n_pool, mine, n_done, timings, t_start)
    if args.engine != "ray":
        all_shards = existing_shards(out)
        table = read_scores([all_shards[i] for i in sorted(all_shards)])
        if table.num_rows != n_pool:
            raise CoreselectError(f"{out}: score shards hold {table.num_rows} rows but the pool has {n_pool} "
                                  "(the pool changed since the interrupted run; use --overwrite)")
    check_coverage(table, n_pool, str(out))

    # Selection and outputs
    t0 = time.perf_counter()
    table = finalize_scores(table, k, out)
    chosen = selected_indices(table)
    write_coreset(iter_pool(args), chosen, out)
    timings["write_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    scores = table.column("score").to_numpy()
    info = _run_info(args, method, ctx, timings, {
        "pool": n_pool,
        "target": len(target),
        "selected": len(chosen),
        "rejected": rejects.count,
        "scored_minus_inf": int((scores == float("-inf")).sum()),
        "truncated": int(getattr(method, "n_truncated", 0)),
        "resumed_shards": n_done,
    })
    info["engine"] = engine_info
    if ctx is not None:
        from coreselect.models.loading import model_name

        info["model"] = {"name": args.model, "resolved": model_name(ctx.model),
                         "dtype": str(next(ctx.model.parameters()).dtype), "device": str(ctx.runner.device),
                         "warmup": ctx.warmup}
    if hasattr(method, "run_info"):  # method-specific run.json keys (P2D: "aer")
        info.update(method.run_info(table, info))  # type: ignore[attr-defined]
    write_json(out / "run.json", info)
    if info["counts"]["truncated"]:
        log.warning("%d records longer than max_length=%d were truncated", info["counts"]["truncated"], args.max_length)
    return info


def _run_info(args: SelectArgs, method: SelectionMethod, ctx: ModelContext | None, timings: dict[str, float],
              counts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The run.json keys of every ``select`` run (whole run or one shard process); settles the method's cost."""
    method.cost.wall_s = timings["fit_s"] + timings["score_s"]
    method.cost.peak_memory_mb = max(method.cost.peak_memory_mb,
                                     peak_memory_mb(ctx.runner.device if ctx is not None else "cpu"))
    return {"command": "select", "method": args.method, **extra, "settings": asdict(args),
            "method_settings": method.settings(), "versions": versions(), "counts": counts, "timings": timings,
            "cost": asdict(method.cost), "stats": getattr(method, "stats", {})}


def _write_shard_run(args: SelectArgs, out: Path, method: SelectionMethod, ctx: ModelContext | None, n_pool: int,
                     mine: list[int], n_done: int, timings: dict[str, float], t_start: float) -> dict[str, Any]:
    """``--num-shards N > 1``: record what this process scored; ``coreselect merge`` finalizes."""
    timings["total_s"] = time.perf_counter() - t_start
    shard = {"num_shards": args.num_shards, "shard_index": args.shard_index, "chunks": mine,
             "records": chunk_records(mine, args.shard_records, n_pool)}
    counts = {"pool": n_pool, "selected": 0, "truncated": int(getattr(method, "n_truncated", 0)),
              "resumed_shards": n_done}
    info = _run_info(args, method, ctx, timings, counts, shard=shard)
    write_json(out / f"run-shard-{args.shard_index}.json", info)
    return info


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def fingerprint(args: SelectArgs) -> dict[str, Any]:
    """Stage I only: warmup (if asked), then write ``fingerprints.safetensors`` and ``run.json``."""
    args.method = "trim"
    args.validate(need_pool=args.warmup == "auto")
    out = Path(args.out)
    check_out_dir(out, overwrite=args.overwrite, resume=args.resume)
    with RunLock(out, takeover=args.resume or args.overwrite):
        target = read_target(args)
        n_pool = scan_pool(args)[0] if args.warmup == "auto" else 0
        ctx = load_context(args, out, n_pool)
        method = make_method(args, ctx)
        method.fit(target)
        assert method.fingerprints is not None
        method.fingerprints.save(out / "fingerprints.safetensors")
        info = {"command": "fingerprint", "settings": asdict(args), "versions": versions(),
                "counts": {"target": len(target), "classes": len(method.fingerprints)}, "stats": method.stats,
                "model": {"name": args.model, "warmup": ctx.warmup}}
        write_json(out / "run.json", info)
    return info


def trim_config(args: SelectArgs):
    from coreselect.methods.trim import TrimConfig

    return TrimConfig(
        layers=args.layers, scope=args.scope, w_row=args.w_row, w_col=args.w_col,  # type: ignore[arg-type]
        oov_penalty=args.oov_penalty, w_mean=args.w_mean, w_max=args.w_max,
        coverage_weight=args.coverage_weight, batch_tokens=args.batch_tokens, chunk_records=args.shard_records,
        coverage=args.coverage, saliency_minmax=args.saliency_minmax, min_context=args.min_context,
    )


def args_from_dict(cls: type, data: dict[str, Any], source: str = "config") -> Any:
    """Build a dataclass from a dict, rejecting unknown keys with a clear message."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
    return cls(**data)
