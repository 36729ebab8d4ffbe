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
from collections.abc import Iterator
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

#: Pools an experiment can run on: the task's own train data in the pool, or removed from it.
SETTINGS = ("in_domain", "transfer")
#: Keys of ``pilot:`` (the fine-tuning recipe chosen on the pilot sets, :func:`run_pilot`).
PILOT_KEYS = ("lrs", "epochs", "records", "seed")

#: Pool records whose full-parameter forward+backward is timed for the AER denominator
#: (``batches`` micro-batches of the training batch size, after one untimed one).
AER_SAMPLE_BATCHES = 3


def row_plan(method: str, variants: dict[str, dict[str, Any]] | None = None) -> ExperimentRow:
    """The row a ``methods:`` entry stands for (rows come from the methods, :meth:`SelectionMethod.experiment_rows`,
    or from ``variants:``: a registered method with other options, LoRA-trained on its coreset)."""
    if variants and method in variants:
        return ExperimentRow(key=method, select=method, label=method)
    rows = registry.experiment_rows()
    if method not in rows:
        raise ConfigError(f"unknown method {method!r} (known: {', '.join(sorted(rows))})")
    return rows[method]


def base_method(key: str, variants: dict[str, dict[str, Any]] | None = None) -> str:
    """The registered method a selection key runs (a variant's ``method``, else the key itself)."""
    return str(variants[key]["method"]) if variants and key in variants else key


def _uses_warmup(method: str, variants: dict[str, dict[str, Any]] | None = None) -> bool:
    """Whether a row's selection scores with the shared warmup."""
    if variants and variants.get(method, {}).get("warmup") == "none":
        return False
    return registry.get(base_method(row_plan(method, variants).select, variants)).uses_warmup


def _warmup_for(method: str, warmup: str | None, variants: dict[str, dict[str, Any]] | None = None) -> str | None:
    """The warmup a selection gets: model methods that do not use the warmup get the base model."""
    if variants and variants.get(method, {}).get("warmup") == "none":
        return None
    spec = registry.get(base_method(method, variants))
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
        settings: ``in_domain`` (the pool as given) and/or ``transfer`` (``pool: evidence`` only:
            every target task's own source removed from the pool, so a method must find related
            data). Each setting gets its own folder, ``out/<setting>/``, unless it is the only
            setting and ``in_domain`` (then ``out/`` itself, as before).
        coresets: ``per_task`` (one coreset and fine-tuned model per task, Table 1) or ``joint``
            (one multi-target selection over all tasks, ``--combine quota``: one coreset and one
            fine-tuned model per method and seed, evaluated on every task).
        reselect_per_seed: methods whose selection is redrawn with each seed (default: random,
            so Random gets as many different subsets as there are seeds).
        heldout_only: tasks scored by held-out loss only, without lm-eval (e.g. gsm8k at 135M).
        full_data_limit: train the Full-data row on a seeded random subset of this many pool
            records (``None``: the whole pool); the table says which.
        full_data_seeds: seeds of the Full-data row (default: ``seeds``).
        pilot: choose the fine-tuning ``lr`` and ``epochs`` on a pilot before anything else:
            ``{lrs: [...], epochs: [...], records: 200, seed: 0}`` trains one LoRA per pair on
            ``records`` random pool records and keeps the pair with the lowest mean held-out
            loss on the pilot sets (``pool: evidence``'s ``pilot_<task>.jsonl``, disjoint from
            targets, held-out sets and test items). Explicit ``train: {lr, epochs}`` win.
        bootstrap_reference: the method compared with every other row by a paired bootstrap over
            the same test items and held-out examples (``None``: no comparison table).
        bootstrap_iters: bootstrap resamples.
        pilot_from: a ``pilot.json`` of an earlier experiment whose chosen ``lr`` / ``epochs``
            this one trains with (instead of running ``pilot:``), so that its rows compare with
            that experiment's.
        select_only: run the selections only (every row's coresets, their source mix and cost in
            results.md), no training or evaluation; run again without it to continue.
        variants: extra rows: ``{name: {method: p2d, heads: random, head_seed: 1}}`` selects with
            a registered method and these options on top of ``select:`` (a LoRA row, listed in
            ``methods:`` by its name): ablations and controls next to the defaults.
            ``warmup: none`` in a variant scores it with the base model instead of the shared warmup.
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
    settings: list[str] = field(default_factory=lambda: ["in_domain"])
    coresets: str = "per_task"
    reselect_per_seed: list[str] = field(default_factory=lambda: ["random"])
    heldout_only: list[str] = field(default_factory=list)
    full_data_limit: int | None = None
    full_data_seeds: list[int] | None = None
    pilot: dict[str, Any] = field(default_factory=dict)
    bootstrap_reference: str | None = "trim"
    bootstrap_iters: int = 10000
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    pilot_from: str | None = None
    select_only: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.pool, str):
            self.pool = [self.pool]
        if isinstance(self.methods, str):
            self.methods = [self.methods]
        if isinstance(self.budgets, (str, int)):
            self.budgets = [self.budgets]
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        for name in ("settings", "reselect_per_seed", "heldout_only"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if isinstance(self.full_data_seeds, int):
            self.full_data_seeds = [self.full_data_seeds]
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
        for key, spec in self.variants.items():
            if not isinstance(spec, dict) or spec.get("method") not in registry.names():
                raise ConfigError(f"variants: {key} needs method: one of {', '.join(registry.names())}")
            if key in rows:
                raise ConfigError(f"variants: {key} is already a method row; pick another name")
            if spec.get("warmup", "none") != "none":
                raise ConfigError(f"variants: {key}: warmup may only be none (the shared warmup is the default)")
            bad = sorted(set(spec) - {"method", "warmup"} - set(registry.get(spec["method"]).option_names()))
            if bad:
                raise ConfigError(f"variants: {key}: {spec['method']} has no option(s) {', '.join(bad)}")
        unknown = [m for m in self.methods if m not in rows and m not in self.variants]
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
        bad_settings = [s for s in self.settings if s not in SETTINGS]
        if bad_settings or not self.settings or len(set(self.settings)) != len(self.settings):
            raise ConfigError(f"settings must list distinct values of {', '.join(SETTINGS)}, got {self.settings}")
        if "transfer" in self.settings and self.pool != ["evidence"]:
            raise ConfigError("settings: transfer needs pool: evidence (the pool whose task sources can be removed)")
        if self.coresets not in ("per_task", "joint"):
            raise ConfigError(f"coresets must be per_task or joint, got {self.coresets!r}")
        if self.coresets == "joint" and any(row_plan(m, self.variants).train_heads_from for m in self.methods):
            raise ConfigError("coresets: joint has no P2D heads-only rows (their heads are per task); use per_task")
        if any(t not in self.targets for t in self.heldout_only) or any(
            t not in self.heldout for t in self.heldout_only
        ):
            raise ConfigError("heldout_only must list tasks of targets that have a heldout: file")
        if self.full_data_limit is not None and self.full_data_limit < 1:
            raise ConfigError(f"full_data_limit must be >= 1, got {self.full_data_limit}")
        if self.pilot and self.pilot_from:
            raise ConfigError("give pilot: or pilot_from:, not both")
        if self.pilot:
            unknown_pilot = sorted(set(self.pilot) - set(PILOT_KEYS))
            if unknown_pilot:
                raise ConfigError(f"pilot: unknown key(s) {', '.join(unknown_pilot)} (known: {', '.join(PILOT_KEYS)})")


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


def evidence_dir(args: ExperimentArgs) -> Path:
    """Where ``pool: evidence`` is built (cached, :func:`coreselect.evidence_pool.build_evidence_pool`)."""
    from coreselect import assets

    return assets.CACHE_DIR / "data" / f"evidence-{args.pool_per_source}"


def setting_pools(args: ExperimentArgs, pool: list[str]) -> dict[str, list[str]]:
    """The pool files of each setting (``transfer``: ``pool-transfer.jsonl``, every task's source removed)."""
    pools: dict[str, list[str]] = {}
    for setting in args.settings:
        if setting == "transfer":
            pools[setting] = [str(evidence_dir(args) / "pool-transfer.jsonl")]
        else:
            pools[setting] = pool
    return pools


def setting_root(args: ExperimentArgs, setting: str) -> Path:
    """Output folder of a setting (``out`` itself for a lone in_domain setting)."""
    return Path(args.out) if args.settings == ["in_domain"] else Path(args.out) / setting


def resolve_data(args: ExperimentArgs) -> tuple[list[str], dict[str, str]]:
    """Pool files and ``{task: target file}``, building the embedded / evidence data when asked.

    Also resolves ``args.heldout`` in place (``embedded`` -> the packaged ``eval_<task>.jsonl``,
    or with ``pool: evidence`` its ``heldout_<task>.jsonl``).
    """
    if args.pool == ["evidence"]:
        return _resolve_evidence(args)
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


def _resolve_evidence(args: ExperimentArgs) -> tuple[list[str], dict[str, str]]:
    """``pool: evidence``: the evidence experiment's pool, targets and held-out sets (built offline, cached)."""
    from coreselect.evidence_pool import TASKS, build_evidence_pool

    tasks = [task_label(t) for t in args.targets]
    if any(t not in TASKS for t in tasks):
        raise ConfigError(f"pool: evidence has targets for {', '.join(TASKS)} only, got {', '.join(tasks)}")
    folder = evidence_dir(args)
    build_evidence_pool(folder, n_per_source=args.pool_per_source, tasks=TASKS, progress=_say)
    targets: dict[str, str] = {}
    for task, target in args.targets.items():
        targets[str(task)] = str(folder / f"target_{task_label(task)}.jsonl") if target == "embedded" else target
        if not Path(targets[str(task)]).expanduser().exists():
            raise CoreselectError(f"{targets[str(task)]}: no such target file")
    for task, held in list(args.heldout.items()):
        if held == "embedded":
            args.heldout[task] = str(folder / f"heldout_{task_label(task)}.jsonl")
    return [str(folder / "pool.jsonl")], targets


def _newer(src: Path, done: Path) -> bool:
    """Whether ``src`` was written after ``done`` (``done`` is then stale and is redone)."""
    return src.is_file() and src.stat().st_mtime > done.stat().st_mtime


def run_warmup(args: ExperimentArgs, pool: list[str], out: Path) -> str | None:
    """The shared scorer warmup (``out/warmup/adapter``), trained once; ``None`` = base model."""
    if not any(_uses_warmup(m, args.variants) for m in args.methods) or args.warmup == "none":
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
    args: ExperimentArgs,
    pool: list[str],
    target: str | dict[str, str],
    method: str,
    budget: str,
    warmup: str | None,
    out: Path,
    seed: int | None = None,
) -> Path:
    """One selection (cached when ``coreset.jsonl`` and ``run.json`` exist).

    ``target``: one target file, or ``{task: file}`` for one multi-target selection (joint
    coresets, combined with the ``select:`` settings' ``combine``, default quota). ``seed``
    overrides ``select: {seed}`` (methods in ``reselect_per_seed``).
    """
    if (out / "coreset.jsonl").is_file() and (out / "run.json").is_file():
        _say(f"select {out.parent.parent.name}/{out.name}: cached")
        return out
    targets = [target] if isinstance(target, str) else [f"{task_label(t)}={f}" for t, f in target.items()]
    opts = {**args.select, **{k: v for k, v in args.variants.get(method, {}).items() if k not in ("method", "warmup")}}
    method = base_method(method, args.variants)
    if seed is not None:
        opts["seed"] = seed
    sel = SelectArgs(
        pool=pool,
        target=targets,
        out=str(out),
        method=method,
        model=args.model,
        budget=budget,
        warmup=warmup or "none",
        dtype=args.dtype,
        device=args.device,
        progress=args.progress,
        resume=out.exists(),
        **opts,
    )
    sel.options = sel.method_options(strict=False)  # the options of `select:` this method has
    info = select(sel)
    _say(
        f"select {out.parent.parent.name}/{out.name}: {info['counts']['selected']} of {info['counts']['pool']} "
        f"records ({info['timings']['total_s']:.0f} s)"
    )
    return out


