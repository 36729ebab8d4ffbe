"""Arguments of ``select`` (and the commands built on it), and how a dict becomes them.

One rule names every per-method option, in ``select``, ``compare``, ``experiment``, YAML and
Python alike: **flat keys, routed by name**. A key that is a :class:`SelectArgs` field is a
run setting; any other key is an option of the method's config dataclass
(:mod:`coreselect.methods.registry`) and lands in :attr:`SelectArgs.options`. So
``select --method bm25 --k1 1.2``, ``k1: 1.2`` in a YAML config and
``coreselect.select(method="bm25", k1=1.2)`` are the same. Under ``options`` a key that is a
method name holds that method's own options (``options: {bm25: {scope: prompt}}``), for
runs of several methods (``compare``, ``experiment``) whose knobs share a name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from coreselect.data.formatting import TemplateChoice
from coreselect.data.records import OnBadRecord
from coreselect.errors import ConfigError, CoreselectError
from coreselect.methods import registry


def known_methods() -> list[str]:
    return registry.names()


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


T = TypeVar("T", bound=type)


def accepts_method_options(cls: T) -> T:
    """Let ``cls(...)`` take method options as flat keywords (they go to ``options``)."""
    # the two misc ignores: mypy refuses to read or assign ``__init__`` through a class object
    init: Callable[..., None] = cls.__init__  # type: ignore[misc]
    own = {f.name for f in fields(cls)}

    @functools.wraps(init)
    def __init__(self: Any, **kw: Any) -> None:
        extra = {k: kw.pop(k) for k in list(kw) if k not in own}
        init(self, **kw)
        if extra:
            self.options = {**self.options, **extra}

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


#: ``SelectArgs`` fields by concern, in ``--help`` order (fields not listed go to "run control")
GROUPS: dict[str, tuple[str, ...]] = {
    "inputs and outputs (--pool, --out and, but for random, --target are required)": (
        "pool",
        "target",
        "out",
        "method",
        "model",
        "budget",
    ),
    "formatting": ("max_length", "template", "template_date"),
    "warmup": tuple(f.name for f in fields(WarmupSettings)),
    "several targets (--target NAME=FILE ...)": ("combine", "quota"),
    "engine": ("engine", "shard_records", "num_shards", "shard_index", "ray_address", "ray_actors"),
}


@accepts_method_options
@dataclass
class SelectArgs(WarmupSettings):
    """Arguments of ``coreselect select`` (YAML config keys are the same names).

    The chosen method's own options (``--layers``, ``--k1``, ...) are keys of ``options``;
    see the module doc for how they are named.

    Attributes:
        pool: pool files (JSONL / JSON / Parquet / ``load_from_disk`` folder / hub name); from
            Python also ``datasets.Dataset`` / ``IterableDataset`` objects.
        target: the few target examples (same formats); ``NAME=FILE`` entries (YAML: a mapping
            ``{name: file}``) are several named targets, selected for in one run.
        combine: several targets: ``quota`` (default), ``max``, ``mean`` or ``round-robin``
            (max / mean over rank-normalized per-target scores; see ``coreselect.combine``).
        quota: several targets, ``--combine quota``: budget shares ``csqa=50%,siqa=25%``
            (unnamed targets share the rest; default: equal split).
        out: output folder.
        method: selection method (``trim``, ``random``, ``bm25``, ``dsir``, ...).
        model: causal LM: folder, ``.gguf`` file, hub id, or ``smollm2`` (the packaged default).
        budget: ``5%`` of the pool or an absolute count.
        max_length: truncate records longer than this many tokens.
        template: ``auto`` / ``chat`` / ``plain`` prompt formatting.
        template_date: the date chat templates see (``date_string`` / ``strftime_now``; Llama 3.x
            writes it into every prompt), fixed so a record renders the same on every day.
        shard_records: records per score shard (streaming and resume granularity).
        num_shards, shard_index: score only the shard chunks ``j`` with ``j % num_shards ==
            shard_index`` (one process per GPU); with ``num_shards > 1`` nothing is finalized:
            run ``coreselect merge`` once every shard process is done.
        engine: ``local`` (this process) or ``ray`` (scoring on a Ray Data actor pool).
        ray_address: Ray cluster to join (default: ``RAY_ADDRESS`` or a local Ray).
        ray_actors: scoring actors for ``--engine ray`` (0 = one per GPU, else 1).
        seed: seeds the warmup subset, training and sampling methods.
        dtype, device: ``auto`` = fp32 on CPU, bf16 on GPU.
        trust_remote_code: allow model code from the hub (off unless asked).
        on_bad_record: ``error`` (stop at the first bad record) or ``skip`` (log it to rejects.jsonl).
            Either way, a record whose turn order the model's chat template refuses stops the
            run before the model loads (``runtime.scan_pool``).
        overwrite: replace a previous run in ``out``.
        resume: continue an interrupted run in ``out``.
        progress: show progress bars.
        options: the method's options (flat keys; a method name key holds that method's own).
    """

    pool: list[str] = field(default_factory=list)
    target: list[str] = field(default_factory=list)
    out: str = ""
    method: str = "trim"
    model: str = "smollm2"
    budget: str = "5%"
    max_length: int = 2048
    template: TemplateChoice = "auto"
    template_date: str = "26 Jul 2024"
    shard_records: int = 2048
    num_shards: int = 1
    shard_index: int = 0
    engine: str = "local"
    ray_address: str | None = None
    ray_actors: int = 0
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    on_bad_record: OnBadRecord = "error"
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    combine: str = "quota"
    quota: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.pool, str):
            self.pool = [self.pool]
        if isinstance(self.target, str):
            self.target = [self.target]
        if isinstance(self.target, dict):  # YAML ``target: {csqa: a.jsonl, siqa: [b.jsonl, c.jsonl]}``
            self.target = [
                f"{name}={p}"
                for name, paths in self.target.items()
                for p in ([paths] if isinstance(paths, str) else paths)
            ]
        from coreselect.data.hf_datasets import as_inputs

        self.pool, self.target = as_inputs(self.pool), as_inputs(self.target)  # Dataset objects: labelled str
        self.budget = str(self.budget)

    # ------------------------------------------------------------------ the method's options
    def method_options(self, method: str | None = None, *, strict: bool = True) -> dict[str, Any]:
        """The options of ``method`` (default: ``self.method``): flat keys it has, then its own dict.

        ``strict``: a flat key the method does not have is an error (``select``); otherwise it
        is left to the other methods of the run (``compare``, ``experiment``).
        """
        name = method or self.method
        spec = registry.get(name)
        mine = set(spec.option_names())
        flat = {k: v for k, v in self.options.items() if k not in registry.names()}
        if strict:
            spec.make_config(flat)  # names the unknown key(s)
        own = self.options.get(name) or {}
        if not isinstance(own, dict):
            raise ConfigError(f"options.{name} must be a mapping of {name}'s options")
        return {**{k: v for k, v in flat.items() if k in mine}, **own}

    def method_config(self, method: str | None = None, *, strict: bool = True) -> Any:
        """The method's validated config dataclass (inherited fields from this run)."""
        name = method or self.method
        run = {cfg: getattr(self, arg) for cfg, arg in registry.INHERITED.items()}
        return registry.get(name).make_config(self.method_options(name, strict=strict), run)

    def settings(self) -> dict[str, Any]:
        """run.json's ``settings``: the run fields and every option of the method (defaults
        included), flat, so :meth:`from_settings` rebuilds the run."""
        from dataclasses import asdict

        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        config = asdict(self.method_config(strict=False)) if self.method in known_methods() else {}
        inherited = set(registry.INHERITED)
        return {**out, **{k: v for k, v in config.items() if k not in inherited}}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> SelectArgs:
        """Rebuild the args of a finished run from its run.json ``settings`` (old runs too): keys
        that are neither a field nor an option of the run's method are dropped."""
        own = {f.name for f in fields(cls)}
        method = str(settings.get("method", "trim"))
        opts = set(registry.get(method).option_names()) if method in known_methods() else set()
        data = {k: v for k, v in settings.items() if k in own or k in opts}
        return cls(**data)

    def target_sets(self) -> dict[str, list[str]]:
        """The target files by target name (issue 14 §1).

        ``NAME=FILE`` entries name their target (several entries with one name are one set);
        plain entries are the one unnamed target ``"target"`` (today's single-target run).
        Named and unnamed entries do not mix.
        """
        named: dict[str, list[str]] = {}
        plain: list[str] = []
        for entry in self.target:
            name, path = split_target(entry)
            if name is None:
                plain.append(path)
            else:
                named.setdefault(name, []).append(path)
        if named and plain:
            raise ConfigError(f"--target: mix of named (NAME=FILE) and unnamed entries ({plain[0]})")
        return named or ({"target": plain} if plain else {})

    # ------------------------------------------------------------------ checks
    def validate(self, *, need_target: bool = True, need_pool: bool = True) -> None:
        """Cheap checks that run before any heavy work."""
        if need_pool and not self.pool:
            raise ConfigError("no pool given (--pool FILE [FILE ...])")
        if not self.out:
            raise ConfigError("no output folder given (--out DIR)")
        if self.method not in known_methods():
            raise ConfigError(f"unknown method {self.method!r} (known: {', '.join(known_methods())})")
        spec = registry.get(self.method)
        config = self.method_config()
        if need_target and not self.target and spec.cls.requires_target(config):
            raise ConfigError("no target given (--target FILE)")
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"on_bad_record must be error or skip, got {self.on_bad_record!r}")
        from coreselect.data.formatting import parse_template_date

        parse_template_date(self.template_date)  # a bad --template-date fails before the model loads
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        if self.shard_records < 1:
            raise ConfigError(f"shard_records must be >= 1, got {self.shard_records}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"need num_shards >= 1 and 0 <= shard_index < num_shards, got {self.num_shards} / {self.shard_index}"
            )
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"engine must be local or ray, got {self.engine!r}")
        if self.engine == "ray" and not spec.streaming:
            raise ConfigError(f"--engine ray runs streaming methods; {self.method} scores the whole pool at once")
        if self.num_shards > 1 and not spec.streaming:
            raise ConfigError(f"--num-shards needs a per-record method; {self.method} scores the whole pool at once")
        if self.engine == "ray" and self.num_shards > 1:
            raise ConfigError("--engine ray distributes the pool itself; drop --num-shards")
        if self.num_shards > 1 and self.warmup == "auto" and spec.needs_model:
            raise ConfigError(
                "with --num-shards > 1 pass --warmup none or a saved adapter (train it once first, "
                "e.g. with coreselect fingerprint --warmup auto)"
            )
        if self.ray_actors < 0:
            raise ConfigError(f"ray_actors must be >= 0, got {self.ray_actors}")
        if not 0 < self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction must be in (0, 1], got {self.warmup_fraction}")
        if self.warmup not in ("auto", "none") and not (Path(self.warmup) / "adapter_config.json").exists():
            raise ConfigError(f"{self.warmup}: --warmup must be auto, none or a saved adapter folder")
        sets = self.target_sets()
        if len(sets) > 1:
            from coreselect.combine import COMBINE_MODES, parse_quota

            if self.combine not in COMBINE_MODES:
                raise ConfigError(f"--combine must be one of {', '.join(COMBINE_MODES)}, got {self.combine!r}")
            parse_quota(self.quota or None, list(sets))
        for p in [*self.pool, *(p for paths in sets.values() for p in paths)]:
            if not isinstance(p, str):
                raise ConfigError(
                    f"pool/target entries must be paths or datasets.Dataset objects, got {type(p).__name__}"
                )
            local = p.startswith((".", "/", "~")) or Path(p).suffix in (".jsonl", ".json", ".parquet", ".gz")
            if local and not Path(p).expanduser().exists():
                raise CoreselectError(f"{p}: no such file")


_TARGET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def split_target(entry: Any) -> tuple[str | None, Any]:
    """``"csqa=a.jsonl"`` -> ``("csqa", "a.jsonl")``; a plain path (or an existing file whose
    name holds ``=``, or a dataset object) -> ``(None, entry)``."""
    if not isinstance(entry, str) or "=" not in entry or Path(entry).expanduser().exists():
        return None, entry
    name, path = entry.split("=", 1)
    if not _TARGET_NAME.match(name) or not path:
        return None, entry
    return name, path


def args_from_dict(cls: type, data: dict[str, Any], source: str = "config") -> Any:
    """Build a dataclass from a dict, rejecting unknown keys with a clear message.

    For :class:`SelectArgs` and its subclasses, keys that are no field are method options
    (checked against the method's config by ``validate``).
    """
    if issubclass(cls, SelectArgs):
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]  # every args class is a dataclass
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
    return cls(**data)
