"""``coreselect experiment``: the paper's protocol end to end (§4.1, App. E-F, Table 1).

For every target task: select a coreset with each method and budget, fine-tune a fresh
copy of the base model with LoRA on it once per seed, evaluate it on the task with
lm-eval (``coreselect eval``), and tabulate the task's headline metric as "mean (std)" over
seeds with a macro average, plus the rows *Pretrained* (no fine-tuning) and *Full-data*
(fine-tuned on the whole pool). With ``heldout:`` files, each evaluation also reports the
held-out target loss (LESS's cheap signal, :mod:`coreselect.eval.heldout`), tabulated as a
"{task} loss" column.

Rows come from the methods (:meth:`~coreselect.methods.base.SelectionMethod.experiment_rows`):
every method adds its plain row, and P2D adds three (paper 003): ``p2d`` selects with
``--method p2d`` and trains only the task-sensitive heads ``H_T`` (``train --heads``);
``p2d_select`` (P2D-dagger) trains LoRA on the p2d coreset; ``p2d_train``
(P2D-double-dagger) trains the heads on the Random row's coreset (same budget and seed,
so it differs from Random by the training only). P2D selections always score with the
base model (``warmup: none``: the paper locates heads on the base model). The heads of a
heads-only run are the ``heads.json`` that the p2d selection of the same task and budget
saved (for ``p2d_train`` that selection is run too, cached like any other), so P2D-double-
dagger is exactly P2D with its data swapped for random data. Heads-only runs are
evaluated by adding ``heads_delta.safetensors`` onto a fresh base model.

Every fine-tuned row gets an AER (paper 003's Alignment Efficiency Ratio, lower is better)::

    AER = (Select (s) / n_tasks + Train (s)) / full-data full-parameter SFT wall time

i.e. one task's selection (the shared warmup amortized over the tasks) plus one training
run. The Full-data row trains LoRA, so the denominator is estimated once per experiment
(:func:`estimate_full_sft`, cached in ``full_sft.json`` and recorded in ``experiment.json``).

Layout of ``out`` (every stage is skipped when its output is complete and newer than its
input: a training is redone when its coreset was rewritten, an evaluation when its adapter
was; so a re-run resumes where the previous one stopped, and interrupted selections and
trainings continue from their own shards / checkpoints)::

    data/                                  the embedded pool and targets (``pool: embedded``)
    warmup/adapter/                        ONE LoRA warmup (model-based methods), shared by all tasks
    full/train/full-s{seed}/               full-data fine-tuning (task independent)
    {task}/select/{method}-{budget}/       coreset.jsonl, scores.parquet, run.json
    {task}/train/{method}-{budget}-s{seed}/adapter/ (or heads_delta.safetensors), run.json
    {task}/eval/{name}/eval.json           name: pretrained, full-s{seed}, {method}-{budget}-s{seed}
                                           (+ lm-eval's lm_eval_results.json, samples_*.jsonl, heldout.jsonl)
    full_sft.json                          the estimated full-parameter SFT time (AER denominator)
    results.md, results.csv, experiment.json
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from coreselect.config import SelectArgs, WarmupSettings
from coreselect.errors import ConfigError, CoreselectError
from coreselect.eval.command import (
    EvalCommandArgs,
    evaluate_command,
    exclude_texts,
    metric_name,
)
from coreselect.io import write_json
from coreselect.methods import registry
from coreselect.methods.base import ExperimentRow
from coreselect.pipeline import select
from coreselect.runtime import scan_pool, versions, warmup_model
from coreselect.train.command import TrainCommandArgs, is_trained, train

log = logging.getLogger("coreselect")

__all__ = ["ExperimentArgs", "collect_results", "experiment", "write_results"]

#: ``SelectArgs`` fields the experiment sets itself (not allowed under ``select:``).
_SELECT_OWN = {
    "pool",
    "target",
    "out",
    "method",
    "model",
    "budget",
    "warmup",
    "dtype",
    "device",
    "progress",
    "overwrite",
    "resume",
}
#: ``TrainCommandArgs`` fields the experiment sets itself (not allowed under ``train:``).
_TRAIN_OWN = {"model", "data", "out", "seed", "dtype", "device", "progress", "overwrite", "resume", "heads"}

#: Pool records whose full-parameter forward+backward is timed for the AER denominator
#: (``batches`` micro-batches of the training batch size, after one untimed one).
AER_SAMPLE_BATCHES = 3


def row_plan(method: str) -> ExperimentRow:
    """The row a ``methods:`` entry stands for (rows come from the methods, :meth:`SelectionMethod.experiment_rows`)."""
    rows = registry.experiment_rows()
    if method not in rows:
        raise ConfigError(f"unknown method {method!r} (known: {', '.join(sorted(rows))})")
    return rows[method]


def _uses_warmup(method: str) -> bool:
    """Whether a row's selection scores with the shared warmup."""
    return registry.get(row_plan(method).select).uses_warmup