def run_train(
    args: ExperimentArgs,
    data: str,
    seed: int,
    out: Path,
    heads: Path | None = None,
    recipe: dict[str, Any] | None = None,
) -> Path:
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
        **(args.train if recipe is None else recipe),
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
    lm_eval = task not in args.heldout_only
    eargs = _eval_args(
        args,
        adapter,
        out,
        [held] if held else [],
        args.train,
        task=task if lm_eval else "",
        shots=args.shots.get(task, args.shots.get(task_label(task))),
        limit=args.eval_limit,
        exclude=[target],
        max_new_tokens=args.eval_max_new_tokens,
    )
    model = tok = None
    if adapter is None:  # the base model is loaded once and reused by every task
        model, tok = base_model(args, loaded)
    res = evaluate_command(eargs, model=model, tokenizer=tok, exact=seen or ())
    dropped = sum((res.get("dropped_docs") or {}).values())
    parts = []
    if lm_eval:
        m = metric_name(res)
        parts.append(f"{m} {100 * res[m]:.2f}% on {res['n']} items")
        if dropped:
            parts[-1] += f" ({dropped} dropped: in the target or pool)"
    if res.get("heldout"):
        parts.append(f"held-out loss {res['heldout']['loss']:.4f}")
    _say(f"eval {out.relative_to(Path(args.out))}: {', '.join(parts)} ({res['timings']['total_s']:.0f} s)")
    return res


