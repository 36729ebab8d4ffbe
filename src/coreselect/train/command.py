"""``coreselect train``: LoRA fine-tuning of a fresh base model on a coreset (paper §4.1, Table 7).

Writes ``OUT/adapter/`` (a PEFT adapter: ``lm_eval --model hf --model_args
pretrained=BASE,peft=OUT/adapter`` loads it), ``OUT/checkpoint-{step}/`` (resumable with
``--resume``), ``OUT/train_state.json`` (losses, learning rates), ``OUT/loss.png`` and
``OUT/run.json``. Runs on ``transformers.Trainer`` (:mod:`coreselect.train.lora`), so it also
runs under ``accelerate launch -m coreselect train ...`` or ``torchrun -m coreselect train ...``
(one process per GPU; see ``docs/distributed.md``); only the main process writes.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coreselect.data.formatting import TemplateChoice
from coreselect.data.records import OnBadRecord
from coreselect.errors import ConfigError, CoreselectError

__all__ = ["TrainCommandArgs", "is_trained", "train"]


@dataclass
class TrainCommandArgs:
    """Arguments of ``coreselect train`` (YAML config keys are the same names).

    Attributes:
        model: base causal LM: folder, ``.gguf`` file, hub id or ``smollm2``.
        data: training records (``coreset.jsonl`` of ``coreselect select``, or any pool format).
        out: output folder (``adapter/``, checkpoints, ``run.json``).
        lora_r: LoRA rank (Table 7: 128).
        lora_alpha: LoRA alpha (Table 7: 512).
        lora_dropout: LoRA dropout (Table 7: 0.1).
        lora_target_modules: comma-separated module names to adapt; default: the model's
            attention projections (q/k/v/o_proj on Llama, as Table 7).
        lr: peak AdamW learning rate (Table 7: 2e-5).
        epochs: passes over the data, may be fractional (Table 7: 4).
        batch_size: records per micro-batch per process (Table 7: 2).
        grad_accum: micro-batches per optimizer step (Table 7: 32).
        max_length: truncate records to this many tokens (Table 7: 2048).
        warmup_ratio: fraction of steps with linear lr warmup (Table 7: 0.03).
        schedule: lr decay after warmup: ``linear`` (Table 7), ``cosine`` or ``constant``.
        seed: seeds LoRA init, dropout and data order.
        save_every: ``epoch`` or a number of optimizer steps between checkpoints.
        keep_checkpoints: newest checkpoints kept on disk (Table 7: 15).
        max_steps: cap on optimizer steps (quick runs).
        precision: ``auto`` (the model's dtype: bf16 on GPU), ``bf16``, ``fp16`` or ``fp32``.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        packing: padding-free micro-batches (the loss mask is kept; see coreselect.train.lora).
        report_to: ``none``, or ``tensorboard`` / ``wandb`` / ``all`` (Trainer integrations).
        plot: save the training-loss curve as ``OUT/loss.png``.
        template: ``auto`` / ``chat`` / ``plain`` prompt formatting.
        template_date: the date chat templates see (fixed, see ``coreselect select --help``).
        dtype, device: ``auto`` = fp32 on CPU, bf16 on GPU.
        trust_remote_code: allow model code from the hub.
        on_bad_record: ``error`` or ``skip`` bad input records.
        resume: continue from the newest checkpoint in ``out``.
        overwrite: delete a previous run in ``out`` first.
        progress: show a progress bar (with the loss).
        heads: P2D: a ``heads.json`` (``coreselect heads`` / a p2d selection); train only those
            attention heads' q/k/v/o slices instead of LoRA (writes ``heads_delta.safetensors``).
    """

    model: str = "smollm2"
    data: list[str] = field(default_factory=list)
    out: str = ""
    lora_r: int = 128
    lora_alpha: int = 512
    lora_dropout: float = 0.1
    lora_target_modules: str | None = None
    lr: float = 2e-5
    epochs: float = 4.0
    batch_size: int = 2
    grad_accum: int = 32
    max_length: int = 2048
    warmup_ratio: float = 0.03
    schedule: str = "linear"
    seed: int = 0
    save_every: str = "epoch"
    keep_checkpoints: int = 15
    max_steps: int | None = None
    precision: str = "auto"
    gradient_checkpointing: bool = False
    packing: bool = False
    report_to: str = "none"
    plot: bool = True
    template: TemplateChoice = "auto"
    template_date: str = "26 Jul 2024"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    on_bad_record: OnBadRecord = "error"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    heads: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.save_every = str(self.save_every)

    def train_args(self) -> Any:
        """The :class:`~coreselect.train.lora.TrainArgs` these flags describe (validated)."""
        from coreselect.train.lora import TrainArgs

        save: Any = "epoch" if self.save_every == "epoch" else _int(self.save_every, "save_every")
        schedule: Any = self.schedule
        precision: Any = self.precision
        targets = tuple(m.strip() for m in (self.lora_target_modules or "").split(",") if m.strip()) or None
        return TrainArgs(
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
            lr=self.lr,
            warmup_ratio=self.warmup_ratio,
            schedule=schedule,
            epochs=self.epochs,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            max_length=self.max_length,
            seed=self.seed,
            save_every=save,
            keep_checkpoints=self.keep_checkpoints,
            max_steps=self.max_steps,
            precision=precision,
            gradient_checkpointing=self.gradient_checkpointing,
            packing=self.packing,
            report_to=self.report_to,
            plot=self.plot,
        )


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name} must be 'epoch' or an integer, got {text!r}") from None


def is_trained(out: str | Path) -> bool:
    """Whether ``out`` holds a finished run (final adapter and ``run.json``)."""
    p = Path(out)
    done = (p / "adapter" / "adapter_config.json").is_file() or (p / "heads_delta.safetensors").is_file()
    return done and (p / "run.json").is_file()


def train(args: TrainCommandArgs) -> dict[str, Any]:
    """Fine-tune ``args.model`` with LoRA on ``args.data``; return the ``run.json`` dictionary."""
    from coreselect.data.formatting import Formatter
    from coreselect.data.readers import RejectLog, read_records
    from coreselect.io import write_json
    from coreselect.models.loading import load_model, model_name, resolve_model
    from coreselect.runtime import versions
    from coreselect.train.lora import train_lora

    t0 = time.perf_counter()
    if not args.data:
        raise ConfigError("no training data given (--data FILE [FILE ...])")
    if not args.out:
        raise ConfigError("no output folder given (--out DIR)")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other")
    if args.on_bad_record not in ("error", "skip"):
        raise ConfigError(f"on_bad_record must be error or skip, got {args.on_bad_record!r}")
    targs = args.train_args()
    if args.heads and not Path(args.heads).is_file():
        raise CoreselectError(f"{args.heads}: no such heads.json file")
    for p in args.data:
        if Path(p).suffix in (".jsonl", ".json", ".parquet", ".gz") and not Path(p).expanduser().exists():
            raise CoreselectError(f"{p}: no such file")
    out = Path(args.out)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    main = rank == 0  # under torchrun / accelerate launch only process 0 checks, clears and writes OUT
    if main and out.exists() and any(out.iterdir()):
        if args.overwrite:
            shutil.rmtree(out)
        elif not args.resume:
            raise ConfigError(f"{out} is not empty; pass --resume to continue it or --overwrite to replace it")
    if main:
        out.mkdir(parents=True, exist_ok=True)

    rejects = RejectLog()
    records = list(read_records(args.data, on_bad_record=args.on_bad_record, rejects=rejects))
    if not records:
        raise CoreselectError("the training data is empty")
    if rejects.count and main:
        rejects.write(out / "rejects.jsonl")
    t_load = time.perf_counter()
    device = args.device
    if world > 1 and device == "auto":  # one GPU per process (Trainer would move it there from GPU 0 anyway)
        import torch

        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)
    load_s = time.perf_counter() - t_load
    spec = resolve_model(args.model)
    model_info: dict[str, Any] = {
        "name": args.model,
        "resolved": model_name(model),
        "path": spec.path,
        "dtype": str(next(model.parameters()).dtype),
    }
    common: dict[str, Any] = {
        "command": "train",
        "settings": asdict(args),
        "train_args": asdict(targs),
        "versions": versions(),
        "model": model_info,
    }
    fmt = Formatter(tok, args.max_length, args.template, template_date=args.template_date)
    if args.heads:  # P2D sparse head adaptation instead of LoRA, on the same Trainer (coreselect.methods.p2d.train)
        from coreselect.methods.p2d.train import train_heads_run

        hinfo = train_heads_run(
            args.heads, model, tok, records, targs, out, formatter=fmt, progress=args.progress, resume=args.resume
        )
        hinfo["counts"]["rejected"] = rejects.count
        info: dict[str, Any] = {
            **common,
            **hinfo,
            "adapter": hinfo["delta"],
            "timings": {"model_load_s": load_s, "train_s": hinfo["train_s"], "total_s": time.perf_counter() - t0},
        }
    else:
        res = train_lora(model, tok, records, targs, out, progress=args.progress, resume=args.resume, formatter=fmt)
        model_info["device"] = str(next(model.parameters()).device)
        model_info["processes"] = world
        del model
        adapter = res.adapter_dir.resolve()
        info = {
            **common,
            "counts": {
                "records": len(records),
                "trained": len(records) - res.skipped,
                "skipped": res.skipped,
                "rejected": rejects.count,
            },
            "steps": res.steps,
            "final_loss": res.losses[-1] if res.losses else None,
            "first_loss": res.losses[0] if res.losses else None,
            "tokens": res.tokens,
            "adapter": str(adapter),
            "checkpoints": [c.path.name for c in res.checkpoints],
            "loss_plot": str(res.plot) if res.plot else None,
            "timings": {"model_load_s": load_s, "train_s": res.wall_s, "total_s": time.perf_counter() - t0},
            "lm_eval": f"lm_eval --model hf --model_args pretrained={spec.path},peft={adapter}",
        }
    if main:
        write_json(out / "run.json", info)
    return info
