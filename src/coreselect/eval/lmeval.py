"""lm-evaluation-harness as the evaluation engine.

:func:`run` loads the tasks with a :class:`lm_eval.tasks.TaskManager` (the packaged
offline tasks of :mod:`coreselect.eval.packaged` on its ``include_path``), wraps the
already loaded model (adapter merged or head delta added) in ``HFLM`` and calls
``lm_eval.simple_evaluate``. :func:`summarize` turns lm-eval's results into one row per
task and metric with a 95% confidence interval.

The one thing added on top of lm-eval is :func:`drop_docs`: removing test items (and
few-shot exemplars) whose question is one of the selection's target examples, or a pool
instruction (``decontaminate``). lm-eval has decontamination only against n-gram files of
training corpora, not against a list of texts, so it is done here on the task objects
before ``simple_evaluate`` runs them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from coreselect.errors import ConfigError, CoreselectError
from coreselect.eval.packaged import PACKAGED, TASK_DIR

__all__ = ["Z95", "drop_docs", "is_task_file", "normalize_question", "run", "summarize", "task_manager"]

#: Two-sided 95% normal quantile: a metric's CI is ``value ± Z95 * stderr`` (lm-eval's stderr).
Z95 = 1.959963984540054
#: exception names that mean "the data is not here and cannot be fetched"
_NETWORK_ERRORS = (
    "ConnectionError",
    "DatasetNotFoundError",
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "HfHubHTTPError",
    "RepositoryNotFoundError",
    "GatedRepoError",
)
_MANAGERS: dict[tuple[bool, tuple[str, ...]], Any] = {}


def normalize_question(text: str) -> str:
    """Whitespace-collapsed, case-folded text used to compare questions."""
    return " ".join(str(text).split()).casefold()


def is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def _manager(paths: tuple[str, ...], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    key = (defaults, paths)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(paths) or None, include_defaults=defaults or not paths)
    return _MANAGERS[key]


def task_manager(specs: Sequence[str], include: Sequence[str] = (), packaged: bool = True) -> Any:
    """A (cached) TaskManager that knows ``specs``.

    The packaged task folder (``packaged``), the ``include`` folders and the folders of
    YAML specs are on the include path; lm-eval's ~15k built-in task configs are indexed
    only when a name is not found there (indexing them takes 10-20 s).
    """
    paths = [str(TASK_DIR)] if packaged else []
    paths += [str(Path(p).expanduser().resolve()) for p in include]
    paths += [str(Path(s).expanduser().resolve().parent) for s in specs if is_task_file(s)]
    paths = list(dict.fromkeys(paths))
    names = [s for s in specs if not is_task_file(s)]
    if paths:
        tm = _manager(tuple(paths), False)
        if all(n in tm.all_tasks for n in names):
            return tm
    return _manager(tuple(paths), True)


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load_tasks(specs: Sequence[str], include: Sequence[str] = (), packaged: bool = True) -> tuple[Any, list[Any]]:
    """``(task_manager, top-level Task/Group objects)`` for task names, YAML files or groups.

    A task whose data is neither packaged nor in the local Hugging Face cache fails with
    one line saying so when the machine is offline.
    """
    tm = task_manager(specs, include, packaged)
    unknown = [s for s in specs if not is_task_file(s) and s not in tm.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown task(s) {', '.join(unknown)}: not a packaged task ({', '.join(PACKAGED)}), "
            "an lm-eval task/group/tag name or a task .yaml"
        )
    for s in specs:
        if is_task_file(s) and not Path(s).expanduser().is_file():
            raise ConfigError(f"{s}: no such task file")
    try:
        loaded = tm.load([str(Path(s).expanduser().resolve()) if is_task_file(s) else s for s in specs])
    except CoreselectError:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval/datasets raise many kinds; report one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        name = type(e).__name__
        if (
            "offline" in msg.lower()
            or "connect" in msg.lower()
            or name in _NETWORK_ERRORS
            or (_offline() and isinstance(e, OSError))
        ):
            raise CoreselectError(
                f"cannot load task data for {', '.join(specs)} ({name}: {msg[:200]}); this machine is offline "
                "(HF_DATASETS_OFFLINE / no network) and the data is not in the local Hugging Face cache: use a "
                f"packaged task ({', '.join(PACKAGED)}), a task .yaml over local files, or run once with network "
                "access to fill the cache"
            ) from None
        raise CoreselectError(f"cannot load task(s) {', '.join(specs)}: {name}: {msg[:300]}") from None
    children = {c for kids in loaded.get("group_map", {}).values() for c in kids}
    top = [g for n, g in loaded.get("groups", {}).items() if n not in children]
    top += [t for n, t in loaded["tasks"].items() if n not in children]
    return tm, top


def _strings(doc: Any) -> list[str]:
    return [v for v in (doc.values() if isinstance(doc, dict) else [doc]) if isinstance(v, str)]


def _doc_keys(task: Any, raw: dict[str, Any], processed: dict[str, Any]) -> tuple[list[str], str]:
    """Normalized top-level string fields of a doc (raw and processed), and its ``doc_to_text`` prompt."""
    fields = list(dict.fromkeys(normalize_question(k) for k in _strings(raw) + _strings(processed) if k.strip()))
    prompt = ""
    with contextlib.suppress(Exception):  # a prompt that cannot render is not a match
        text = task.doc_to_text(processed)
        prompt = normalize_question(text) if isinstance(text, str) else ""
    return fields, prompt


def drop_docs(task: Any, contains: Iterable[str] = (), exact: Iterable[str] = ()) -> int:
    """Remove docs from a lm-eval task's eval split and few-shot split; return how many eval docs went.

    A doc goes when one of its identifying strings (normalized, :func:`normalize_question`)
    equals a text of ``contains`` or ``exact``, or has 20+ characters and is contained in a
    text of ``contains`` (a target example whose user turn holds the question plus lettered
    options). Identifying strings are the ``doc_to_text`` prompt and the top-level string
    fields whose value is unique within the split: a field shared by several docs (SocialIQA's
    "What will Others want to do next?", a HellaSwag activity label) identifies none of them.
    """
    from collections import Counter

    whole = [normalize_question(t) for t in contains if str(t).strip()]
    eq = set(whole) | {normalize_question(t) for t in exact if str(t).strip()}
    joined = "\x00".join(whole)
    if not eq:
        return 0
    cfg = task.config
    fs = getattr(task, "fewshot_cfg", None)
    eval_split = cfg.test_split or cfg.validation_split
    shot_split = getattr(fs, "split", None) or cfg.training_split
    procs = {shot_split: getattr(fs, "process_docs", None) or cfg.process_docs, eval_split: cfg.process_docs}
    dropped = 0
    for split, proc in procs.items():
        if split is None or split not in task.dataset:
            continue
        raw = task.dataset[split]
        processed = proc(raw) if proc is not None else raw
        if len(processed) != len(raw):
            raise ConfigError(f"{cfg.task}: process_docs changes the number of docs; cannot exclude texts")
        keys = [_doc_keys(task, raw[i], processed[i]) for i in range(len(raw))]
        freq = Counter(k for fields, _ in keys for k in fields)
        keep = []
        for i, (fields, prompt) in enumerate(keys):
            ids = [k for k in fields if freq[k] == 1] + ([prompt] if prompt else [])
            if not any(k in eq or (len(k) >= 20 and k in joined) for k in ids):
                keep.append(i)
        if split == eval_split:
            dropped = len(raw) - len(keep)
        if len(keep) != len(raw):
            task.dataset[split] = raw.select(keep)
    if hasattr(task, "sampler") and task.fewshot_docs() is not None:
        task.sampler = type(task.sampler)(list(task.fewshot_docs()), rnd=None)
    task.task_docs = task.eval_docs
    if len(task.task_docs) == 0:
        raise ConfigError(f"task {cfg.task}: no test items left after excluding the target/pool questions")
    return dropped


class _Quiet(logging.Filter):
    """Drops lm-eval's warnings about how coreselect calls it (a loaded model, packaged loaders)."""

    NOISE = (
        "Custom kwargs can be passed",
        "model kwarg is not of type",
        "Passed an already-initialized model",
        "specified through cli",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


def _leaf_tasks(objs: Iterable[Any]) -> list[Any]:
    from lm_eval.api.group import Group

    out: list[Any] = []
    for o in objs:
        out.extend(o.get_all_tasks() if isinstance(o, Group) else [o])
    return out


def run(
    model: Any,
    tokenizer: Any,
    specs: Sequence[str],
    *,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    seed: int = 1234,
    include: Sequence[str] = (),
    packaged: bool = True,
    exclude: Iterable[str] = (),
    exact: Iterable[str] = (),
    bootstrap_iters: int = 1000,
    log_samples: bool = True,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on an already loaded ``model`` / ``tokenizer``; lm-eval's results dict.

    ``shots=None`` keeps each task's own ``num_fewshot`` (the packaged tasks: the paper's
    Table 6). ``seed`` seeds lm-eval's few-shot sampling and its Python/NumPy/torch RNGs.
    ``exclude`` / ``exact``: texts whose docs are dropped first (:func:`drop_docs`).
    ``results["coreselect"]`` records the dropped docs per task and the top-level task/group names.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    quiet = _Quiet()
    loggers = [logging.getLogger(n) for n in ("lm_eval.api.task", "lm_eval.models.huggingface", "lm_eval.evaluator")]
    for lg in loggers:
        lg.addFilter(quiet)
    was_training = getattr(model, "training", False)
    try:
        tm, top = load_tasks(specs, include, packaged)
        exclude, exact = list(exclude), list(exact)
        dropped = {t.task_name: drop_docs(t, exclude, exact) for t in _leaf_tasks(top)} if (exclude or exact) else {}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        model.eval()
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=top,
            num_fewshot=shots,
            limit=limit,
            task_manager=tm,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            gen_kwargs={"max_gen_toks": max_new_tokens} if max_new_tokens else None,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)
        if was_training:
            model.train()
    if res is None:  # a non-zero rank of a distributed run
        raise CoreselectError("lm-eval returned no results (not rank 0)")
    res["coreselect"] = {"dropped_docs": dropped, "top": [getattr(o, "task_name", None) or o.name for o in top]}
    return res


