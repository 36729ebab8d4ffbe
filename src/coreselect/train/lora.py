"""LoRA fine-tuning on a selected coreset, with the recipe of the TRIM paper (Table 7, App. F).

Table 7 (shared by all runs, "closely following LESS"): AdamW, lr 2e-5, linear schedule
with 3% warmup, 4 epochs, per-device batch 2 x 32 accumulation (effective 64), max
sequence length 2048, bf16, LoRA r=128, alpha=512, dropout 0.1 on q/k/v/o_proj, no eval,
checkpoints kept up to 15.

A plain PyTorch loop (no HF Trainer) so that every choice is explicit and resume is exact:

* **Data order**: epoch ``e`` shuffles the (kept) records with ``torch.Generator`` seeded
  ``seed + e``; consecutive ``batch_size`` records form a micro-batch (right padded), and
  ``grad_accum`` consecutive micro-batches form one optimizer step. The last step of an
  epoch may have fewer micro-batches (as in HF Trainer).
* **Loss**: response-only, from :attr:`Encoded.loss_mask` (assistant content plus the
  end-of-turn token). Labels are ``input_ids`` where ``loss_mask`` else ``-100`` and are
  shifted HF-style (token ``t`` predicted from ``t-1``). Gradient accumulation is
  normalized by the **total number of target tokens of the step** (all its micro-batches),
  so each optimizer step minimizes the token-mean cross-entropy of the whole effective
  batch, independent of how it is split into micro-batches. ``losses`` are those values.
* **Checkpoints**: ``checkpoint-{step}/`` with the PEFT adapter, ``optimizer.safetensors``
  (state tensors) + ``optimizer.json`` (param groups), ``rng.safetensors`` and
  ``trainer_state.json`` (scheduler state, losses, per-step lr). Nothing is pickled. Each
  is written in a temp folder then renamed, so a kill never leaves half a checkpoint.
* **Resume** restores all of that and skips the steps already done, so a resumed run
  ends with the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from coreselect.data.formatting import Encoded, Formatter
from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.io import write_json
from coreselect.models.runner import Batch, collate
from coreselect.progress import progress_bar

log = logging.getLogger(__name__)

IGNORE = -100
SCHEDULES = ("linear", "cosine", "constant")
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainArgs:
    """Fine-tuning hyperparameters; the defaults are the paper's Table 7 (App. F.2).

    Attributes:
        lora_r: LoRA rank (Table 7: 128).
        lora_alpha: LoRA scaling alpha (Table 7: 512).
        lora_dropout: dropout on the LoRA input (Table 7: 0.1).
        target_modules: module names that get adapters (Table 7: q, k, v, o_proj).
        lr: peak AdamW learning rate (Table 7: 2e-5).
        warmup_ratio: fraction of the optimizer steps with linear warmup, rounded up
            (Table 7: 0.03).
        schedule: decay after warmup: ``linear`` (Table 7), ``cosine`` or ``constant``.
        weight_decay: AdamW weight decay (LESS / HF default 0.0).
        max_grad_norm: gradient-norm clipping per step, ``None`` = off (HF Trainer default
            1.0, which LESS inherits; Table 7 does not list it).
        epochs: passes over the data, may be fractional (Table 7: 4).
        batch_size: records per micro-batch (Table 7 "per-device BS": 2).
        grad_accum: micro-batches per optimizer step (Table 7: 32, effective batch 64).
        max_length: records are truncated to this many tokens (Table 7: 2048).
        seed: seeds LoRA init, dropout and the per-epoch shuffles (``seed + epoch``).
        save_every: ``"epoch"`` (a checkpoint at each epoch end) or a number of optimizer
            steps (Table 7 saves every 1055 steps). The final step is always saved too.
        keep_checkpoints: newest checkpoints kept on disk (Table 7: 15).
        max_steps: optional cap on the optimizer steps (quick runs, tests); the schedule is
            computed for the capped total.
    """

    lora_r: int = 128
    lora_alpha: int = 512
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
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
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
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
        tokens: real (non-pad) tokens fed to the model, all steps.
        skipped: records dropped because they have no target token after truncation.
    """

    adapter_dir: Path
    checkpoints: list[Checkpoint]
    losses: list[float]
    steps: int
    wall_s: float
    tokens: int
    skipped: int = 0


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


