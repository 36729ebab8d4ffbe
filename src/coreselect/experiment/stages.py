"""The cached stages of an experiment: warmup, selection, training, evaluation, the pilot, one
setting's rows, the Full-data row and the AER denominator (each skipped when its output is
complete and newer than its input)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from coreselect.config import SelectArgs
from coreselect.errors import ConfigError, CoreselectError
from coreselect.eval.command import EvalCommandArgs, evaluate_command, metric_name
from coreselect.experiment.args import ExperimentArgs, base_method, row_plan, uses_warmup, warmup_for
from coreselect.experiment.layout import (
    budget_tag,
    evidence_dir,
    full_data_file,
    newer,
    read_stage,
    say,
    selection_dir,
    setting_root,
    task_label,
)
from coreselect.experiment.results import hardware
from coreselect.io import write_json
from coreselect.pipeline import select
from coreselect.runtime import scan_pool, warmup_model
from coreselect.train.command import TrainCommandArgs, is_trained, train

#: Pool records whose full-parameter forward+backward is timed for the AER denominator
#: (``batches`` micro-batches of the training batch size, after one untimed one).
AER_SAMPLE_BATCHES = 3


def run_warmup(args: ExperimentArgs, pool: list[str], out: Path) -> str | None:
    """The shared scorer warmup (``out/warmup/adapter``), trained once; ``None`` = base model."""
    if not any(uses_warmup(m, args.variants) for m in args.methods) or args.warmup == "none":
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
        say(f"warmup: cached ({adapter})")
    else:
        write_json(out / "warmup" / "info.json", info)
        say(f"warmup: trained on {info.get('n_records')} records in {info.get('wall_s', 0):.0f} s")
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
        say(f"select {out.parent.parent.name}/{out.name}: cached")
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
    say(
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
    if is_trained(out) and not any(newer(p, out / "run.json") for p in inputs):
        say(f"train {out.relative_to(Path(args.out))}: cached")
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
    say(
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
    exemplars exclude the ``target`` questions and (``seen``,
    :func:`~coreselect.experiment.layout.pool_questions`) the pool's.
    """
    path = out / "eval.json"
    held = args.heldout.get(task)
    old = read_stage(path)
    if (
        old is not None
        and not (adapter is not None and newer(adapter.parent / "run.json", path))
        and (not held or old.get("heldout"))
    ):
        say(f"eval {out.relative_to(Path(args.out))}: cached")
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
    say(f"eval {out.relative_to(Path(args.out))}: {', '.join(parts)} ({res['timings']['total_s']:.0f} s)")
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
    from coreselect.data.formatting import Formatter, pad_id
    from coreselect.data.readers import read_records
    from coreselect.methods.p2d.train import seconds_per_token

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
    old = read_stage(out / "full_sft.json")
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
            model, pad_id(tok), sample, None, batch_size=targs.batch_size, batches=AER_SAMPLE_BATCHES
        )
    except (RuntimeError, CoreselectError) as e:
        say(f"AER: full-parameter SFT time could not be estimated ({str(e).splitlines()[0]})")
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
    say(f"AER: full-parameter SFT on the pool estimated at {info['full_sft_s']:.0f} s")
    return info


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
        say(f"setting {setting}, seed {seed}: pool {', '.join(pool)}")
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
                    warmup_for(sel_method, warmup, args.variants),
                    selection_dir(args, root, None, sel_method, budget, seed),
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
                    warmup_for(sel_method, warmup, args.variants),
                    selection_dir(args, root, "multi", sel_method, budget, seed),
                    sel_seed,
                )
            for task, target in targets.items():
                name = task_label(task)
                own = selection_dir(args, root, task, sel_method, budget, seed)
                sel = (
                    task_coreset(args, pool, shared, task, own)
                    if shared is not None
                    else run_select(
                        args,
                        pool,
                        target,
                        sel_method,
                        budget,
                        warmup_for(sel_method, warmup, args.variants),
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
                            warmup_for(src, warmup, args.variants),
                            selection_dir(args, root, task, src, budget, seed),
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
    if (out / "coreset.jsonl").is_file() and done.is_file() and not newer(shared / "run.json", done):
        return out
    info = read_stage(shared / "run.json") or {}
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
    say(f"select {name}/{out.name}: top {k} by rank_{name} of the shared selection {shared}")
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
            trained = read_stage(base / "train" / name / "run.json") or {}
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
            say(f"pilot {name}: pilot loss {res['loss']:.4f}")
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
    say(f"pilot: chose lr {best['lr']:g}, {best['epochs']} epochs (pretrained pilot loss {before['loss']:.4f})")
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
    old = read_stage(out / "eval.json")
    if (
        old is not None
        and old.get("heldout")
        and not (adapter is not None and newer(adapter.parent / "run.json", out / "eval.json"))
    ):
        return dict(old["heldout"])
    eargs = _eval_args(args, adapter, out, files, recipe, task="")
    model = tok = None
    if adapter is None:
        model, tok = base_model(args, loaded)
    return dict(evaluate_command(eargs, model=model, tokenizer=tok)["heldout"])