def _eval_args(
    args: ExperimentArgs,
    adapter: Path | None,
    out: Path,
    heldout: list[str],
    recipe: dict[str, Any],
    **task: Any,
) -> EvalCommandArgs:
    """``coreselect eval`` arguments of one evaluation: the held-out records are formatted as the
    ``recipe`` trains (max length, template); ``task`` holds the lm-eval part (task, shots, ...)."""
    targs = TrainCommandArgs(model=args.model, **recipe)
    return EvalCommandArgs(
        model=args.model,
        adapter=str(adapter) if adapter else None,
        out=str(out),
        heldout=heldout,
        max_length=targs.max_length,
        template=targs.template,
        batch_size=args.eval_batch_size,
        dtype=args.dtype,
        device=args.device,
        progress=args.progress,
        **task,
    )


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
    """Run (or resume) the whole protocol; write ``results.md`` / ``results.csv``; return a summary.

    Stages run in priority order, so that an interrupted run leaves a balanced partial table:
    the pilot, the Pretrained row, then per setting its selections and, seed by seed, every
    method's training and evaluation, and the Full-data row last. Each stage is cached.
    """
    t0 = time.perf_counter()
    args.validate()
    out = Path(args.out)
    pool, targets = resolve_data(args)
    pools = setting_pools(args, pool)
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

    pilot = run_pilot(args, pool, targets, out) if args.pilot else None
    if args.pilot_from:
        pilot = _read(Path(args.pilot_from).expanduser())
        if pilot is None or "chosen" not in pilot:
            raise CoreselectError(f"{args.pilot_from}: no pilot.json with a chosen recipe (run its experiment first)")
    if pilot is not None:
        args.train = {**args.train, **pilot["chosen"]}
    loaded: dict[str, Any] = {}
    # one decontamination set for every setting (the in-domain pool holds the others): the
    # test items are then the same in every table
    seen = pool_questions(pool) if args.decontaminate else None
    if args.include_pretrained and not args.select_only:
        for task, target in targets.items():
            run_eval(args, task, target, None, pretrained_dir(args, task), loaded, seen)
    for setting in pools:
        setting_root(args, setting).mkdir(parents=True, exist_ok=True)
    warmups = {setting: run_warmup(args, spool, setting_root(args, setting)) for setting, spool in pools.items()}
    for seed in args.seeds:  # seed-major: every setting's rows get their first seed before any its second
        for setting, spool in pools.items():
            run_rows(args, setting, spool, targets, warmups[setting], seed, loaded, seen)
            _write_all(args, targets, pools, t0, pilot)  # a partial table after each seed and setting
    if args.include_full_data and not args.select_only:
        for setting, spool in pools.items():
            run_full_data(args, setting, spool, targets, loaded, seen)
    full_sft = estimate_full_sft(args, pool, out, loaded) if not args.select_only else None
    info = _write_all(args, targets, pools, t0, pilot, full_sft)
    _say(f"done in {info['wall_s']:.0f} s -> {out / 'results.md'}")
    return info


def pretrained_dir(args: ExperimentArgs, task: str) -> Path:
    """The Pretrained evaluation of a task, shared by every setting."""
    return Path(args.out) / task_label(task) / "eval" / "pretrained"


def _selection_dirs(args: ExperimentArgs, root: Path, task: str | None, method: str, budget: str, seed: int) -> Path:
    """Where a selection lives: per task or ``joint/``; ``-s{seed}`` for methods redrawn per seed."""
    tag = budget_tag(budget)
    name = f"{method}-{tag}" + (f"-s{seed}" if method in args.reselect_per_seed else "")
    return root / (task_label(task) if task else "joint") / "select" / name


def run_rows(
    args: ExperimentArgs,
    setting: str,
    pool: list[str],
    targets: dict[str, str],
    warmup: str | None,
    seed: int,
    loaded: dict[str, Any],
    seen: set[str] | None,
) -> None:
    """One setting and seed: every method's selections (cached across seeds), training and evaluations."""
    root = setting_root(args, setting)
    if len(args.settings) > 1:
        _say(f"setting {setting}, seed {seed}: pool {', '.join(pool)}")
    heads_from = {row_plan(m, args.variants).train_heads_from for m in args.methods}
    for method in args.methods:
        plan = row_plan(method, args.variants)
        sel_method = plan.select
        for budget in args.budgets:
            run_name = f"{method}-{budget_tag(budget)}"
            sel_seed = seed if sel_method in args.reselect_per_seed else None
            if args.coresets == "joint":
                sel = run_select(
                    args,
                    pool,
                    targets,
                    sel_method,
                    budget,
                    _warmup_for(sel_method, warmup, args.variants),
                    _selection_dirs(args, root, None, sel_method, budget, seed),
                    sel_seed,
                )
                if args.select_only:
                    continue
                adapter = run_train(
                    args, str(sel / "coreset.jsonl"), seed, root / "joint" / "train" / f"{run_name}-s{seed}"
                )
                for task, target in targets.items():
                    edir = root / task_label(task) / "eval" / f"{run_name}-s{seed}"
                    run_eval(args, task, target, adapter, edir, loaded, seen)
                continue
            shared = None
            # one scoring pass for every task, unless a heads-only row needs this method's
            # per-task heads.json (P2D rows): those keep one selection per task
            if len(targets) > 1 and not plan.train_heads_from and sel_method not in heads_from:
                shared = run_select(
                    args,
                    pool,
                    targets,
                    sel_method,
                    budget,
                    _warmup_for(sel_method, warmup, args.variants),
                    _selection_dirs(args, root, "multi", sel_method, budget, seed),
                    sel_seed,
                )
            for task, target in targets.items():
                name = task_label(task)
                own = _selection_dirs(args, root, task, sel_method, budget, seed)
                sel = (
                    task_coreset(args, pool, shared, task, own)
                    if shared is not None
                    else run_select(
                        args,
                        pool,
                        target,
                        sel_method,
                        budget,
                        _warmup_for(sel_method, warmup, args.variants),
                        own,
                        sel_seed,
                    )
                )
                heads = None
                if plan.train_heads_from:  # e.g. P2D's H_T: saved by that method's selection of this task/budget
                    src = plan.train_heads_from
                    holder = (
                        sel
                        if src == sel_method
                        else run_select(
                            args,
                            pool,
                            target,
                            src,
                            budget,
                            _warmup_for(src, warmup, args.variants),
                            _selection_dirs(args, root, task, src, budget, seed),
                        )
                    )
                    heads = holder / plan.train_heads_file
                if args.select_only:
                    continue
                adapter = run_train(
                    args, str(sel / "coreset.jsonl"), seed, root / name / "train" / f"{run_name}-s{seed}", heads
                )
                run_eval(args, task, target, adapter, root / name / "eval" / f"{run_name}-s{seed}", loaded, seen)


