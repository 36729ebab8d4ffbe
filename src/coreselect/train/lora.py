"""LoRA fine-tuning on a selected coreset with ``transformers.Trainer`` + peft (TRIM Table 7, App. F).

Table 7 (shared by all runs, "closely following LESS"): AdamW, lr 2e-5, linear schedule
with 3% warmup, 4 epochs, per-device batch 2 x 32 accumulation (effective 64), max
sequence length 2048, bf16, LoRA r=128, alpha=512, dropout 0.1 on the attention
projections (q/k/v/o_proj for Llama), no eval, checkpoints kept up to 15.

* **Engine**: ``transformers.Trainer`` (so ``accelerate launch`` / ``torchrun``, DDP,
  DeepSpeed and FSDP, gradient checkpointing, bf16/fp16, ``report_to`` integrations and
  the progress bar with ETA come from there) on a ``peft`` LoRA model.
* **Loss**: response-only, exactly the tokens :class:`~coreselect.data.formatting.Formatter`
  marks (:attr:`Encoded.loss_mask`): :func:`collate_for_lm` passes ``labels`` = ``input_ids``
  there and ``-100`` elsewhere, and the model's causal-LM loss shifts them (token ``t``
  predicted from ``t-1``). ``Trainer`` normalizes an optimizer step's loss by the number
  of target tokens of all its micro-batches on all processes (``num_items_in_batch``,
  ``average_tokens_across_devices``), so each step minimizes the token-mean cross-entropy
  of the whole effective batch, however it is split across micro-batches and processes.
* **Packing** (``packing=True``): each micro-batch is one padding-free row
  (``DataCollatorWithFlattening``): the records' labels are kept, the first label of every
  record becomes ``-100`` (so no record is predicted from the previous one's last token)
  and ``position_ids`` restart at 0 per record, from which transformers builds a
  block-diagonal causal mask (sdpa/eager) or varlen flash attention. The loss is the same
  as without packing (a test checks it).
* **Checkpoints**: ``checkpoint-{step}/`` at every epoch end (or every ``save_every`` steps)
  with the PEFT adapter, ``optimizer.safetensors`` (AdamW ``exp_avg`` / ``exp_avg_sq`` /
  ``step`` keyed ``{i}.{name}``, ``i`` = position among the trainable parameters in
  ``named_parameters`` order, which is what LESS reads) + ``optimizer.json`` (param groups),
  ``scheduler.json``, ``rng_state[_{rank}].safetensors``, ``trainer_state.json`` and
  ``coreselect.json`` (the manifest, written last: run id, data/args fingerprint, step,
  epoch, mean lr since the previous checkpoint, every per-step lr, and the SHA-256 of every
  file of the folder).
* **Resume / security**: nothing is unpickled. The Trainer methods that would
  ``torch.load`` (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``scaler.pt``) are
  replaced by safetensors / JSON readers, ``training_args.bin`` (a pickle that Trainer writes
  but never reads) is not kept, and the adapter is ``adapter_model.safetensors``. Before
  resuming, the newest checkpoint's manifest must name this output folder's run id (from
  ``coreselect-run.json``, written when the run started) and the same fingerprint, and every
  file in the folder must be listed with a matching hash: a folder from another run, a
  half-written one (no manifest) or one with a changed or extra file is never loaded.
  Under DeepSpeed or FSDP their own checkpoint formats are saved and loaded by their
  engines (which do use ``torch.load``), and only after that same hash check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from coreselect.data.formatting import Encoded, Formatter
from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.io import write_json
from coreselect.models.runner import collate
from coreselect.train.loop import (
    IGNORE,
    SCHEDULES,
    device_of,
    encode_for_training,
    forward,
    make_labels,
    masked_lm_loss,
    n_targets,
    pad_id,
    plan_steps,
)

log = logging.getLogger(__name__)

# Old private names (``_forward`` is still imported by ``methods/baselines/gradients.py``).
_forward, _pad_id = forward, pad_id

_CKPT = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "coreselect.json"
RUN_FILE = "coreselect-run.json"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainArgs:
    """Fine-tuning hyperparameters; the defaults are the paper's Table 7 (App. F.2).

    Attributes:
        lora_r: LoRA rank (Table 7: 128).
        lora_alpha: LoRA scaling alpha (Table 7: 512).
        lora_dropout: dropout on the LoRA input (Table 7: 0.1).
        target_modules: module names that get adapters; ``None`` (default) = the model's
            attention projections (:func:`coreselect.models.introspect.attention_projections`:
            q/k/v/o_proj on Llama, as Table 7).
        lr: peak AdamW learning rate (Table 7: 2e-5).
        warmup_ratio: fraction of the optimizer steps with linear warmup, rounded up
            (Table 7: 0.03).
        schedule: decay after warmup: ``linear`` (Table 7), ``cosine`` or ``constant``.
        weight_decay: AdamW weight decay (LESS / HF default 0.0).
        max_grad_norm: gradient-norm clipping per step, ``None`` = off (HF Trainer default
            1.0, which LESS inherits; Table 7 does not list it).
        epochs: passes over the data, may be fractional (Table 7: 4).
        batch_size: records per micro-batch per process (Table 7 "per-device BS": 2).
        grad_accum: micro-batches per optimizer step (Table 7: 32, effective batch 64).
        max_length: records are truncated to this many tokens (Table 7: 2048).
        seed: seeds LoRA init, dropout and the data order.
        save_every: ``"epoch"`` (a checkpoint at each epoch end) or a number of optimizer
            steps (Table 7 saves every 1055 steps). The final step is always saved too.
        keep_checkpoints: newest checkpoints kept on disk (Table 7: 15).
        max_steps: optional cap on the optimizer steps (quick runs, tests); the schedule is
            computed for the capped total.
        precision: ``auto`` (bf16 / fp16 autocast when the model is loaded in that dtype,
            else none), ``bf16``, ``fp16`` or ``fp32`` (Table 7: bf16).
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        packing: padding-free micro-batches (see the module doc).
        report_to: ``none`` or Trainer integrations, comma separated (``tensorboard``,
            ``wandb``, ``all`` = every installed one).
        plot: save the training-loss curve as ``loss.png`` next to the adapter.
    """

    lora_r: int = 128
    lora_alpha: int = 512
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    epochs: float = 4
    batch_size: int = 2
    grad_accum: int = 32
    max_length: int = 2048
    seed: int = 0
    save_every: Literal["epoch"] | int = "epoch"
    keep_checkpoints: int = 15
    max_steps: int | None = None
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    packing: bool = False
    report_to: str = "none"
    plot: bool = True

    def __post_init__(self) -> None:
        def need_int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")

        def need_num(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ConfigError(f"{name} must be a number, got {v!r}")
            if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
                a, b = "(" if lo_open else "[", ")" if hi_open else "]"
                raise ConfigError(f"{name} must be in {a}{lo}, {hi}{b}, got {v!r}")

        for name in ("lora_r", "batch_size", "grad_accum", "keep_checkpoints"):
            need_int(name, 1)
        need_int("max_length", 2)
        need_int("seed", 0)
        need_num("lora_alpha", 0, math.inf, lo_open=True)
        need_num("lora_dropout", 0, 1, hi_open=True)
        need_num("lr", 0, math.inf, lo_open=True, hi_open=True)
        need_num("warmup_ratio", 0, 1, hi_open=True)
        need_num("weight_decay", 0, math.inf, hi_open=True)
        need_num("epochs", 0, math.inf, lo_open=True, hi_open=True)
        if self.max_grad_norm is not None:
            need_num("max_grad_norm", 0, math.inf, lo_open=True)
        if self.max_steps is not None:
            need_int("max_steps", 1)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.save_every != "epoch":
            need_int("save_every", 1)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.report_to, str) or not self.report_to.strip():
            raise ConfigError(f"report_to must be 'none' or integration names, got {self.report_to!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = tuple(m for m in self.target_modules.split(",") if m)
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
                raise ConfigError(f"target_modules must be non-empty module names, got {self.target_modules!r}")


@dataclass
class Checkpoint:
    """One saved checkpoint.

    Attributes:
        path: the ``checkpoint-{step}`` folder (a PEFT adapter folder).
        epoch: ``step / steps_per_epoch``.
        step: optimizer steps done.
        lr: mean learning rate over the steps since the previous checkpoint (LESS weights
            each checkpoint's gradient features by it).
    """

    path: Path
    epoch: float
    step: int
    lr: float


@dataclass
class TrainResult:
    """What :func:`train_lora` produced.

    Attributes:
        adapter_dir: the final adapter (``PeftModel.from_pretrained(base, adapter_dir)``).
        checkpoints: the checkpoints still on disk, oldest first.
        losses: token-mean training loss of every optimizer step (including resumed ones).
        steps: optimizer steps in total.
        wall_s: wall time of this call.
        tokens: real (non-pad) tokens fed to the model in this call, all processes.
        skipped: records dropped because they have no target token after truncation.
        plot: the loss-curve PNG, if one was written.
    """

    adapter_dir: Path
    checkpoints: list[Checkpoint]
    losses: list[float]
    steps: int
    wall_s: float
    tokens: int
    skipped: int = 0
    plot: Path | None = None


# ---------------------------------------------------------------------------- helpers
def warmup_subset(n_pool: int, fraction: float = 0.05, seed: int = 0) -> list[int]:
    """Sorted, seeded random ``fraction`` of ``range(n_pool)`` (rounded, at least 1).

    The warmup training set for TRIM / LESS scoring models (5% of the pool, as in LESS).
    """
    if isinstance(n_pool, bool) or not isinstance(n_pool, int) or n_pool < 1:
        raise ConfigError(f"n_pool must be an integer >= 1, got {n_pool!r}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    k = min(n_pool, max(1, round(fraction * n_pool)))
    chosen = np.random.default_rng(seed).choice(n_pool, size=k, replace=False)
    return sorted(int(i) for i in chosen)


@torch.no_grad()
def eval_loss(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    max_length: int = 2048,
    batch_size: int = 8,
    formatter: Formatter | None = None,
) -> float:
    """Token-mean response-only loss of ``model`` on ``records`` (eval mode, no dropout)."""
    fmt = formatter or Formatter(tokenizer, max_length)
    enc = [e for e in (fmt.encode(r) for r in records) if n_targets(e) > 0]
    if not enc:
        raise CoreselectError("no record has a target token")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(enc), batch_size):
            batch = collate(enc, range(s, min(s + batch_size, len(enc))), pad_id(tokenizer), "right", device_of(model))
            loss, n = masked_lm_loss(forward(model, batch), make_labels(batch))
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total / count


def lm_features(encoded: Sequence[Encoded]) -> list[dict[str, list[int]]]:
    """Trainer dataset rows: ``input_ids`` and ``labels`` (``-100`` off the loss mask)."""
    return [
        {"input_ids": e.input_ids.tolist(), "labels": np.where(e.loss_mask, e.input_ids, IGNORE).tolist()}
        for e in encoded
    ]


class collate_for_lm:  # a callable, used like a function
    """Right-pad :func:`lm_features` rows: ``input_ids`` (pad id), ``labels`` (-100), ``attention_mask``."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _fingerprint(args: TrainArgs, targets: Sequence[str], encoded: Sequence[Encoded]) -> str:
    """Hash of what fixes the data, model adapters and schedule (resume refuses a mismatch)."""
    h = hashlib.sha256()
    volatile = ("save_every", "keep_checkpoints", "report_to", "plot", "gradient_checkpointing")
    fixed = {k: v for k, v in asdict(args).items() if k not in volatile}
    fixed["target_modules"] = sorted(targets)
    h.update(json.dumps(fixed, sort_keys=True, default=str).encode())
    for e in encoded:
        h.update(np.int64(e.index).tobytes() + e.input_ids.tobytes() + e.loss_mask.tobytes())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` folders with a manifest (complete), oldest first."""
    found = []
    for p in out.iterdir() if out.is_dir() else []:
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def verify_checkpoint(folder: Path, run_id: str, fingerprint: str) -> dict[str, Any]:
    """The manifest of ``folder`` after checking it is this run's, untouched and complete.

    Raises ConfigError otherwise. Reads JSON only and hashes bytes; loads nothing.
    """
    man = json.loads((folder / MANIFEST).read_text())
    if man.get("run_id") != run_id:
        raise ConfigError(f"{folder}: written by another run (run id {man.get('run_id')!r}, this run {run_id!r})")
    if man.get("fingerprint") != fingerprint:
        raise ConfigError(f"{folder}: records or training args differ from the run being resumed")
    listed: dict[str, str] = man.get("files", {})
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    if set(present) != set(listed):
        extra, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
        raise ConfigError(f"{folder}: files differ from its manifest (extra {extra}, missing {missing}); not loading")
    for name, p in present.items():
        if _sha256(p) != listed[name]:
            raise ConfigError(f"{folder}/{name} changed since this run wrote it; not loading")
    return man


# ---------------------------------------------------------------------------- safetensors state io
def _trainable(model: Any) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_optimizer(optimizer: torch.optim.Optimizer, model: Any, folder: Path) -> None:
    """AdamW state as ``optimizer.safetensors`` (``{i}.{exp_avg,exp_avg_sq,step}``, ``i`` = position
    among the trainable parameters in ``named_parameters`` order) + ``optimizer.json``."""
    from safetensors.torch import save_file

    pos = {id(p): i for i, (_, p) in enumerate(_trainable(model))}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    for k, st in sd["state"].items():
        i = pos[id(params[k])]
        for name, v in st.items():
            tensors[f"{i}.{name}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    groups = [{**g, "params": [pos[id(params[k])] for k in g["params"]]} for g in sd["param_groups"]]
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": groups}, indent=1))


def load_optimizer(optimizer: torch.optim.Optimizer, model: Any, folder: Path) -> None:
    """Inverse of :func:`save_optimizer` (safetensors + JSON; nothing is unpickled)."""
    from safetensors.torch import load_file

    pos = {id(p): i for i, (_, p) in enumerate(_trainable(model))}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    k_of = {pos[id(p)]: k for k, p in enumerate(params)}
    saved = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ConfigError(f"{folder}: the optimizer state does not match the model's trainable parameters")
    groups = []
    for g in saved:
        g = {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}  # betas
        g["params"] = [k_of[i] for i in g["params"]]
        groups.append(g)
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in load_file(str(folder / "optimizer.safetensors")).items():
        i, name = key.split(".", 1)
        state.setdefault(k_of[int(i)], {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    np_state: Any = np.random.get_state()  # ("MT19937", keys, pos, has_gauss, cached_gaussian)
    t = {"cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"cuda{i}"] = s
    _, _, npos, has_gauss, gauss = np_state
    meta = {"python": json.dumps(random.getstate()), "numpy": json.dumps([int(npos), int(has_gauss), float(gauss)])}
    save_file(t, str(path), metadata=meta)


def _load_rng(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    torch.set_rng_state(t["cpu"])
    npos, has_gauss, gauss = json.loads(meta["numpy"])
    np.random.set_state(("MT19937", t["numpy_keys"].numpy().astype(np.uint32), npos, has_gauss, gauss))
    v, keys, g = json.loads(meta["python"])
    random.setstate((v, tuple(keys), g))
    cuda = [t[f"cuda{i}"] for i in range(sum(k.startswith("cuda") for k in t))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------- Trainer pieces
def _trainer_class() -> Any:
    from transformers import Trainer

    class CoreselectTrainer(Trainer):
        """``Trainer`` whose checkpoints hold no pickle (see the module doc) and carry a manifest."""

        coreselect_meta: dict[str, Any]

        def _sharded(self) -> bool:
            return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            super()._save(output_dir, state_dict)
            bin_file = Path(str(output_dir or self.args.output_dir)) / "training_args.bin"
            if self.args.should_save and bin_file.is_file():
                bin_file.unlink()  # a pickle Trainer never reads back; the JSON copy is in the manifest

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if self._sharded():
                return super()._save_optimizer_and_scheduler(output_dir)
            assert self.optimizer is not None and self.lr_scheduler is not None
            if self.args.should_save:
                save_optimizer(self.optimizer, self.model, Path(output_dir))
                (Path(output_dir) / "scheduler.json").write_text(json.dumps(self.lr_scheduler.state_dict()))

        def _save_scaler(self, output_dir: str) -> None:
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and self.args.should_save:
                (Path(output_dir) / "scaler.json").write_text(json.dumps(scaler.state_dict()))

        def _save_rng_state(self, output_dir: str) -> None:
            os.makedirs(output_dir, exist_ok=True)
            name = (
                "rng_state.safetensors"
                if self.args.world_size <= 1
                else f"rng_state_{self.args.process_index}.safetensors"
            )
            _save_rng(Path(output_dir) / name)

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if checkpoint is None:
                return
            if self._sharded():
                return super()._load_optimizer_and_scheduler(checkpoint)  # verified by train_lora first
            folder = Path(checkpoint)
            assert self.optimizer is not None and self.lr_scheduler is not None
            load_optimizer(self.optimizer, self.model, folder)
            self.lr_scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and (folder / "scaler.json").is_file():
                scaler.load_state_dict(json.loads((folder / "scaler.json").read_text()))

        def _load_rng_state(self, checkpoint: str | None) -> None:
            if checkpoint is None:
                return
            name = (
                "rng_state.safetensors"
                if self.args.world_size <= 1
                else f"rng_state_{self.args.process_index}.safetensors"
            )
            if (Path(checkpoint) / name).is_file():
                _load_rng(Path(checkpoint) / name)
            else:
                log.info("%s has no %s (another process count?): the RNG state is not restored", checkpoint, name)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's rng file is written
            if self.args.should_save:
                folder = Path(str(self.args.output_dir)) / f"checkpoint-{self.state.global_step}"
                self.coreselect_meta["on_save"](folder, self.state.global_step)
            self.accelerator.wait_for_everyone()

    return CoreselectTrainer


def _callbacks(lrs: list[float], progress: bool) -> list[Any]:
    from transformers import ProgressCallback, TrainerCallback

    class LearningRates(TrainerCallback):
        """The learning rate of every optimizer step (read before the step, as it is applied)."""

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            opt = optimizer if optimizer is not None else kw.get("model")
            if opt is not None and hasattr(opt, "param_groups"):
                lrs.append(float(opt.param_groups[0]["lr"]))

    class Bar(ProgressCallback):
        """Trainer's progress bar (ETA), with the loss and lr as its postfix instead of a printed line per log."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "learning_rate", "grad_norm")}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)
                if "train_runtime" in logs:
                    log.info("train: %s", dict(logs))

    return [LearningRates()] + ([Bar()] if progress else [])


def _precision(args: TrainArgs, model: Any) -> tuple[bool, bool]:
    """``(bf16, fp16)`` Trainer flags."""
    if args.precision == "bf16":
        return True, False
    if args.precision == "fp16":
        return False, True
    if args.precision == "fp32":
        return False, False
    dtype = next(model.parameters()).dtype
    on_gpu = device_of(model).type == "cuda"
    return on_gpu and dtype == torch.bfloat16, on_gpu and dtype == torch.float16


def _report_to(value: str) -> str | list[str]:
    """Trainer's ``report_to``; a named integration that is not installed is a ConfigError up front."""
    from transformers.integrations import get_available_reporting_integrations

    names = [v.strip() for v in value.split(",") if v.strip()]
    if names in (["none"], ["all"]):
        return names[0]
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    if missing:
        raise ConfigError(
            f"report_to {', '.join(missing)}: not installed (pip install {' '.join(missing)}); "
            "use 'none' or one of the installed integrations: "
            f"{', '.join(get_available_reporting_integrations()) or 'none installed'}"
        )
    return names


def plot_losses(losses: Sequence[float], path: Path, title: str = "training loss") -> Path | None:
    """The per-step training-loss curve as a PNG (``None`` when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=1, label="loss per step")
    if len(losses) >= 10:
        w = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, lw=2, label=f"mean of {w}")
        ax.legend()
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="optimizer step", ylabel="response-token cross-entropy", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _world() -> tuple[int, int]:
    """``(world_size, rank)`` of this process as set by ``torchrun`` / ``accelerate launch``."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


# ---------------------------------------------------------------------------- training
class Trainable(Protocol):
    """What :func:`train_lora` trains instead of peft LoRA adapters (its ``trainable=``), e.g.
    P2D-double-dagger's head deltas (:mod:`coreselect.methods.p2d.train`). The recipe, collator,
    checkpoints, resume checks, loss plot and accelerate support stay the same."""

    @property
    def targets(self) -> Sequence[str]:
        """What is trained, by name: written to train_state.json and part of the resume fingerprint."""

    def wrap(self, model: Any) -> Any:
        """The module ``Trainer`` trains (and saves: its ``state_dict``); its ``requires_grad``
        parameters are the trained ones."""


def train_lora(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    args: TrainArgs,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    resume: bool = False,
    formatter: Formatter | None = None,
    trainable: Trainable | None = None,
) -> TrainResult:
    """Fine-tune LoRA adapters on ``records`` with the Table 7 recipe (see the module doc).

    ``model`` (a plain ``*ForCausalLM``) gets LoRA layers injected in place and is left in
    train mode; its base weights are frozen and never change. Writes ``out_dir/adapter/``
    (the final adapter), ``out_dir/checkpoint-{step}/``, ``out_dir/train_state.json`` and
    ``out_dir/loss.png``. Under ``torchrun`` / ``accelerate launch`` every process calls
    this; only the main one writes.

    Args:
        resume: continue from the newest complete checkpoint in ``out_dir`` (same records
            and args required, verified as in the module doc); without one, start from scratch.
        formatter: how records become tokens (default: ``Formatter(tokenizer, max_length)``).
        trainable: train this instead of LoRA adapters (:class:`Trainable`; the LoRA fields of
            ``args`` are then unused).
    """
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    if hasattr(model, "peft_config"):
        raise ConfigError("the model already has adapters; merge or unload them before training")
    report_to = _report_to(args.report_to)
    t0 = time.perf_counter()
    out = Path(out_dir)
    world, rank = _world()
    main = rank == 0
    existing = _checkpoints(out)
    if existing and not resume and main:  # (other processes: process 0 may be clearing an --overwrite folder)
        raise ConfigError(f"{out} already has checkpoints; pass resume=True or use an empty folder")
    encoded, skipped = encode_for_training(formatter or Formatter(tokenizer, args.max_length), records)
    steps_per_epoch, total = plan_steps(len(encoded), args, world)

    if trainable is not None:
        targets = list(trainable.targets)
    else:
        targets = list(args.target_modules) if args.target_modules else _default_targets(model)
    fp = _fingerprint(args, targets, encoded)
    run_file = out / RUN_FILE
    resume_from: tuple[int, Path, dict[str, Any]] | None = None
    if resume and existing:
        run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else ""
        step0, folder = existing[-1]
        resume_from = (step0, folder, verify_checkpoint(folder, run_id, fp))
        if main:  # later folders without a manifest were cut off mid-write: Trainer rewrites them
            for old in out.glob("checkpoint-*"):
                if (m := _CKPT.match(old.name)) and int(m.group(1)) > step0:
                    shutil.rmtree(old, ignore_errors=True)
    else:
        run_id = uuid.uuid4().hex
        if main:
            out.mkdir(parents=True, exist_ok=True)
            for old in out.glob("checkpoint-*"):  # folders without a manifest: cut off mid-write, or a foreign format
                log.warning("%s has no %s (incomplete, or not written by coreselect): removed", old, MANIFEST)
                shutil.rmtree(old, ignore_errors=True)
            write_json(run_file, {"run_id": run_id, "fingerprint": fp})

    transformers.set_seed(args.seed)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
    )
    model = trainable.wrap(model) if trainable is not None else get_peft_model(model, config)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()

    lrs: list[float] = list(resume_from[2]["lrs"]) if resume_from else []
    ckpts: list[dict[str, Any]] = list(resume_from[2]["checkpoints"]) if resume_from else []
    bf16, fp16 = _precision(args, model)
    every = steps_per_epoch if args.save_every == "epoch" else args.save_every
    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or 0.0,
        lr_scheduler_type="constant_with_warmup" if args.schedule == "constant" else args.schedule,
        warmup_steps=math.ceil(args.warmup_ratio * total),
        num_train_epochs=args.epochs,
        max_steps=total,
        optim="adamw_torch",
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="epoch" if args.save_every == "epoch" else "steps",
        save_steps=every,
        save_total_limit=args.keep_checkpoints,
        logging_strategy="steps",
        logging_steps=1,
        report_to=report_to,
        disable_tqdm=not progress,
        bf16=bf16,
        fp16=fp16,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=device_of(model).type == "cpu",
        include_num_input_tokens_seen="non_padding",
        log_level="warning",
        log_level_replica="error",
        save_only_model=False,
    )
    if args.packing:
        from transformers import DataCollatorWithFlattening

        collator: Any = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
    else:
        collator = collate_for_lm(pad_id(tokenizer))

    def on_save(folder: Path, step: int) -> None:  # main process, after Trainer wrote the folder
        prev = ckpts[-1]["step"] if ckpts else 0
        meta = {"step": step, "epoch": step / steps_per_epoch, "lr": float(np.mean(lrs[prev:step] or [0.0]))}
        ckpts[:] = [c for c in ckpts if c["step"] < step] + [meta]
        (folder / "training_args.json").write_text(targs.to_json_string())
        files = {p.relative_to(folder).as_posix(): _sha256(p) for p in _files(folder)}
        manifest = {
            "format": "coreselect.checkpoint/1",
            **meta,
            "run_id": run_id,
            "fingerprint": fp,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
            "lrs": lrs[:step],
            "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
            "checkpoints": ckpts,
            "args": asdict(args),
            "files": files,
        }
        tmp = folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
        os.replace(tmp, folder / MANIFEST)

    trainer_cls = _trainer_class()
    from transformers import ProgressCallback

    trainer = trainer_cls(
        model=model,
        args=targs,
        train_dataset=lm_features(encoded),
        data_collator=collator,
        callbacks=_callbacks(lrs, progress),
    )
    # Trainer's own bar prints every log as a line (one per step here); ours (a subclass) does not
    for cb in list(trainer.callback_handler.callbacks):
        if type(cb) in (ProgressCallback, transformers.PrinterCallback):
            trainer.remove_callback(cb)
    trainer.coreselect_meta = {"on_save": on_save}
    if resume_from:
        log.info("resuming from %s (step %d of %d)", resume_from[1], resume_from[0], total)
    trainer.train(resume_from_checkpoint=str(resume_from[1]) if resume_from else None)
    tokens = int(trainer.state.num_input_tokens_seen or 0) - (
        int(resume_from[2].get("tokens_seen", 0)) if resume_from else 0
    )

    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h and "step" in h]
    adapter = out / "adapter"
    trainer.save_model(str(adapter))
    wall = time.perf_counter() - t0
    plot = None
    kept = {s for s, _ in _checkpoints(out)}
    checkpoints = [
        Checkpoint(out / f"checkpoint-{c['step']}", c["epoch"], c["step"], c["lr"]) for c in ckpts if c["step"] in kept
    ]
    if main:
        if args.plot and losses:
            plot = plot_losses(losses, out / "loss.png", title=f"training loss ({len(losses)} steps)")
        write_json(
            out / "train_state.json",
            {
                "steps": trainer.state.global_step,
                "steps_per_epoch": steps_per_epoch,
                "records": len(encoded),
                "skipped": skipped,
                "processes": world,
                "resumed_from": resume_from[0] if resume_from else None,
                "wall_s": wall,
                "tokens": tokens,
                "tokens_per_s": tokens / wall if wall > 0 else None,
                "losses": losses,
                "lrs": lrs,
                "checkpoints": [{**asdict(c), "path": c.path.name} for c in checkpoints],
                "args": asdict(args),
                "target_modules": targets,
                "run_id": run_id,
            },
        )
    model.train()
    return TrainResult(adapter, checkpoints, losses, trainer.state.global_step, wall, tokens, skipped, plot)


def _default_targets(model: Any) -> list[str]:
    """The model's attention projections (Table 7 adapts q/k/v/o_proj on Llama)."""
    from coreselect.models.introspect import attention_projections

    return list(attention_projections(model))


__all__ = [
    "Checkpoint",
    "TrainArgs",
    "TrainResult",
    "collate_for_lm",
    "eval_loss",
    "lm_features",
    "load_optimizer",
    "make_labels",
    "masked_lm_loss",
    "plot_losses",
    "save_optimizer",
    "train_lora",
    "verify_checkpoint",
    "warmup_subset",
]
