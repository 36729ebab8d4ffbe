"""``results.md`` (the Table 1 layout and the tables under it) and ``results.csv`` of an experiment."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from coreselect.eval.bootstrap import detectable_difference
from coreselect.experiment.args import ExperimentArgs
from coreselect.experiment.layout import read_stage, task_label


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
        f"p: the share of resampled differences on the other side of 0 ({ref} not better); "
        "Detectable: the smallest true difference this comparison would find 80% of the time "
        "(2.80 bootstrap standard errors, `coreselect.eval.bootstrap.detectable_difference`).",
        "",
        "| Row | Task | Metric | Items | Seeds | Difference | 95% interval | p | Detectable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        scale, digits = (100.0, 2) if c["metric"] == "acc" else (1.0, 4)
        p = c["p_le0"] if c["metric"] == "acc" else c["p_ge0"]
        mde = f"{scale * detectable_difference(c['se']):.{digits}f}"
        lines.append(
            f"| {c['row']} | {c['task']} | {c['metric']} | {c['n']} | {c['n_seeds_ref']} vs {c['n_seeds_other']} | "
            f"{scale * c['diff']:+.{digits}f} | [{scale * c['lo']:+.{digits}f}, {scale * c['hi']:+.{digits}f}] | "
            f"{p:.3f} | {mde} |"
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
        "full-data full-parameter SFT wall time on the same hardware; "
        + _full_sft_note(read_stage(out / "full_sft.json")),
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