def task_coreset(args: ExperimentArgs, pool: list[str], shared: Path, task: str, out: Path) -> Path:
    """One task's coreset from a multi-target selection: its top-k by ``rank_<task>`` of ``scores.parquet``.

    Identical to a single-target selection for that task (same scores, same tie-break, same
    k), without another pass over the pool. ``run.json`` records the source and charges the
    task ``1 / n_tasks`` of the shared selection's wall time, so the row's summed selection
    cost is the one pass. Redone when the shared selection is newer.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from coreselect.runtime import iter_pool
    from coreselect.selection import parse_budget, write_coreset

    done = out / "run.json"
    if (out / "coreset.jsonl").is_file() and done.is_file() and not _newer(shared / "run.json", done):
        return out
    info = _read(shared / "run.json") or {}
    names = (info.get("targets") or {}).get("names") or []
    name = task_label(task)
    table = pq.read_table(shared / "scores.parquet", columns=["index", f"rank_{name}"])
    k = parse_budget(info["settings"]["budget"], table.num_rows)
    top = table.filter(pc.less_equal(table.column(f"rank_{name}"), k)).sort_by(f"rank_{name}")
    chosen = top.column("index").to_pylist()
    out.mkdir(parents=True, exist_ok=True)
    write_coreset(iter_pool(SelectArgs(pool=pool, out=str(out), method="random")), chosen, out)
    total = float((info.get("timings") or {}).get("total_s") or 0.0)
    write_json(
        done,
        {
            "derived_from": str(shared),
            "target": name,
            "method": info.get("method"),
            "timings": {"total_s": total / max(len(names), 1), "shared_total_s": total},
            "counts": {"selected": len(chosen), "pool": table.num_rows},
        },
    )
    _say(f"select {name}/{out.name}: top {k} by rank_{name} of the shared selection {shared}")
    return out


def run_full_data(
    args: ExperimentArgs,
    setting: str,
    pool: list[str],
    targets: dict[str, str],
    loaded: dict[str, Any],
    seen: set[str] | None,
) -> None:
    """The Full-data row of a setting (the whole pool, or ``full_data_limit`` records of it)."""
    root = setting_root(args, setting)
    data = full_data_file(args, pool, root)
    for seed in args.full_data_seeds or args.seeds:
        adapter = run_train(args, data, seed, root / "full" / "train" / f"full-s{seed}")
        for task, target in targets.items():
            run_eval(args, task, target, adapter, root / task_label(task) / "eval" / f"full-s{seed}", loaded, seen)


def full_data_file(args: ExperimentArgs, pool: list[str], root: Path) -> str:
    """The Full-data row's training file: the whole pool, or a seeded subset of ``full_data_limit`` records."""
    if args.full_data_limit is None:
        return pool[0] if len(pool) == 1 else _concat(pool, root)
    from coreselect.data.readers import read_records
    from coreselect.io import write_jsonl

    path = root / "full" / f"pool-{args.full_data_limit}.jsonl"
    if not path.is_file():
        recs = [r.raw for r in read_records(pool, on_bad_record="skip", check_duplicate_ids=False)]
        keep = sorted(random.Random(0).sample(range(len(recs)), min(args.full_data_limit, len(recs))))
        write_jsonl(path, (recs[i] for i in keep))
    return str(path)


def run_pilot(args: ExperimentArgs, pool: list[str], targets: dict[str, str], out: Path) -> dict[str, Any]:
    """Choose the fine-tuning ``lr`` / ``epochs`` on a pilot, before any test-set evaluation.

    One LoRA per (lr, epochs) pair of ``pilot:`` on ``records`` seeded random pool records;
    each is scored by its mean response loss over the pilot sets (``pilot_<task>.jsonl`` of
    ``pool: evidence``: items disjoint from the targets, the held-out sets and the test
    items), and the pair with the lowest loss wins. Values the user fixed under ``train:``
    are kept. Cached in ``out/pilot/pilot.json`` with every pair's training loss curve ends.
    """
    if args.pool != ["evidence"]:
        raise ConfigError("pilot: needs pool: evidence (its pilot_<task>.jsonl validation sets)")
    from coreselect.data.readers import read_records
    from coreselect.io import write_jsonl

    cfg = {"lrs": [1e-4, 3e-4, 1e-3], "epochs": [2], "records": 200, "seed": 0, **args.pilot}
    fixed = {k: args.train[k] for k in ("lr", "epochs") if k in args.train}
    folder = evidence_dir(args)
    files = [str(folder / f"pilot_{task_label(t)}.jsonl") for t in targets]
    base = out / "pilot"
    data = base / f"data-{cfg['records']}-s{cfg['seed']}.jsonl"
    if not data.is_file():
        recs = [r.raw for r in read_records(pool, on_bad_record="skip", check_duplicate_ids=False)]
        keep = sorted(random.Random(int(cfg["seed"])).sample(range(len(recs)), min(int(cfg["records"]), len(recs))))
        write_jsonl(data, (recs[i] for i in keep))
    runs: list[dict[str, Any]] = []
    loaded: dict[str, Any] = {}
    for lr in [fixed["lr"]] if "lr" in fixed else cfg["lrs"]:
        for epochs in [fixed["epochs"]] if "epochs" in fixed else cfg["epochs"]:
            name = f"lr{float(lr):g}-e{epochs}"
            recipe = {**args.train, "lr": float(lr), "epochs": epochs}
            adapter = run_train(args, str(data), int(cfg["seed"]), base / "train" / name, recipe=recipe)
            res = _pilot_loss(args, adapter, files, base / "eval" / name, recipe, loaded)
            trained = _read(base / "train" / name / "run.json") or {}
            runs.append(
                {
                    "lr": float(lr),
                    "epochs": epochs,
                    "pilot_loss": res["loss"],
                    "pilot_ci95": res.get("ci95"),
                    "first_loss": trained.get("first_loss"),
                    "final_loss": trained.get("final_loss"),
                    "train_s": (trained.get("timings") or {}).get("train_s"),
                }
            )
            _say(f"pilot {name}: pilot loss {res['loss']:.4f}")
    before = _pilot_loss(args, None, files, base / "eval" / "pretrained", args.train, loaded)
    best = min(runs, key=lambda r: r["pilot_loss"])
    info = {
        "chosen": {"lr": best["lr"], "epochs": best["epochs"]},
        "runs": runs,
        "pretrained_pilot_loss": before["loss"],
        "records": data.name,
        "pilot_files": files,
        "rule": "lowest mean response loss over the pilot sets' examples (not the test or held-out sets)",
    }
    write_json(base / "pilot.json", info)
    _say(f"pilot: chose lr {best['lr']:g}, {best['epochs']} epochs (pretrained pilot loss {before['loss']:.4f})")
    return info


def _pilot_loss(
    args: ExperimentArgs,
    adapter: Path | None,
    files: list[str],
    out: Path,
    recipe: dict[str, Any],
    loaded: dict[str, Any],
) -> dict[str, Any]:
    """The mean held-out loss of a pilot model on the pilot files (cached in ``out/eval.json``)."""
    old = _read(out / "eval.json")
    if (
        old is not None
        and old.get("heldout")
        and not (adapter is not None and _newer(adapter.parent / "run.json", out / "eval.json"))
    ):
        return dict(old["heldout"])
    eargs = _eval_args(args, adapter, out, files, recipe, task="")
    model = tok = None
    if adapter is None:
        model, tok = base_model(args, loaded)
    return dict(evaluate_command(eargs, model=model, tokenizer=tok)["heldout"])