def summarize(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task: {"n", "n_available", "shots", "metrics": {metric: {value, stderr, ci95}}}}`` from lm-eval results.

    Metric names are lm-eval's ``metric,filter`` keys with ``,none`` dropped
    (``acc``, ``acc_norm``, ``exact_match,strict-match``). The 95% CI is the normal
    approximation ``value ± 1.96 * stderr`` with lm-eval's stderr (for mean metrics the
    sample standard deviation over items / sqrt(n); for others a bootstrap); ``None``
    when lm-eval reports no stderr (e.g. a single item).
    """
    out: dict[str, dict[str, Any]] = {}
    n_samples = res.get("n-samples", {})
    for task, row in res.get("results", {}).items():
        metrics: dict[str, dict[str, Any]] = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if (
                metric in ("alias", "sample_len")
                or "_stderr" in metric
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
            ):
                continue
            name = metric if filt in ("none", "") else f"{metric},{filt}"
            se = row.get(f"{metric}_stderr,{filt}")
            se = float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None
            v = float(value)
            metrics[name] = {"value": v, "stderr": se, "ci95": [v - Z95 * se, v + Z95 * se] if se is not None else None}
        ns = n_samples.get(task, {})
        out[task] = {
            "n": ns.get("effective"),
            "n_available": ns.get("original"),
            "shots": res.get("n-shot", {}).get(task),
            "metrics": metrics,
        }
    return out