def _warmup_for(method: str, warmup: str | None) -> str | None:
    """The warmup a selection gets: model methods that do not use the warmup get the base model."""
    spec = registry.get(method)
    return None if spec.needs_model and not spec.uses_warmup else warmup


@dataclass
class ExperimentArgs(WarmupSettings):
    """Arguments of ``coreselect experiment`` (normally a YAML ``--config``; keys == flags).

    Attributes:
        model: base causal LM (``smollm2``, a folder, a hub id): scorer and fine-tuned model.
        pool: candidate pool files, or ``embedded`` (the packaged real pool, see ``coreselect demo``).
        pool_per_source: records per source for ``pool: embedded`` (8 sources).
        targets: mapping task -> target file (``embedded`` = the packaged 5 targets); the task
            is a packaged name (csqa, siqa, hellaswag, gsm8k, ...) or a user task ``.yaml``.
        methods: selection methods (trim, random, bm25, dsir, ...), and the P2D rows
            ``p2d`` / ``p2d_select`` / ``p2d_train`` (rows methods contribute, see the module doc).
        budgets: coreset sizes (``5%`` or counts).
        seeds: fine-tuning seeds; one fresh model per (task, method, budget, seed).
        shots: mapping task -> in-context exemplars (default: the task's own; packaged tasks:
            the paper's Table 6).
        heldout: mapping task -> held-out target-format file for the held-out loss column
            (``embedded`` = the packaged ``eval_<task>.jsonl``, gsm8k and csqa).
        eval_limit: evaluate the first N test items of each task only.
        eval_batch_size: sequences per forward pass in evaluation.
        eval_max_new_tokens: generation length for GSM8K-style tasks.
        decontaminate: drop test items (and few-shot exemplars) whose question is a user turn of the pool.
        warmup: ``auto`` (one LoRA warmup shared by every model-based selection), ``none``
            or a saved adapter folder.
        warmup_fraction, warmup_epochs, warmup_lr: the warmup recipe (as in ``select``).
        warmup_lora_r, warmup_lora_alpha, warmup_batch_size, warmup_grad_accum: its LoRA and batching.
        select: other ``select`` settings for every selection (layers, max_length, scope, seed...).
        train: fine-tuning settings (``coreselect train`` flags: lora_r, lr, epochs, ...;
            default: the paper's Table 7).
        out: output folder.
        include_pretrained: add the "Pretrained" row (base model, no fine-tuning).
        include_full_data: add the "Full-data" row (fine-tuned on the whole pool, per seed).
        dtype, device: ``auto`` = fp32 on CPU, bf16 on GPU.
        progress: show progress bars.
    """

    model: str = "smollm2"
    pool: list[str] = field(default_factory=lambda: ["embedded"])
    pool_per_source: int = 60
    targets: dict[str, str] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: ["trim", "random", "bm25"])
    budgets: list[str] = field(default_factory=lambda: ["5%"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    shots: dict[str, int] = field(default_factory=dict)
    heldout: dict[str, str] = field(default_factory=dict)
    eval_limit: int | None = None
    eval_batch_size: int = 8
    eval_max_new_tokens: int = 256
    decontaminate: bool = True
    select: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    out: str = "runs/experiment"
    include_pretrained: bool = True
    include_full_data: bool = True
    dtype: str = "auto"
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.pool, str):
            self.pool = [self.pool]
        if isinstance(self.methods, str):
            self.methods = [self.methods]
        if isinstance(self.budgets, (str, int)):
            self.budgets = [self.budgets]
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        self.budgets = [str(b) for b in self.budgets]
        try:
            self.seeds = [int(s) for s in self.seeds]
        except ValueError:
            raise ConfigError(f"seeds must be integers, got {self.seeds!r}") from None

    def validate(self) -> None:
        """Cheap checks before any heavy work."""
        if not self.targets or not isinstance(self.targets, dict):
            raise ConfigError("targets must map each task to its target file, e.g. {csqa: target_csqa.jsonl}")
        if not self.methods or not self.budgets or not self.seeds:
            raise ConfigError("methods, budgets and seeds must each list at least one value")
        rows = registry.experiment_rows()
        unknown = [m for m in self.methods if m not in rows]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(sorted(rows))})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {self.seeds}")
        if not self.out:
            raise ConfigError("no output folder given (--out DIR)")
        for key, allowed, own in (("select", SelectArgs, _SELECT_OWN), ("train", TrainCommandArgs, _TRAIN_OWN)):
            opts = getattr(self, key)
            names = {f.name for f in fields(allowed)} - own
            if key == "select":  # method options too (each selection takes those its method has)
                names |= {o for m in registry.names() for o in registry.get(m).option_names()}
            bad = sorted(set(opts) - names)
            if bad:
                raise ConfigError(f"{key}: unknown or experiment-owned key(s) {', '.join(bad)}")
        if not isinstance(self.heldout, dict) or any(t not in self.targets for t in self.heldout):
            raise ConfigError("heldout must map tasks of targets to held-out files, e.g. {gsm8k: eval_gsm8k.jsonl}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"eval_limit must be >= 1, got {self.eval_limit}")


# ------------------------------------------------------------------------------ stages


def _say(msg: str) -> None:
    print(f"[experiment] {msg}", flush=True)


def budget_tag(budget: str) -> str:
    """``5%`` -> ``5pct`` (a folder-name-safe budget)."""
    return str(budget).replace("%", "pct").replace("/", "_")


def task_label(task: str) -> str:
    """Folder / column name of a task: the packaged or lm-eval name, or a user task YAML's stem."""
    from coreselect.eval.command import ALIASES

    if task.endswith((".yaml", ".yml")):
        return Path(task).stem
    return ALIASES.get(task.lower(), task)


def resolve_data(args: ExperimentArgs) -> tuple[list[str], dict[str, str]]:
    """Pool files and ``{task: target file}``, building the embedded data when asked.

    Also resolves ``args.heldout`` in place (``embedded`` -> the packaged ``eval_<task>.jsonl``).
    """
    embedded = args.pool == ["embedded"] or "embedded" in [*args.targets.values(), *args.heldout.values()]
    data: dict[str, Path] = {}
    if embedded:
        from coreselect import assets

        data = assets.build_embedded_data(
            assets.CACHE_DIR / "data" / f"embedded-{args.pool_per_source}", n_per_source=args.pool_per_source
        )
    pool = [str(data["pool"])] if args.pool == ["embedded"] else list(args.pool)
    targets: dict[str, str] = {}
    for task, target in args.targets.items():
        if target == "embedded":
            key = f"target_{task_label(str(task))}"
            if key not in data:
                raise ConfigError(f"targets: no embedded target for {task!r} (embedded: gsm8k, csqa)")
            target = str(data[key])
        if not Path(target).expanduser().exists():
            raise CoreselectError(f"{target}: no such target file")
        targets[str(task)] = str(target)
    for task, held in list(args.heldout.items()):
        if held == "embedded":
            key = f"eval_{task_label(str(task))}"
            if key not in data:
                raise ConfigError(f"heldout: no embedded held-out set for {task!r} (embedded: gsm8k, csqa)")
            args.heldout[task] = held = str(data[key])
        if not Path(held).expanduser().exists():
            raise CoreselectError(f"{held}: no such held-out file")
    for p in pool:
        if not Path(p).expanduser().exists() and Path(p).suffix in (".jsonl", ".json", ".parquet", ".gz"):
            raise CoreselectError(f"{p}: no such pool file")
    return pool, targets


def _newer(src: Path, done: Path) -> bool:
    """Whether ``src`` was written after ``done`` (``done`` is then stale and is redone)."""
    return src.is_file() and src.stat().st_mtime > done.stat().st_mtime


def run_warmup(args: ExperimentArgs, pool: list[str], out: Path) -> str | None:
    """The shared scorer warmup (``out/warmup/adapter``), trained once; ``None`` = base model."""
    if not any(_uses_warmup(m) for m in args.methods) or args.warmup == "none":
        return None
    if args.warmup != "auto":
        return args.warmup
    sel = SelectArgs(
        pool=pool,
        out=str(out),
        model=args.model,
        **args.warmup_settings(),
        dtype=args.dtype,
        device=args.device,
        progress=args.progress,
        resume=True,
        **{k: v for k, v in args.select.items() if k in ("max_length", "template", "template_date", "seed")},
    )
    n_pool = scan_pool(sel)[0]
    adapter, info = warmup_model(sel, out, n_pool)
    if info.get("reused_from_previous_run"):
        _say(f"warmup: cached ({adapter})")
    else:
        write_json(out / "warmup" / "info.json", info)
        _say(f"warmup: trained on {info.get('n_records')} records in {info.get('wall_s', 0):.0f} s")
    return adapter


def run_select(
    args: ExperimentArgs, pool: list[str], target: str, method: str, budget: str, warmup: str | None, out: Path
) -> Path:
    """One selection (cached when ``coreset.jsonl`` and ``run.json`` exist)."""
    if (out / "coreset.jsonl").is_file() and (out / "run.json").is_file():
        _say(f"select {out.parent.parent.name}/{out.name}: cached")
        return out
    sel = SelectArgs(
        pool=pool,
        target=[target],
        out=str(out),
        method=method,
        model=args.model,
        budget=budget,
        warmup=warmup or "none",
        dtype=args.dtype,
        device=args.device,
        progress=args.progress,
        resume=out.exists(),
        **args.select,
    )
    sel.options = sel.method_options(strict=False)  # the options of `select:` this method has
    info = select(sel)
    _say(
        f"select {out.parent.parent.name}/{out.name}: {info['counts']['selected']} of {info['counts']['pool']} "
        f"records ({info['timings']['total_s']:.0f} s)"
    )
    return out


def run_train(args: ExperimentArgs, data: str, seed: int, out: Path, heads: Path | None = None) -> Path:
    """One fine-tuning run of a fresh base model (cached when ``adapter/`` and ``run.json`` exist).

    With ``heads`` (a ``heads.json``) only those heads are trained (``train --heads``) and
    the returned path is ``heads_delta.safetensors``; the run is redone when the coreset
    or the heads were rewritten after it. An interrupted run (LoRA or heads-only: both train
    on Trainer and checkpoint) resumes from its newest checkpoint.
    """
    result = out / ("heads_delta.safetensors" if heads else "adapter")
    inputs = [Path(data), *([heads] if heads else [])]
    if is_trained(out) and not any(_newer(p, out / "run.json") for p in inputs):
        _say(f"train {out.relative_to(Path(args.out))}: cached")
        return result
    if is_trained(out):  # the coreset (or heads) was re-selected after this run: start over
        import shutil

        shutil.rmtree(out)
    targs = TrainCommandArgs(
        model=args.model,
        data=[data],
        out=str(out),
        seed=seed,
        dtype=args.dtype,
        device=args.device,
        progress=args.progress,
        resume=out.exists(),
        heads=str(heads) if heads else None,
        **args.train,
    )
    info = train(targs)
    _say(
        f"train {out.relative_to(Path(args.out))}: {info['counts']['trained']} records, {info['steps']} steps, "
        f"loss {info['first_loss']:.3f} -> {info['final_loss']:.3f} ({info['timings']['train_s']:.0f} s)"
        + (" [heads only]" if heads else "")
    )
    return result


def run_eval(
    args: ExperimentArgs,
    task: str,
    target: str,
    adapter: Path | None,
    out: Path,
    loaded: dict[str, Any],
    seen: set[str] | None = None,
) -> dict[str, Any]:
    """One ``coreselect eval`` (cached when ``eval.json`` exists and has the held-out loss if one is asked).

    ``adapter``: a LoRA folder or a head delta file. The task's test items and few-shot
    exemplars exclude the ``target`` questions and (``seen``, :func:`pool_questions`) the pool's.
    """
    path = out / "eval.json"
    held = args.heldout.get(task)
    old = _read(path)
    if (
        old is not None
        and not (adapter is not None and _newer(adapter.parent / "run.json", path))
        and (not held or old.get("heldout"))
    ):
        _say(f"eval {out.relative_to(Path(args.out))}: cached")
        return old
    targs = TrainCommandArgs(model=args.model, **args.train)
    eargs = EvalCommandArgs(
        model=args.model,
        adapter=str(adapter) if adapter else None,
        task=task,
        shots=args.shots.get(task, args.shots.get(task_label(task))),
        limit=args.eval_limit,
        out=str(out),
        exclude=[target],
        heldout=[held] if held else [],
        max_length=targs.max_length,
        template=targs.template,  # held-out records as trained
        batch_size=args.eval_batch_size,
        max_new_tokens=args.eval_max_new_tokens,
        dtype=args.dtype,
        device=args.device,
        progress=args.progress,
    )
    model = tok = None
    if adapter is None:  # the base model is loaded once and reused by every task
        model, tok = base_model(args, loaded)
    res = evaluate_command(eargs, model=model, tokenizer=tok, exact=seen or ())
    m = metric_name(res)
    dropped = sum((res.get("dropped_docs") or {}).values())
    _say(
        f"eval {out.relative_to(Path(args.out))}: {m} {100 * res[m]:.2f}% on {res['n']} items"
        + (f" ({dropped} dropped: in the target or pool)" if dropped else "")
        + (f", held-out loss {res['heldout']['loss']:.4f}" if res.get("heldout") else "")
        + f" ({res['timings']['total_s']:.0f} s)"
    )
    return res


def base_model(args: ExperimentArgs, loaded: dict[str, Any]) -> tuple[Any, Any]:
    """The base model and tokenizer, loaded once per invocation (never modified)."""
    if "base" not in loaded:
        from coreselect.models.loading import load_model

        loaded["base"] = load_model(args.model, dtype=args.dtype, device=args.device)
    return loaded["base"]


def estimate_full_sft(args: ExperimentArgs, pool: list[str], out: Path, loaded: dict[str, Any]) -> dict[str, Any]:
    """The AER denominator: full-data full-parameter SFT wall time on this hardware, estimated.

    The Full-data row trains LoRA, so full-parameter SFT is never run; instead
    :func:`coreselect.methods.p2d.train.seconds_per_token` times full-parameter forward+backward
    passes on a seeded sample of pool records (formatted as for training), and
    ``full_sft_s = s/token x pool tokens x train epochs``. The optimizer step is not timed,
    which under-estimates the denominator (AERs come out conservative, i.e. too high).
    Cached in ``out/full_sft.json`` and reused while the model, pool, training recipe,
    dtype/device and hardware are the same; a failed estimate (e.g. out of memory) is not
    cached and leaves the AER column empty.
    """
    from coreselect.data.formatting import Formatter
    from coreselect.data.readers import read_records
    from coreselect.methods.p2d.train import seconds_per_token
    from coreselect.train.lora import _pad_id

    targs = TrainCommandArgs(model=args.model, **args.train)
    key = {
        "model": args.model,
        "pool": pool,
        "dtype": args.dtype,
        "device": args.device,
        "epochs": targs.epochs,
        "max_length": targs.max_length,
        "template": targs.template,
        "batch_size": targs.batch_size,
        "hardware": hardware(),
    }
    old = _read(out / "full_sft.json")
    if old is not None and old.get("key") == key:
        return old
    model, tok = base_model(args, loaded)
    fmt = Formatter(tok, targs.max_length, targs.template, template_date=targs.template_date)
    n_sample = targs.batch_size * (AER_SAMPLE_BATCHES + 1)
    rng = random.Random(0)
    sample: list[Any] = []
    tokens = n_records = 0
    for r in read_records(pool, on_bad_record="skip", check_duplicate_ids=False):
        enc = fmt.encode(r)
        tokens += len(enc)
        n_records += 1
        if len(sample) < n_sample:  # reservoir sample (seeded)
            sample.append(enc)
        elif (j := rng.randrange(n_records)) < n_sample:
            sample[j] = enc
    try:
        s_tok = seconds_per_token(
            model, _pad_id(tok), sample, None, batch_size=targs.batch_size, batches=AER_SAMPLE_BATCHES
        )
    except (RuntimeError, CoreselectError) as e:
        _say(f"AER: full-parameter SFT time could not be estimated ({str(e).splitlines()[0]})")
        return {"full_sft_s": None, "error": str(e).splitlines()[0], "key": key}
    info = {
        "full_sft_s": s_tok * tokens * targs.epochs,
        "measured": False,
        "key": key,
        "how": "estimated (the Full-data row trains LoRA): full-parameter forward+backward seconds per token "
        f"timed on {min(n_sample, n_records)} sampled pool records ({AER_SAMPLE_BATCHES} micro-batches "
        f"of {targs.batch_size} after 1 untimed) x pool tokens x epochs; optimizer step not timed "
        "(AER conservative)",
        "s_per_token_full": s_tok,
        "tokens_pool": tokens,
        "records_pool": n_records,
        "epochs": targs.epochs,
    }
    write_json(out / "full_sft.json", info)
    _say(f"AER: full-parameter SFT on the pool estimated at {info['full_sft_s']:.0f} s")
    return info


def pool_questions(pool: list[str]) -> set[str]:
    """The normalized user turns of the pool (what ``decontaminate`` drops from test items and shots,
    on an exact match of a doc field or prompt, :func:`coreselect.eval.lmeval.drop_docs`)."""
    from coreselect.eval.lmeval import normalize_question

    return {normalize_question(t) for t in exclude_texts(pool)}


def experiment(args: ExperimentArgs) -> dict[str, Any]:
    """Run (or resume) the whole protocol; write ``results.md`` / ``results.csv``; return a summary."""
    t0 = time.perf_counter()
    args.validate()
    out = Path(args.out)
    pool, targets = resolve_data(args)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    cfg = asdict(args)
    old = _read(cfg_path)
    if old is not None:
        changed = sorted(k for k in cfg if old.get(k) != cfg[k] and k not in ("progress",))
        if changed:
            log.warning(
                "settings changed since the previous run in %s (%s); cached stages keep their old "
                "outputs (delete them to redo)",
                out,
                ", ".join(changed),
            )
            _say(f"note: settings changed since the previous run ({', '.join(changed)}); cached stages are reused")
    write_json(cfg_path, cfg)

    warmup = run_warmup(args, pool, out)
    full: dict[int, Path] = {}
    if args.include_full_data:
        full_data = pool[0] if len(pool) == 1 else _concat(pool, out)
        for seed in args.seeds:
            full[seed] = run_train(args, full_data, seed, out / "full" / "train" / f"full-s{seed}")
    loaded: dict[str, Any] = {}
    seen = pool_questions(pool) if args.decontaminate else None
    for task, target in targets.items():
        name = task_label(task)
        if args.include_pretrained:
            run_eval(args, task, target, None, out / name / "eval" / "pretrained", loaded, seen)
        for seed, adapter in full.items():
            run_eval(args, task, target, adapter, out / name / "eval" / f"full-s{seed}", loaded, seen)
        for method in args.methods:
            plan = row_plan(method)
            sel_method = plan.select
            for budget in args.budgets:
                tag = budget_tag(budget)
                run_name = f"{method}-{tag}"
                sel_dir = out / name / "select"
                sel = run_select(
                    args,
                    pool,
                    target,
                    sel_method,
                    budget,
                    _warmup_for(sel_method, warmup),
                    sel_dir / f"{sel_method}-{tag}",
                )
                heads = None
                if plan.train_heads_from:  # e.g. P2D's H_T: saved by that method's selection of this task/budget
                    src = plan.train_heads_from
                    holder = (
                        sel
                        if src == sel_method
                        else run_select(
                            args, pool, target, src, budget, _warmup_for(src, warmup), sel_dir / f"{src}-{tag}"
                        )
                    )
                    heads = holder / plan.train_heads_file
                for seed in args.seeds:
                    adapter = run_train(
                        args, str(sel / "coreset.jsonl"), seed, out / name / "train" / f"{run_name}-s{seed}", heads
                    )
                    run_eval(args, task, target, adapter, out / name / "eval" / f"{run_name}-s{seed}", loaded, seen)
    full_sft = estimate_full_sft(args, pool, out, loaded)
    rows = collect_results(args, list(targets))
    wall = time.perf_counter() - t0
    info = {
        "command": "experiment",
        "settings": cfg,
        "pool": pool,
        "targets": targets,
        "versions": versions(),
        "hardware": hardware(),
        "wall_s": wall,
        "full_sft": {k: v for k, v in full_sft.items() if k != "key"},
        "rows": rows,
    }
    write_results(out, args, list(targets), rows, info)
    write_json(out / "experiment.json", info)
    _say(f"done in {wall:.0f} s -> {out / 'results.md'}")
    return info


def _concat(pool: list[str], out: Path) -> str:
    """Several pool files as one JSONL (for full-data training)."""
    from coreselect.data.readers import read_records
    from coreselect.io import write_jsonl

    path = out / "full" / "pool.jsonl"
    if not path.is_file():
        write_jsonl(path, (r.raw for r in read_records(pool, on_bad_record="skip", check_duplicate_ids=False)))
    return str(path)


def hardware() -> dict[str, Any]:
    """CPU / GPU description for the results."""
    import torch

    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return hw


# ------------------------------------------------------------------------------ results


def _read(path: Path) -> dict[str, Any] | None:
    """A JSON file of a stage, or None when it does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CoreselectError(f"{path}: not a valid JSON file ({e}); delete it to redo its stage") from None


def _score(res: dict[str, Any] | None) -> float | None:
    """The headline metric of an ``eval.json`` in percent."""
    return None if res is None else 100.0 * float(res[res.get("metric") or metric_name(res)])


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population std (numpy's default ``ddof=0``; 0 for one seed)."""
    return statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0


def collect_results(args: ExperimentArgs, tasks: list[str]) -> list[dict[str, Any]]:
    """One row per Pretrained / Full-data / (method, budget) from the files on disk."""
    out = Path(args.out)
    names = [task_label(t) for t in tasks]
    rows: list[dict[str, Any]] = []

    def row(
        label: str,
        method: str,
        budget: str,
        eval_names: list[str],
        train_dirs: list[Path],
        select_dirs: list[Path],
        extra_select_s: float = 0.0,
    ) -> dict[str, Any]:
        r: dict[str, Any] = {"row": label, "method": method, "budget": budget, "tasks": {}}
        for name in names:
            evals = [_read(out / name / "eval" / e / "eval.json") for e in eval_names]
            scores = [s for res in evals if (s := _score(res)) is not None]
            losses = [float(res["heldout"]["loss"]) for res in evals if res and res.get("heldout")]
            first = (evals[0] or {}) if evals else {}
            r["tasks"][name] = {
                "scores": scores,
                "n_items": first.get("n"),
                "shots": first.get("shots"),
                "metric": first.get("metric"),
                "losses": losses,
                **(dict(zip(("mean", "std"), _mean_std(scores))) if scores else {}),
                **(dict(zip(("loss_mean", "loss_std"), _mean_std(losses))) if losses else {}),
            }
        complete = all(len(r["tasks"][n]["scores"]) == len(eval_names) for n in names)
        r["average"] = statistics.fmean(r["tasks"][n]["mean"] for n in names) if complete else None
        times = [t["timings"]["train_s"] for d in train_dirs if (t := _read(d / "run.json"))]
        r["train_s"] = statistics.fmean(times) if times else None
        sel = [j["timings"]["total_s"] for d in select_dirs if (j := _read(d / "run.json"))]
        r["select_s"] = sum(sel) + extra_select_s if sel else None
        return r

    if args.include_pretrained:
        rows.append(row("Pretrained", "pretrained", "", ["pretrained"], [], []))
    if args.include_full_data:
        rows.append(
            row(
                "Full-data",
                "full",
                "100%",
                [f"full-s{s}" for s in args.seeds],
                [out / "full" / "train" / f"full-s{s}" for s in args.seeds],
                [],
            )
        )
    warm = _read(out / "warmup" / "info.json") or {}
    for method in args.methods:
        plan = row_plan(method)
        sel_method, name = plan.select, plan.label
        for budget in args.budgets:
            tag = budget_tag(budget)
            rn = f"{method}-{tag}"
            label = name if len(args.budgets) == 1 else f"{name} ({budget})"
            extra = float(warm.get("wall_s") or 0.0) if _uses_warmup(method) else 0.0
            for src, key in plan.extra_cost:  # e.g. P2D-double-dagger: locating H_T (the p2d selection's stage 1)
                extra += sum(
                    float(
                        ((_read(out / n / "select" / f"{src}-{tag}" / "run.json") or {}).get("stats") or {}).get(key)
                        or 0.0
                    )
                    for n in names
                )
            rows.append(
                row(
                    label,
                    method,
                    budget,
                    [f"{rn}-s{s}" for s in args.seeds],
                    [out / n / "train" / f"{rn}-s{s}" for n in names for s in args.seeds],
                    [out / n / "select" / f"{sel_method}-{tag}" for n in names],
                    extra,
                )
            )
    full_sft_s = (_read(out / "full_sft.json") or {}).get("full_sft_s")
    for r in rows:
        r["aer"] = _aer(r, len(names), full_sft_s)
    return rows


def _aer(r: dict[str, Any], n_tasks: int, full_sft_s: float | None) -> float | None:
    """``(select_s / n_tasks + train_s) / full_sft_s`` of a fine-tuned row (Full-data: no selection)."""
    from coreselect.methods.p2d.train import alignment_efficiency_ratio

    sel = 0.0 if r["method"] == "full" else r["select_s"]
    if r["method"] == "pretrained" or not full_sft_s or r["train_s"] is None or sel is None:
        return None
    return alignment_efficiency_ratio(sel / max(n_tasks, 1), r["train_s"], full_sft_s)


def _cell(t: dict[str, Any], with_std: bool, key: str = "", digits: int = 2) -> str:
    """``mean (std)`` of a task cell (``key="loss_"``: the held-out loss)."""
    if f"{key}mean" not in t:
        return "–"
    mean, std = t[f"{key}mean"], t[f"{key}std"]
    return f"{mean:.{digits}f} ({std:.{digits}f})" if with_std else f"{mean:.{digits}f}"


def _secs(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def write_results(
    out: Path, args: ExperimentArgs, tasks: list[str], rows: list[dict[str, Any]], info: dict[str, Any] | None = None
) -> None:
    """``results.md`` (Table 1 layout) and ``results.csv`` (the same numbers, one column each)."""
    from coreselect.io import atomic_path

    names = [task_label(t) for t in tasks]
    held = [task_label(t) for t in tasks if t in args.heldout]
    header = ["Method", *names, *(f"{n} loss" for n in held), "Average", "Select (s)", "Train (s)", "AER"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        std = r["method"] != "pretrained"
        cells = [
            r["row"],
            *(_cell(r["tasks"][n], std) for n in names),
            *(_cell(r["tasks"][n], std, "loss_", 4) for n in held),
            "–" if r["average"] is None else f"{r['average']:.2f}",
            _secs(r["select_s"]),
            _secs(r["train_s"]),
            "–" if r.get("aer") is None else f"{r['aer']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    n_items = {n: next((r["tasks"][n]["n_items"] for r in rows if r["tasks"][n]["n_items"]), None) for n in names}
    shots = {
        n: next((r["tasks"][n]["shots"] for r in rows if r["tasks"][n].get("shots") is not None), None) for n in names
    }
    metrics = {n: next((r["tasks"][n]["metric"] for r in rows if r["tasks"][n].get("metric")), None) for n in names}
    budgets = ", ".join(args.budgets)
    notes = [
        "",
        f"Score (%) of a fresh `{args.model}` fine-tuned with LoRA (P2D, P2D‡: only the selected attention "
        f"heads) on each method's {budgets} coreset, evaluated with lm-eval-harness; "
        f"mean (std) over seeds {args.seeds} (population std, 0.00 with one seed). "
        "Metric per task: " + ", ".join(f"{n} `{m}`" for n, m in metrics.items()) + " (each eval.json also holds "
        "every metric with a 95% CI). Average: macro average over the tasks.",
        "Test items per task: "
        + ", ".join(f"{n} {k}" for n, k in n_items.items())
        + "; shots per task: "
        + ", ".join(f"{n} {k}" for n, k in shots.items())
        + ".",
        (
            "Select (s): selection wall time summed over the tasks (model-based methods include the one shared "
            "warmup; P2D‡ includes locating the heads). Train (s): mean wall time of one fine-tuning run."
        ),
        "AER (Alignment Efficiency Ratio, lower is better): (Select (s) / number of tasks + Train (s)) / "
        "full-data full-parameter SFT wall time on the same hardware; " + _full_sft_note(_read(out / "full_sft.json")),
    ]
    if held:
        notes.append(
            "Held-out loss ({task} loss): mean response-token cross-entropy (nats/token, lower is better) "
            "on the held-out target-format examples of `heldout:` ("
            + ", ".join(f"{task_label(t)}: {Path(f).name}" for t, f in args.heldout.items())
            + "), mean (std) "
            "over seeds; each eval.json holds its 95% t-interval over examples."
        )
    if info is not None:
        hw = info["hardware"]
        dev = hw.get("gpu") or f"CPU only, {hw['cpu_count']} cores ({hw['torch_threads']} torch threads)"
        notes.append(f"Hardware: {dev}. Experiment wall time (this invocation): {info['wall_s']:.0f} s.")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("# Results\n\n" + "\n".join(lines + notes) + "\n", encoding="utf-8")
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "row",
                "method",
                "budget",
                "n_seeds",
                *(f"{n}_{k}" for n in names for k in ("mean", "std")),
                *(f"{n}_loss_{k}" for n in held for k in ("mean", "std")),
                "average",
                "select_s",
                "train_s",
                "aer",
            ]
        )
        for r in rows:
            vals: list[Any] = []
            for n in names:
                t = r["tasks"][n]
                vals += [_fmt(t.get("mean")), _fmt(t.get("std"))]
            for n in held:
                t = r["tasks"][n]
                vals += [_fmt(t.get("loss_mean")), _fmt(t.get("loss_std"))]
            w.writerow(
                [
                    r["row"],
                    r["method"],
                    r["budget"],
                    max(len(r["tasks"][n]["scores"]) for n in names),
                    *vals,
                    _fmt(r["average"]),
                    _fmt(r["select_s"]),
                    _fmt(r["train_s"]),
                    _fmt(r.get("aer")),
                ]
            )


def _full_sft_note(fs: dict[str, Any] | None) -> str:
    if not fs or not fs.get("full_sft_s"):
        why = f" ({fs['error']})" if fs and fs.get("error") else ""
        return f"its denominator could not be estimated{why}."
    return (
        f"denominator {fs['full_sft_s']:.3g} s, {fs['how']}: {fs['s_per_token_full']:.3g} s/token x "
        f"{fs['tokens_pool']} tokens x {fs['epochs']:g} epochs."
    )


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"
