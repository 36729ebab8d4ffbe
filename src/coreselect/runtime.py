"""What a run needs at run time: the pool and target readers, the scoring model (after the
warmup), the version record, and building the chosen method.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coreselect.config import SelectArgs
from coreselect.data.formatting import TemplateChoice
from coreselect.data.readers import RejectLog, pool_records, read_records
from coreselect.data.records import Record
from coreselect.errors import CoreselectError
from coreselect.methods import registry
from coreselect.methods.base import MethodContext, SelectionMethod


def read_target(args: SelectArgs) -> list[Record]:
    return list(read_records(args.target, on_bad_record="error")) if args.target else []


def read_targets(args: SelectArgs) -> dict[str, list[Record]]:
    """The target records by name (one unnamed target: ``{"target": [...]}``; none: ``{}``)."""
    return {name: list(read_records(paths, on_bad_record="error")) for name, paths in args.target_sets().items()}


def scan_pool(args: SelectArgs) -> tuple[int, RejectLog]:
    """First pass over the pool: validate every record and count them (no model yet).

    For a method that runs the model, each turn order met in the pool is also rendered once
    with the model's chat template (:meth:`~coreselect.data.formatting.Formatter.template_refusal`),
    so a record the template refuses stops the run here, naming its file and line, and not
    when scoring reaches it. ``--on-bad-record skip`` does not skip such records: every
    reader of the pool numbers it without a tokenizer, so the fix is the data (or
    ``--template plain``).
    """
    rejects = RejectLog()
    n = 0
    templated = args.template != "plain" and registry.get(args.method).needs_model
    orders: dict[tuple[str, ...], tuple[Record, int]] = {}
    for rec in read_records(args.pool, on_bad_record=args.on_bad_record, rejects=rejects):
        n += 1
        if templated and rec.kind == "chat":
            roles = tuple(m.role for m in rec.messages)
            first, count = orders.get(roles, (rec, 0))
            orders[roles] = (first, count + 1)
    if n == 0:
        raise CoreselectError("the pool is empty" + (f" ({rejects.count} records rejected)" if rejects.count else ""))
    if orders:
        check_template(args, orders)
    return n, rejects


def check_template(args: SelectArgs, orders: dict[tuple[str, ...], tuple[Record, int]]) -> None:
    """Raise :class:`BadRecordError` at the first record of a turn order the chat template refuses."""
    from coreselect.errors import BadRecordError

    refused = template_refusals(args.model, args.trust_remote_code, args.template, args.template_date, tuple(orders))
    for roles, reason in refused:
        first, count = orders[roles]
        raise BadRecordError(
            first.file,
            first.line,
            "messages",
            f"{reason} (turns {', '.join(roles)}: {count} record(s) of the pool; the model's chat "
            "template refuses them and --on-bad-record skip cannot skip them: fix those records, "
            "or use --template plain)",
        )


@functools.lru_cache(maxsize=32)
def template_refusals(
    model: str,
    trust_remote_code: bool,
    template: TemplateChoice,
    template_date: str,
    orders: tuple[tuple[str, ...], ...],
) -> tuple[tuple[tuple[str, ...], str], ...]:
    """The turn orders the model's chat template refuses, with why, in the given order.

    Cached: ``compare`` and ``experiment`` scan the same pool once per method, and the answer
    depends only on the tokenizer's template and these turn orders, not on the records.
    """
    from coreselect.data.formatting import Formatter
    from coreselect.models.loading import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(model), trust_remote_code)
    fmt = Formatter(tok, template=template, template_date=template_date)
    out = []
    for roles in orders:
        reason = fmt.template_refusal(roles)
        if reason:
            out.append((roles, reason))
    return tuple(out)


def iter_pool(args: SelectArgs, start: int = 0) -> Iterator[Record]:
    """Stream the pool (bad records already reported by :func:`scan_pool` are skipped; the same
    ones, repeated ids included, so the indices match)."""
    for r in pool_records(args.pool):
        if r.index >= start:
            yield r


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("coreselect", "torch", "transformers", "peft", "datasets", "safetensors", "accelerate"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
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
        lora_r=args.warmup_lora_r,
        lora_alpha=args.warmup_lora_alpha,
        lr=args.warmup_lr,
        epochs=args.warmup_epochs,
        batch_size=args.warmup_batch_size,
        grad_accum=args.warmup_grad_accum,
        max_length=args.max_length,
        seed=args.seed,
    )
    formatter = Formatter(tok, args.max_length, args.template, template_date=args.template_date)
    res = train_lora(
        model, tok, records, targs, out_dir / "warmup", progress=args.progress, resume=args.resume, formatter=formatter
    )
    del model
    info = {
        "mode": "auto",
        "adapter": str(res.adapter_dir),
        "n_records": len(records),
        "steps": res.steps,
        "wall_s": time.perf_counter() - t0,
        "final_loss": res.losses[-1] if res.losses else None,
        "checkpoints": [str(c.path) for c in res.checkpoints],
    }
    return str(res.adapter_dir), info


def load_context(args: SelectArgs, out_dir: Path, n_pool: int) -> ModelContext:
    """Warm up (if asked) and load the scoring model, its runner and formatter."""
    from coreselect.data.formatting import Formatter
    from coreselect.models.loading import load_model
    from coreselect.models.runner import ModelRunner

    adapter, info = warmup_model(args, out_dir, n_pool)
    t0 = time.perf_counter()
    model, tok = load_model(
        args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code, adapter=adapter
    )
    info["model_load_s"] = time.perf_counter() - t0
    formatter = Formatter(tok, args.max_length, args.template, template_date=args.template_date)
    return ModelContext(model, tok, ModelRunner(model, tok), formatter, info)


def method_context(args: SelectArgs, ctx: ModelContext | None) -> MethodContext:
    return MethodContext(
        model=ctx,
        model_name=args.model,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        budget=args.budget,
        out=args.out,
        progress=args.progress,
    )


def make_method(args: SelectArgs, ctx: ModelContext | None) -> SelectionMethod:
    """The chosen method, built from its registered config."""
    spec = registry.get(args.method)
    return spec.cls.create(args.method_config(), method_context(args, ctx))