def make_labels(batch: Batch) -> Tensor:
    """Unshifted HF-style labels: ``input_ids`` where ``loss_mask`` else ``-100``."""
    return torch.where(batch.loss_mask, batch.input_ids, torch.full_like(batch.input_ids, IGNORE))


def masked_lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy of the target tokens and their count (token ``t`` from ``t-1``)."""
    lab = labels[:, 1:]
    keep = lab != IGNORE
    picked = logits[:, :-1][keep].float()
    return torch.nn.functional.cross_entropy(picked, lab[keep], reduction="sum"), int(keep.sum())


def _n_targets(e: Encoded) -> int:
    return int(e.loss_mask[1:].sum())  # position 0 has no previous token to predict it from


def _pad_id(tokenizer: Any) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if v is not None:
            return int(v)
    return 0


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _forward(model: Any, batch: Batch) -> Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, use_cache=False).logits


def _encode_for_training(fmt: Formatter, records: Sequence[Record]) -> tuple[list[Encoded], int]:
    """Encoded records that have a target token, and how many were skipped for having none."""
    encoded_all = [fmt.encode(r) for r in records]
    encoded = [e for e in encoded_all if _n_targets(e) > 0]
    skipped = len(encoded_all) - len(encoded)
    if skipped:
        log.warning("%d of %d records have no target token (after truncation) and are skipped",
                    skipped, len(encoded_all))
    if not encoded:
        raise CoreselectError("no record has a target token to train on")
    return encoded, skipped


def _plan_steps(n: int, args: TrainArgs) -> tuple[int, int]:
    """``(steps_per_epoch, total optimizer steps)`` for ``n`` records (``max_steps`` applied)."""
    steps_per_epoch = math.ceil(math.ceil(n / args.batch_size) / args.grad_accum)
    total = math.ceil(args.epochs * steps_per_epoch)
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    return steps_per_epoch, total


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled record order of one epoch (``torch.Generator`` seeded ``seed + epoch``)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def _micro_batches(perm: list[int], g: int, args: TrainArgs) -> list[list[int]]:
    """The micro-batches (record positions) of optimizer step ``g`` of an epoch whose order is ``perm``."""
    lo = g * args.grad_accum * args.batch_size
    hi = min(len(perm), lo + args.grad_accum * args.batch_size)
    return [perm[i:min(i + args.batch_size, hi)] for i in range(lo, hi, args.batch_size)]


def _accumulate(model: Any, encoded: Sequence[Encoded], groups: list[list[int]], n_targets: Sequence[int],
                pad: int, device: torch.device) -> tuple[float, int]:
    """Forward + backward of one optimizer step's micro-batches, normalized by the step's target tokens.

    Returns the step's token-mean loss and its real (non-pad) token count.
    """
    denom = sum(n_targets[i] for mb in groups for i in mb)
    step_loss, step_tokens = 0.0, 0
    for mb in groups:
        batch = collate(encoded, mb, pad, "right", device)
        loss_sum, _ = masked_lm_loss(_forward(model, batch), make_labels(batch))
        (loss_sum / denom).backward()
        step_loss += float(loss_sum.detach()) / denom
        step_tokens += batch.n_real_tokens
    return step_loss, step_tokens


@torch.no_grad()
def eval_loss(model: Any, tokenizer: Any, records: Sequence[Record], *, max_length: int = 2048,
              batch_size: int = 8, formatter: Formatter | None = None) -> float:
    """Token-mean response-only loss of ``model`` on ``records`` (eval mode, no dropout)."""
    fmt = formatter or Formatter(tokenizer, max_length)
    enc = [e for e in (fmt.encode(r) for r in records) if _n_targets(e) > 0]
    if not enc:
        raise CoreselectError("no record has a target token")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(enc), batch_size):
            batch = collate(enc, range(s, min(s + batch_size, len(enc))), _pad_id(tokenizer), "right", _device(model))
            loss, n = masked_lm_loss(_forward(model, batch), make_labels(batch))
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total / count


def _scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total: int) -> Any:
    import transformers

    warm = math.ceil(args.warmup_ratio * total)
    if args.schedule == "linear":
        return transformers.get_linear_schedule_with_warmup(optimizer, warm, total)
    if args.schedule == "cosine":
        return transformers.get_cosine_schedule_with_warmup(optimizer, warm, total)
    return transformers.get_constant_schedule_with_warmup(optimizer, warm)


# ---------------------------------------------------------------------------- checkpoint io
def _save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors = {f"{idx}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for idx, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"]}, indent=1))


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    from safetensors.torch import load_file

    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    for g in groups:
        for k, v in g.items():
            if k != "params" and isinstance(v, list):
                g[k] = tuple(v)  # betas
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in load_file(str(folder / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _save_rng(folder: Path) -> None:
    from safetensors.torch import save_file

    t = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"cuda{i}"] = s
    save_file(t, str(folder / "rng.safetensors"))


def _load_rng(folder: Path) -> None:
    from safetensors.torch import load_file

    t = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(t["cpu"])
    cuda = [t[f"cuda{i}"] for i in range(len(t) - 1)]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (have ``trainer_state.json``), oldest first."""
    found = []
    for p in out.iterdir() if out.is_dir() else []:
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _atomic_dir(target: Path, fill: Any) -> None:
    """Build a folder in a temp sibling with ``fill(tmp)``, then rename it onto ``target``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fingerprint(args: TrainArgs, encoded: Sequence[Encoded]) -> str:
    """Hash of what fixes the data order and schedule (resume refuses a mismatch)."""
    h = hashlib.sha256()
    fixed = {k: v for k, v in asdict(args).items() if k not in ("save_every", "keep_checkpoints")}
    h.update(json.dumps(fixed, sort_keys=True, default=str).encode())
    for e in encoded:
        h.update(np.int64(e.index).tobytes() + e.input_ids.tobytes() + e.loss_mask.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- training
def train_lora(model: Any, tokenizer: Any, records: Sequence[Record], args: TrainArgs, out_dir: str | os.PathLike,
               *, progress: bool = True, resume: bool = False, formatter: Formatter | None = None) -> TrainResult:
    """Fine-tune LoRA adapters on ``records`` with the Table 7 recipe (see the module doc).

    ``model`` (a plain ``*ForCausalLM``) gets LoRA layers injected in place and is left in
    train mode; its base weights are frozen and never change. Writes ``out_dir/adapter/``
    (the final adapter), ``out_dir/checkpoint-{step}/`` and ``out_dir/train_state.json``.

    Args:
        resume: continue from the newest complete checkpoint in ``out_dir`` (same records
            and args required); without one, start from scratch.
        formatter: how records become tokens (default: ``Formatter(tokenizer, max_length)``).
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        raise ConfigError("the model already has adapters; merge or unload them before training")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    existing = _checkpoints(out)
    if existing and not resume:
        raise ConfigError(f"{out} already has checkpoints; pass resume=True or use an empty folder")

    encoded, skipped = _encode_for_training(formatter or Formatter(tokenizer, args.max_length), records)
    n_targets = [_n_targets(e) for e in encoded]
    n = len(encoded)
    steps_per_epoch, total = _plan_steps(n, args)
    fp = _fingerprint(args, encoded)
    state: dict[str, Any] | None = None
    if resume and existing:
        state = json.loads((existing[-1][1] / "trainer_state.json").read_text())
        if state.get("fingerprint") != fp:
            raise ConfigError(f"{existing[-1][1]}: records or training args differ from the run being resumed")

    torch.manual_seed(args.seed)
    config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=list(args.target_modules))
    model = get_peft_model(model, config)
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = _scheduler(optimizer, args, total)

    losses: list[float] = []
    lrs: list[float] = []
    ckpts: list[dict[str, Any]] = []
    tokens = 0
    start = 0
    if state is not None:
        step0, folder = existing[-1]
        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        _load_optimizer(optimizer, folder)
        scheduler.load_state_dict(state["scheduler"])
        _load_rng(folder)
        start, losses, lrs, tokens = step0, state["losses"], state["lrs"], state["tokens"]
        ckpts = state["checkpoints"]
        log.info("resuming from %s (step %d of %d)", folder, start, total)
    tokens_before = tokens

    def save_checkpoint(step: int) -> None:
        prev = ckpts[-1]["step"] if ckpts else 0
        meta = {"step": step, "epoch": step / steps_per_epoch, "lr": float(np.mean(lrs[prev:step]))}
        ckpts.append(meta)
        saved = {**meta, "total_steps": total, "steps_per_epoch": steps_per_epoch, "losses": losses, "lrs": lrs,
                 "tokens": tokens, "fingerprint": fp, "scheduler": scheduler.state_dict(), "checkpoints": ckpts,
                 "args": asdict(args)}

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp)
            _save_optimizer(optimizer, tmp)
            _save_rng(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(saved, indent=1, default=str))

        _atomic_dir(out / f"checkpoint-{step}", fill)
        for _, old in _checkpoints(out)[:-args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    pad = _pad_id(tokenizer)
    perm_epoch, perm = -1, []  # the current epoch's record order
    model.train()
    with progress_bar(total=total - start, desc="train", enabled=progress, unit="step") as bar:
        for step in range(start, total):
            epoch, g = divmod(step, steps_per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, _epoch_order(n, args.seed, epoch)
            step_loss, step_tokens = _accumulate(model, encoded, _micro_batches(perm, g, args), n_targets, pad,
                                                 device)
            if args.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            tokens += step_tokens
            done = step + 1
            # count tokens ourselves: bar.update(tokens=...) would replace this postfix with tok/s only
            bar.tokens += step_tokens
            rate = bar.tokens / max(time.perf_counter() - bar.t0, 1e-9)
            bar.bar.set_postfix_str(f"loss {step_loss:.4f}, lr {lrs[-1]:.2e}, {rate:,.0f} tok/s", refresh=False)
            bar.update(1)
            every = steps_per_epoch if args.save_every == "epoch" else args.save_every
            if done % every == 0 or done == total:
                save_checkpoint(done)

    adapter = out / "adapter"
    _atomic_dir(adapter, model.save_pretrained)
    wall = time.perf_counter() - t0
    kept = {s for s, _ in _checkpoints(out)}
    checkpoints = [Checkpoint(out / f"checkpoint-{c['step']}", c["epoch"], c["step"], c["lr"])
                   for c in ckpts if c["step"] in kept]
    write_json(out / "train_state.json", {
        "steps": total, "steps_per_epoch": steps_per_epoch, "records": n, "skipped": skipped,
        "resumed_from": start or None, "wall_s": wall, "tokens": tokens,
        "tokens_per_s": (tokens - tokens_before) / wall if wall > 0 else None, "losses": losses, "lrs": lrs,
        "checkpoints": [{**asdict(c), "path": c.path.name} for c in checkpoints], "args": asdict(args),
    })
    return TrainResult(adapter, checkpoints, list(losses), total, wall, tokens, skipped)


__all__ = ["Checkpoint", "TrainArgs", "TrainResult", "eval_loss", "make_labels", "masked_lm_loss", "train_lora",
           "warmup_subset"]