def _first_seed_selections(args: ExperimentArgs, tasks: list[str], root: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """``({"row", "budget", "task"}, selection folder)`` of every row's first-seed coreset(s)."""
    owners: list[str | None] = [None] if args.coresets == "joint" else list(tasks)
    for method in args.methods:
        plan = row_plan(method, args.variants)
        for budget in args.budgets:
            for owner in owners:
                where = {"row": plan.label, "budget": budget, "task": task_label(owner) if owner else "joint"}
                yield where, _selection_dirs(args, root, owner, plan.select, budget, args.seeds[0])


def _scores_folder(sel: Path) -> Path:
    """The folder holding a selection's ``scores.parquet``: its own, or, for a per-task coreset
    cut from a multi-target pass (``derived_from`` in its run.json), that pass's."""
    return Path((_read(sel / "run.json") or {}).get("derived_from") or sel)


def coreset_mix(
    args: ExperimentArgs, tasks: list[str], root: Path, pool: list[str] | None = None
) -> list[dict[str, Any]]:
    """The source mix (records' ``dataset`` field) of each row's seed-0 coreset(s), and, given the
    setting's ``pool``, its length bias: mean length of the coreset and of the pool, and per task
    :func:`coreselect.compare.length_bias` of the selection's ``score_<task>`` (or ``score``).

    Length is the record's characters (every message's content), so that the table needs no
    tokenizer; a rank correlation is the same for any length unit that grows with it.
    """
    from collections import Counter

    import numpy as np

    from coreselect.compare import length_bias
    from coreselect.data.readers import pool_records

    chars: dict[int, int] = {}
    if pool:
        for rec in pool_records(pool):
            chars[rec.index] = sum(len(m.content) for m in rec.messages)
    pool_chars = statistics.fmean(chars.values()) if chars else None
    found: list[dict[str, Any]] = []
    for where, sel in _first_seed_selections(args, tasks, root):
        path = sel / "coreset.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        mix = Counter(str(r.get("dataset") or r.get("source") or "?") for r in rows)
        entry: dict[str, Any] = {**where, "n": len(rows), "mix": dict(sorted(mix.items()))}
        scores_path = _scores_folder(sel) / "scores.parquet"
        if chars and scores_path.is_file():
            import pyarrow.parquet as pq

            table = pq.read_table(scores_path)
            index = table.column("index").to_pylist()
            if all(i in chars for i in index):
                lengths = np.array([chars[i] for i in index])
                mine = [_raw_chars(r) for r in rows]
                rho: dict[str, float | None] = {}
                for task in tasks:
                    col = f"score_{task}" if f"score_{task}" in table.column_names else None
                    if col is None and where["task"] == task_label(task):
                        col = "score"
                    if col is not None:
                        rho[task_label(task)] = length_bias(table.column(col).to_numpy(), lengths)
                entry.update(chars=statistics.fmean(mine) if mine else None, pool_chars=pool_chars)
                entry["length_rho"] = rho
        found.append(entry)
    return found


def rank_agreement(args: ExperimentArgs, tasks: list[str], root: Path) -> list[dict[str, Any]]:
    """How closely each row's seed-0 ranking follows the ``bootstrap_reference`` row's, per task:
    Spearman's rho of their ``score_<task>`` rankings and the Jaccard overlap of their own
    top-k for that task (:func:`coreselect.compare.target_comparison`), plus the records the two
    coresets share. Multi-target selections only (joint, or per-task cut from one pass)."""
    import pyarrow.parquet as pq

    from coreselect.compare import target_comparison

    ref = args.bootstrap_reference
    tables: dict[str, Any] = {}
    runs: dict[str, dict[str, Any]] = {}
    ids: dict[str, set[str]] = {}
    for where, sel in _first_seed_selections(args, tasks, root):
        shared = _scores_folder(sel)
        key = where["row"] if len(args.budgets) == 1 else f"{where['row']} {where['budget']}"
        if key in tables or not (shared / "scores.parquet").is_file():
            continue
        tables[key] = pq.read_table(shared / "scores.parquet")
        runs[key] = _read(shared / "run.json") or {}
        ids[key] = {str(i) for i in tables[key].filter(tables[key].column("selected")).column("id").to_pylist()}
    refs = [k for k in tables if k == ref or k.startswith(f"{ref} ")]
    if not refs:
        return []
    cmp = target_comparison(tables, runs)
    if not cmp:
        return []
    r0 = refs[0]

    def vs_ref(kind: str, k: str) -> dict[str, float | None]:
        return {n: (cmp.get(n) or {}).get(kind, {}).get(k, {}).get(r0) for n in map(task_label, tasks)}

    return [
        {
            "row": k,
            "reference": r0,
            "spearman": vs_ref("spearman", k),
            "jaccard": vs_ref("jaccard", k),
            "shared": len(ids[k] & ids[r0]),
            "n": len(ids[k]),
        }
        for k in tables
        if k != r0
    ]


def _raw_chars(raw: dict[str, Any]) -> int:
    """Characters of a raw coreset record: its ``text``, or every message's content."""
    if "text" in raw:
        return len(str(raw["text"]))
    return sum(len(str(m.get("content", ""))) for m in raw.get("messages") or [])


def ppl_skews(args: ExperimentArgs, tasks: list[str], root: Path) -> list[dict[str, Any]]:
    """The perplexity skew of each row's coreset (paper 003, Fig. 4), where its selection measured
    one (P2D's run.json ``ppl``): base-model mean response NLL of the coreset vs the pool."""
    found: list[dict[str, Any]] = []
    for where, sel in _first_seed_selections(args, tasks, root):
        ppl = (_read(sel / "run.json") or {}).get("ppl")
        if not isinstance(ppl, dict) or ppl.get("skews_low") is None:
            continue
        found.append(
            {
                **where,
                "pool_nll": ppl["pool"]["mean_nll"],
                "coreset_nll": ppl["selected"]["mean_nll"],
                "delta": ppl["delta_mean_nll"],
                "skews_low": ppl["skews_low"],
            }
        )
    return found


def stage_times(out: Path) -> list[dict[str, Any]]:
    """Wall time of every finished stage under ``out``, from the stages' own files.

    One entry per stage kind and folder group: ``{"stage", "where", "n", "total_s", "mean_s"}``
    (pilot trainings, warmups, selections per method, trainings, evaluations (lm-eval and
    held-out parts apart)). Shared per-task coresets (``derived_from``) are not double-counted.
    """
    groups: dict[tuple[str, str], list[float]] = {}

    def add(stage: str, where: str, seconds: Any) -> None:
        if isinstance(seconds, (int, float)):
            groups.setdefault((stage, where), []).append(float(seconds))

    for path in sorted(out.rglob("run.json")):
        rel = path.relative_to(out).parts
        info = _read(path) or {}
        if "derived_from" in info or "checkpoint" in "".join(rel):
            continue
        t = info.get("timings") or {}
        if "select" in rel:
            method = rel[rel.index("select") + 1].split("-")[0]
            add(f"select {method}", "/".join(rel[: rel.index("select")]), t.get("total_s"))
        elif "train" in rel:
            kind = "pilot train" if rel[0] == "pilot" else "train"
            add(kind, "/".join(rel[: rel.index("train")]) or ".", t.get("train_s"))
    for path in sorted(out.rglob("warmup/info.json")):
        add("warmup", "/".join(path.relative_to(out).parts[:-2]) or ".", (_read(path) or {}).get("wall_s"))
    for path in sorted(out.rglob("eval.json")):
        rel = path.relative_to(out).parts
        t = (_read(path) or {}).get("timings") or {}
        where = "/".join(rel[: rel.index("eval") - (0 if rel[0] == "pilot" else 1)]) or "."
        add("eval lm-eval", where, t.get("eval_s"))
        add("eval held-out loss", where, t.get("heldout_s"))
    return [
        {"stage": stage, "where": where, "n": len(xs), "total_s": sum(xs), "mean_s": statistics.fmean(xs)}
        for (stage, where), xs in sorted(groups.items())
    ]


def _write_all(
    args: ExperimentArgs,
    targets: dict[str, str],
    pools: dict[str, list[str]],
    t0: float,
    pilot: dict[str, Any] | None,
    full_sft: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tabulate what is on disk (every setting) into results.md / results.csv / experiment.json."""
    out = Path(args.out)
    tasks = list(targets)
    by_setting = {s: collect_results(args, tasks, setting_root(args, s)) for s in pools}
    comparisons = {s: paired_comparisons(args, tasks, setting_root(args, s)) for s in pools}
    skews = {s: ppl_skews(args, tasks, setting_root(args, s)) for s in pools}
    mixes = {s: coreset_mix(args, tasks, setting_root(args, s), pools[s]) for s in pools}
    agreement = {s: rank_agreement(args, tasks, setting_root(args, s)) for s in pools}
    info = {
        "command": "experiment",
        "settings": asdict(args),
        "pools": pools,
        "targets": targets,
        "versions": versions(),
        "hardware": hardware(),
        "wall_s": time.perf_counter() - t0,
        "full_sft": {k: v for k, v in (full_sft or {}).items() if k != "key"},
        "pilot": pilot,
        "rows": by_setting[next(iter(pools))] if len(pools) == 1 else None,
        "rows_by_setting": by_setting,
        "comparisons": comparisons,
        "stage_times": stage_times(out),
        "ppl_skews": skews,
        "coreset_mix": mixes,
        "rank_agreement": agreement,
    }
    write_results(out, args, tasks, by_setting, info, comparisons)
    write_json(out / "experiment.json", info)
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
    """The headline metric of an ``eval.json`` in percent (``None``: not evaluated, or held-out loss only)."""
    if res is None or not res.get("task"):
        return None
    return 100.0 * float(res[res.get("metric") or metric_name(res)])


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population std (numpy's default ``ddof=0``; 0 for one seed)."""
    return statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0


def collect_results(args: ExperimentArgs, tasks: list[str], root: Path | None = None) -> list[dict[str, Any]]:
    """One row per Pretrained / Full-data / (method, budget) of one setting from the files on disk.

    ``root``: the setting's folder (default ``out``). Evaluations of lm-eval tasks give the
    score columns; ``heldout_only`` tasks have a loss column only and stay out of the average.
    """
    out = Path(args.out)
    root = out if root is None else root
    names = [task_label(t) for t in tasks]
    scored = [task_label(t) for t in tasks if t not in args.heldout_only]
    rows: list[dict[str, Any]] = []

    def row(
        label: str,
        method: str,
        budget: str,
        eval_dirs: dict[str, list[Path]],
        train_dirs: list[Path],
        select_dirs: list[list[Path]],
        extra_select_s: float = 0.0,
    ) -> dict[str, Any]:
        r: dict[str, Any] = {"row": label, "method": method, "budget": budget, "tasks": {}}
        for name in names:
            evals = [_read(d / "eval.json") for d in eval_dirs[name]]
            scores = [s for res in evals if (s := _score(res)) is not None]
            losses = [float(res["heldout"]["loss"]) for res in evals if res and res.get("heldout")]
            first = next((e for e in evals if e), {})
            r["tasks"][name] = {
                "scores": scores,
                "n_items": first.get("n"),
                "shots": first.get("shots"),
                "metric": first.get("metric"),
                "losses": losses,
                "n_heldout": (first.get("heldout") or {}).get("n"),
                **(dict(zip(("mean", "std"), _mean_std(scores))) if scores else {}),
                **(dict(zip(("loss_mean", "loss_std"), _mean_std(losses))) if losses else {}),
            }
        n_runs = max(len(v) for v in eval_dirs.values())
        complete = bool(scored) and all(len(r["tasks"][n]["scores"]) == n_runs for n in scored)
        r["average"] = statistics.fmean(r["tasks"][n]["mean"] for n in scored) if complete else None
        trained = [t for d in train_dirs if (t := _read(d / "run.json"))]
        times = [t["timings"]["train_s"] for t in trained]
        r["train_s"] = statistics.fmean(times) if times else None
        # tokens the model saw per epoch (after truncation): equal record budgets are not equal
        # token budgets when one method picks longer records
        tokens = [float(t["tokens"]) for t in trained if isinstance(t.get("tokens"), (int, float))]
        r["train_tokens"] = statistics.fmean(tokens) if tokens else None
        # summed over the selections of the row (one per task, or one joint); a selection
        # redrawn per seed counts as the mean of its draws
        per_owner = [[j["timings"]["total_s"] for d in draws if (j := _read(d / "run.json"))] for draws in select_dirs]
        sel = [statistics.fmean(ts) for ts in per_owner if ts]
        r["select_s"] = sum(sel) + extra_select_s if sel else None
        r["n_runs"] = n_runs
        return r

    def evals(name: str) -> dict[str, list[Path]]:
        return {n: [root / n / "eval" / name.format(seed=s) for s in args.seeds] for n in names}

    if args.include_pretrained:
        pre = {n: [pretrained_dir(args, n)] for n in names}
        rows.append(row("Pretrained", "pretrained", "", pre, [], []))
    if args.include_full_data:
        fseeds = args.full_data_seeds or args.seeds
        label = "Full-data" if args.full_data_limit is None else f"Full-data ({args.full_data_limit} records)"
        rows.append(
            row(
                label,
                "full",
                "100%",
                {n: [root / n / "eval" / f"full-s{s}" for s in fseeds] for n in names},
                [root / "full" / "train" / f"full-s{s}" for s in fseeds],
                [],
            )
        )
    warm = _read(root / "warmup" / "info.json") or {}
    joint = args.coresets == "joint"
    for method in args.methods:
        plan = row_plan(method, args.variants)
        sel_method, name = plan.select, plan.label
        for budget in args.budgets:
            tag = budget_tag(budget)
            rn = f"{method}-{tag}"
            label = name if len(args.budgets) == 1 else f"{name} ({budget})"
            extra = float(warm.get("wall_s") or 0.0) if _uses_warmup(method, args.variants) else 0.0
            for src, key in plan.extra_cost:  # e.g. P2D-double-dagger: locating H_T (the p2d selection's stage 1)
                extra += sum(
                    float(
                        ((_read(root / n / "select" / f"{src}-{tag}" / "run.json") or {}).get("stats") or {}).get(key)
                        or 0.0
                    )
                    for n in names
                )
            seeds = args.seeds if sel_method in args.reselect_per_seed else args.seeds[:1]
            owners: list[str | None] = [None] if joint else list(tasks)
            select_dirs = [[_selection_dirs(args, root, o, sel_method, budget, s) for s in seeds] for o in owners]
            train_dirs = (
                [root / "joint" / "train" / f"{rn}-s{s}" for s in args.seeds]
                if joint
                else [root / n / "train" / f"{rn}-s{s}" for n in names for s in args.seeds]
            )
            rows.append(row(label, method, budget, evals(rn + "-s{seed}"), train_dirs, select_dirs, extra))
    full_sft_s = (_read(out / "full_sft.json") or {}).get("full_sft_s")
    for r in rows:
        r["aer"] = _aer(r, 1 if joint else len(names), full_sft_s)
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


def _num(x: float | None, digits: int, signed: bool = False) -> str:
    """A table cell: ``x`` with ``digits`` decimals (``+`` sign when ``signed``), "–" for None."""
    return "–" if x is None else f"{x:{'+' if signed else ''}.{digits}f}"


def _secs(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def _table(args: ExperimentArgs, tasks: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """The Table 1 layout of one setting's rows (markdown lines)."""
    names = [task_label(t) for t in tasks if t not in args.heldout_only]
    held = [task_label(t) for t in tasks if t in args.heldout]
    header = [
        "Method",
        *names,
        *(f"{n} loss" for n in held),
        "Average",
        "Select (s)",
        "Train (s)",
        "Train tokens",
        "AER",
    ]
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
            _secs(r.get("train_tokens")),
            "–" if r.get("aer") is None else f"{r['aer']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _comparison_table(comparisons: list[dict[str, Any]]) -> list[str]:
    """The paired bootstrap comparisons as markdown lines (empty when there are none)."""
    if not comparisons:
        return []
    ref = comparisons[0]["reference"]
    lines = [
        "",
        f"Paired bootstrap, {ref} minus each row, on the same items; each resample draws the items and, "
        "on each side, the fine-tuning seeds (with replacement), so the interval includes the seed-to-seed "
        "spread; accuracy in points (positive: "
        f"{ref} better), held-out loss in nats/token (negative: {ref} better); 95% percentile interval; "
        f"p: the share of resampled differences on the other side of 0 ({ref} not better).",
        "",
        "| Row | Task | Metric | Items | Seeds | Difference | 95% interval | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        scale, digits = (100.0, 2) if c["metric"] == "acc" else (1.0, 4)
        p = c["p_le0"] if c["metric"] == "acc" else c["p_ge0"]
        lines.append(
            f"| {c['row']} | {c['task']} | {c['metric']} | {c['n']} | {c['n_seeds_ref']} vs {c['n_seeds_other']} | "
            f"{scale * c['diff']:+.{digits}f} | [{scale * c['lo']:+.{digits}f}, {scale * c['hi']:+.{digits}f}] | "
            f"{p:.3f} |"
        )
    return lines


def write_results(
    out: Path,
    args: ExperimentArgs,
    tasks: list[str],
    rows: list[dict[str, Any]] | dict[str, list[dict[str, Any]]],
    info: dict[str, Any] | None = None,
    comparisons: dict[str, list[dict[str, Any]]] | None = None,
) -> None:
    """``results.md`` (Table 1 layout, one table per setting) and ``results.csv`` (the same numbers)."""
    from coreselect.io import atomic_path

    by_setting = rows if isinstance(rows, dict) else {args.settings[0]: rows}
    all_rows = [r for rs in by_setting.values() for r in rs]
    names = [task_label(t) for t in tasks]
    scored = [n for t, n in zip(tasks, names, strict=True) if t not in args.heldout_only]
    held = [task_label(t) for t in tasks if t in args.heldout]
    body: list[str] = []
    for setting, srows in by_setting.items():
        if len(by_setting) > 1 or setting != "in_domain":
            body += [f"## {setting}", ""]
        body += _table(args, tasks, srows)
        body += _comparison_table((comparisons or {}).get(setting) or [])
        mixes = ((info or {}).get("coreset_mix") or {}).get(setting) or []
        if mixes:
            sources = sorted({src for m in mixes for src in m["mix"]})
            body += [
                "",
                f"Source mix of the coresets (seed {args.seeds[0]}; % of each coreset's records by their `dataset`):",
                "",
                "| Row | Coreset for | Records | " + " | ".join(sources) + " |",
                "|---|---|---|" + "---|" * len(sources),
            ]
            body += [
                f"| {m['row']} | {m['task']} | {m['n']} | "
                + " | ".join(f"{100 * m['mix'].get(src, 0) / max(m['n'], 1):.0f}" for src in sources)
                + " |"
                for m in mixes
            ]
        lengthy = [m for m in mixes if "length_rho" in m]
        if lengthy:
            names_rho = [task_label(t) for t in tasks]
            body += [
                "",
                "Length bias of the coresets (seed 0): mean characters per record, coreset vs pool, and Spearman's "
                "ρ between each target's score and the record's length over the pool (negative: short records rank "
                "high; `coreselect.compare.length_bias`).",
                "",
                "| Row | Coreset for | Coreset chars | Pool chars | " + " | ".join(f"ρ {n}" for n in names_rho) + " |",
                "|---|---|---|---|" + "---|" * len(names_rho),
            ]
            body += [
                f"| {m['row']} | {m['task']} | {_num(m['chars'], 0)} | {_num(m['pool_chars'], 0)} | "
                + " | ".join(_num(m["length_rho"].get(n), 2, signed=True) for n in names_rho)
                + " |"
                for m in lengthy
            ]
        agree = ((info or {}).get("rank_agreement") or {}).get(setting) or []
        if agree:
            names_a = [task_label(t) for t in tasks]
            body += [
                "",
                f"Rank agreement with `{agree[0]['reference']}` (seed 0): Spearman's ρ of each target's score "
                "ranking over the pool, the Jaccard overlap of that target's own top-k, and the records the two "
                "coresets share.",
                "",
                "| Row | "
                + " | ".join(f"ρ {n}" for n in names_a)
                + " | "
                + " | ".join(f"top-k J {n}" for n in names_a)
                + " | Shared records |",
                "|---|" + "---|" * (2 * len(names_a) + 1),
            ]
            body += [
                f"| {a['row']} | "
                + " | ".join(_num(a["spearman"].get(n), 2, signed=True) for n in names_a)
                + " | "
                + " | ".join(_num(a["jaccard"].get(n), 2) for n in names_a)
                + f" | {a['shared']} of {a['n']} |"
                for a in agree
            ]
        skews = ((info or {}).get("ppl_skews") or {}).get(setting) or []
        if skews:
            body += [
                "",
                "Perplexity skew of the coresets (P2D paper, Fig. 4): the base model's mean response NLL "
                "(nats/token) of the coreset vs a seeded sample of the pool (run.json `ppl`).",
                "",
                "| Row | Coreset for | Pool NLL | Coreset NLL | Difference | Lower? |",
                "|---|---|---|---|---|---|",
            ]
            body += [
                f"| {k['row']} | {k['task']} | {k['pool_nll']:.4f} | {k['coreset_nll']:.4f} | {k['delta']:+.4f} | "
                f"{'yes' if k['skews_low'] else 'no'} |"
                for k in skews
            ]
        body.append("")

    def first(key: str) -> dict[str, Any]:
        return {
            n: next((r["tasks"][n][key] for r in all_rows if r["tasks"][n].get(key) is not None), None) for n in names
        }

    n_items, shots, metrics, n_held = first("n_items"), first("shots"), first("metric"), first("n_heldout")
    budgets = ", ".join(args.budgets)
    coresets = (
        "one joint coreset per method and seed, selected for all tasks at once (multi-target, quota combine)"
        if args.coresets == "joint"
        else "one coreset per task"
    )
    trained = (
        f"a fresh `{args.model}` fine-tuned with LoRA (P2D, P2D‡: only the selected attention heads) on each "
        f"method's {budgets} coreset ({coresets})"
    )
    lm_eval_note = (
        f"Score (%) of {trained}, evaluated with lm-eval-harness; "
        f"mean (std) over seeds {args.seeds} (population std, 0.00 with one seed). "
        "Metric per task: " + ", ".join(f"{n} `{metrics[n]}`" for n in scored) + " (each eval.json also holds "
        "every metric with a 95% CI). Average: macro average over the lm-eval tasks. "
        "Test items per task: "
        + ", ".join(f"{n} {n_items[n]}" for n in scored)
        + "; shots per task: "
        + ", ".join(f"{n} {shots[n]}" for n in scored)
        + "."
        if scored
        else f"Rows: {trained}; mean (std) over seeds {args.seeds} (population std, 0.00 with one seed)."
    )
    notes = [
        lm_eval_note
        + (
            f" Scored by held-out loss only: {', '.join(map(task_label, args.heldout_only))}."
            if args.heldout_only
            else ""
        ),
        (
            "Select (s): selection wall time summed over the tasks (model-based methods include the one shared "
            "warmup; P2D‡ includes locating the heads; a selection redrawn per seed counts as the mean of its "
            "draws). Train (s): mean wall time of one fine-tuning run. Train tokens: mean tokens per epoch "
            "the fine-tuning saw (after truncation to its max_length)."
        ),
        "AER (Alignment Efficiency Ratio, lower is better): (Select (s) / number of tasks + Train (s)) / "
        "full-data full-parameter SFT wall time on the same hardware; " + _full_sft_note(_read(out / "full_sft.json")),
    ]
    if held:
        notes.append(
            "Held-out loss ({task} loss): mean response-token cross-entropy (nats/token, lower is better) "
            "on the held-out target-format examples of `heldout:` ("
            + ", ".join(
                f"{task_label(t)}: {Path(f).name} ({n_held.get(task_label(t))})" for t, f in args.heldout.items()
            )
            + "), mean (std) over seeds; each eval.json holds its 95% t-interval over examples."
        )
    if info is not None:
        hw = info["hardware"]
        dev = hw.get("gpu") or f"CPU only, {hw['cpu_count']} cores ({hw['torch_threads']} torch threads)"
        notes.append(f"Hardware: {dev}. Experiment wall time (this invocation): {info['wall_s']:.0f} s.")
        if info.get("stage_times"):
            notes += ["", "Wall time by stage (seconds; from each stage's run.json / eval.json):", ""]
            notes += ["| Stage | Where | Runs | Total (s) | Mean (s) |", "|---|---|---|---|---|"]
            notes += [
                f"| {t['stage']} | {t['where']} | {t['n']} | {t['total_s']:.0f} | {t['mean_s']:.0f} |"
                for t in info["stage_times"]
            ]
            notes.append("")
        if info.get("pilot"):
            ch = info["pilot"]["chosen"]
            notes.append(
                f"Fine-tuning recipe chosen on the pilot (pilot/pilot.json): lr {ch['lr']:g}, {ch['epochs']} epochs."
            )
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("# Results\n\n" + "\n".join(body + notes) + "\n", encoding="utf-8")
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                *(["setting"] if len(by_setting) > 1 else []),
                "row",
                "method",
                "budget",
                "n_seeds",
                *(f"{n}_{k}" for n in scored for k in ("mean", "std")),
                *(f"{n}_loss_{k}" for n in held for k in ("mean", "std")),
                "average",
                "select_s",
                "train_s",
                "train_tokens",
                "aer",
            ]
        )
        for setting, srows in by_setting.items():
            for r in srows:
                vals: list[Any] = []
                for n in scored:
                    t = r["tasks"][n]
                    vals += [_fmt(t.get("mean")), _fmt(t.get("std"))]
                for n in held:
                    t = r["tasks"][n]
                    vals += [_fmt(t.get("loss_mean")), _fmt(t.get("loss_std"))]
                w.writerow(
                    [
                        *([setting] if len(by_setting) > 1 else []),
                        r["row"],
                        r["method"],
                        r["budget"],
                        max(max(len(t["scores"]), len(t["losses"])) for t in r["tasks"].values()),
                        *vals,
                        _fmt(r["average"]),
                        _fmt(r["select_s"]),
                        _fmt(r["train_s"]),
                        _fmt(r.get("train_tokens")),
                        _fmt(r.get("aer")),
                    ]
                )


def _per_item(dirs: list[Path], kind: str) -> list[dict[str, float]]:
    """Per-item values of each evaluation that exists (one dict per seed's folder): ``acc`` from
    lm-eval's samples files (keyed by ``doc_id``), ``loss`` from ``heldout.jsonl`` (keyed by record id)."""
    runs: list[dict[str, float]] = []
    for d in dirs:
        files = sorted(d.glob("samples_*.jsonl")) if kind == "acc" else [d / "heldout.jsonl"]
        files = [f for f in files if f.is_file()]
        if not files or not (d / "eval.json").is_file():
            continue
        vals: dict[str, float] = {}
        for f in files:
            for line in f.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                key, val = (f"{f.stem}:{rec['doc_id']}", rec.get("acc")) if kind == "acc" else (rec["id"], rec["loss"])
                if val is not None:
                    vals[key] = float(val)
        runs.append(vals)
    return runs


def paired_comparisons(args: ExperimentArgs, tasks: list[str], root: Path) -> list[dict[str, Any]]:
    """Paired bootstrap of ``bootstrap_reference`` against every other row, per task and metric.

    Each side contributes one row of per-item values per fine-tuning seed it has, and the
    bootstrap resamples the seeds as well as the items (:func:`coreselect.eval.bootstrap.paired_bootstrap`),
    so the interval holds the seed-to-seed spread too; only items every seed of both sides has
    are compared.
    """
    from coreselect.eval.bootstrap import paired_bootstrap

    ref = args.bootstrap_reference
    if not ref or ref not in args.methods:
        return []
    found: list[dict[str, Any]] = []
    for budget in args.budgets:
        tag = budget_tag(budget)
        others = [
            (row_plan(m, args.variants).label, [f"{m}-{tag}-s{s}" for s in args.seeds])
            for m in args.methods
            if m != ref
        ]
        if args.include_pretrained:
            others.insert(0, ("Pretrained", ["pretrained"]))
        for task in tasks:
            name = task_label(task)
            kinds = (["acc"] if task not in args.heldout_only else []) + (["loss"] if task in args.heldout else [])
            for kind in kinds:
                ref_runs = _per_item([root / name / "eval" / f"{ref}-{tag}-s{s}" for s in args.seeds], kind)
                if not ref_runs:
                    continue
                for label, runs in others:
                    dirs = (
                        [pretrained_dir(args, task)]
                        if runs == ["pretrained"]
                        else [root / name / "eval" / r for r in runs]
                    )
                    other_runs = _per_item(dirs, kind)
                    keys = sorted(set.intersection(*(set(r) for r in ref_runs + other_runs))) if other_runs else []
                    if not keys:
                        continue
                    res = paired_bootstrap(
                        [[r[k] for k in keys] for r in ref_runs],
                        [[r[k] for k in keys] for r in other_runs],
                        iters=args.bootstrap_iters,
                    )
                    found.append(
                        {
                            "reference": row_plan(ref, args.variants).label,
                            "row": label if len(args.budgets) == 1 else f"{label} ({budget})",
                            "task": name,
                            "metric": kind,
                            "n_seeds_ref": len(ref_runs),
                            "n_seeds_other": len(other_runs),
                            **res,
                        }
                    )
    return found


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
