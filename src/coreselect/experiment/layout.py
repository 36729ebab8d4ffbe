"""Where an experiment's inputs and outputs live: the pool and targets it resolves, the folders of
its settings, selections and rows, and the small helpers every stage shares (progress lines, a
stage's JSON file, staleness)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from coreselect.errors import ConfigError, CoreselectError
from coreselect.eval.command import exclude_texts
from coreselect.experiment.args import ExperimentArgs


def say(msg: str) -> None:
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


def _extra_sources(args: ExperimentArgs) -> tuple[str, ...]:
    """``extra_sources`` in a canonical order: the same set names the same pool folder."""
    return tuple(sorted(set(args.extra_sources)))


def evidence_dir(args: ExperimentArgs) -> Path:
    """Where ``pool: evidence`` is built (cached, :func:`coreselect.evidence_pool.build_evidence_pool`)."""
    from coreselect import assets

    extra = "".join(f"+{s}" for s in _extra_sources(args))
    return assets.CACHE_DIR / "data" / f"evidence-{args.pool_per_source}{extra}"


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
    """Output folder of a setting: ``out/<setting>/``, or ``out`` itself for a lone in_domain setting.

    A lone ``in_domain`` still uses ``out/in_domain/`` when that folder exists: it is a
    multi-setting run's, and ``--settings in_domain`` on it must continue that run, not start
    a second one beside it in ``out/``.
    """
    out = Path(args.out)
    if args.settings == ["in_domain"] and not (out / "in_domain").is_dir():
        return out
    return out / setting


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
    from coreselect.evidence_pool import SOURCES, TASKS, build_evidence_pool

    tasks = [task_label(t) for t in args.targets]
    if any(t not in TASKS for t in tasks):
        raise ConfigError(f"pool: evidence has targets for {', '.join(TASKS)} only, got {', '.join(tasks)}")
    folder = evidence_dir(args)
    build_evidence_pool(
        folder,
        n_per_source=args.pool_per_source,
        sources=(*SOURCES, *_extra_sources(args)),
        tasks=TASKS,
        bigbench_archive=args.bigbench_archive,
        progress=say,
    )
    targets: dict[str, str] = {}
    for task, target in args.targets.items():
        targets[str(task)] = str(folder / f"target_{task_label(task)}.jsonl") if target == "embedded" else target
        if not Path(targets[str(task)]).expanduser().exists():
            raise CoreselectError(f"{targets[str(task)]}: no such target file")
    for task, held in list(args.heldout.items()):
        if held == "embedded":
            args.heldout[task] = str(folder / f"heldout_{task_label(task)}.jsonl")
    return [str(folder / "pool.jsonl")], targets


def pretrained_dir(args: ExperimentArgs, task: str) -> Path:
    """The Pretrained evaluation of a task, shared by every setting."""
    return Path(args.out) / task_label(task) / "eval" / "pretrained"


def selection_dir(args: ExperimentArgs, root: Path, task: str | None, method: str, budget: str, seed: int) -> Path:
    """Where a selection lives: per task or ``joint/``; ``-s{seed}`` for methods redrawn per seed."""
    tag = budget_tag(budget)
    name = f"{method}-{tag}" + (f"-s{seed}" if method in args.reselect_per_seed else "")
    return root / (task_label(task) if task else "joint") / "select" / name


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


def _concat(pool: list[str], out: Path) -> str:
    """Several pool files as one JSONL (for full-data training)."""
    from coreselect.data.readers import read_records
    from coreselect.io import write_jsonl

    path = out / "full" / "pool.jsonl"
    if not path.is_file():
        write_jsonl(path, (r.raw for r in read_records(pool, on_bad_record="skip", check_duplicate_ids=False)))
    return str(path)


def pool_questions(pool: list[str]) -> set[str]:
    """The normalized user turns of the pool (what ``decontaminate`` drops from test items and shots,
    on an exact match of a doc field or prompt, :func:`coreselect.eval.lmeval.drop_docs`)."""
    from coreselect.eval.lmeval import normalize_question

    return {normalize_question(t) for t in exclude_texts(pool)}


def newer(src: Path, done: Path) -> bool:
    """Whether ``src`` was written after ``done`` (``done`` is then stale and is redone)."""
    return src.is_file() and src.stat().st_mtime > done.stat().st_mtime


def read_stage(path: Path) -> dict[str, Any] | None:
    """A JSON file of a stage, or None when it does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CoreselectError(f"{path}: not a valid JSON file ({e}); delete it to redo its stage") from None
