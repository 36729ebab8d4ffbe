"""Shared machinery of the checkpoint-based baselines (LESS, TAGCOS, S2L, CLD).

* :func:`load_checkpoints` / :func:`warmup_checkpoints`: the warmup's ``checkpoint-*``
  folders (PEFT adapters written by :func:`coreselect.train.lora.train_lora`) with their
  step, epoch and learning rate (from the ``coreselect.json`` manifest; JSON only).
* :class:`AdapterSwitcher`: puts one checkpoint's adapter on the *un-merged* base model at a
  time (``PeftModel.from_pretrained`` once, then ``load_adapter`` / ``set_adapter`` /
  ``delete_adapter``), so the base weights are loaded once.
* :func:`per_example_losses`: response-only token-mean loss of each record (no gradient).
* :func:`gradient_features`: per-example LoRA gradients (batch size 1), optionally turned
  into LESS's Adam update, randomly projected (:class:`Projector`) and unit-normalized.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coreselect.data.formatting import Encoded
from coreselect.errors import ConfigError, CoreselectError
from coreselect.models.introspect import attention_projections
from coreselect.models.loading import require_adapter_dir
from coreselect.models.runner import collate, response_losses, token_budget_batches
from coreselect.train.lora import Checkpoint, _forward

_CKPT = re.compile(r"^checkpoint-(\d+)$")
log = logging.getLogger(__name__)


def missing_attention_projections(base: Any, adapted: Sequence[str]) -> list[str]:
    """The attention projections of ``base`` (:func:`~coreselect.models.introspect.attention_projections`)
    that no adapted module (leaf names) covers; ``[]`` for an architecture outside the table.

    LESS's features are the gradients of the adapter's LoRA weights, so an adapter that misses
    projections (an old Phi-3 warmup adapted ``o_proj`` only) silently changes the feature space.
    """
    try:
        want = attention_projections(base)
    except ConfigError:
        return []
    have = set(adapted)
    return [n for n in want if n.rsplit(".", 1)[-1] not in have]


# ------------------------------------------------------------------------------ checkpoints
def load_checkpoints(paths: Sequence[str | Path]) -> list[Checkpoint]:
    """Checkpoints from folders, oldest first (by step).

    Step, epoch and lr come from the folder's ``coreselect.json`` manifest (written by
    ``train_lora``); a folder without one (a plain adapter, or another trainer's checkpoint)
    gets step = its ``checkpoint-N`` number (else its position), epoch = step and lr = 1.0
    (equal weights).
    """
    out: list[Checkpoint] = []
    for i, p in enumerate(paths):
        path = require_adapter_dir(p)
        state_file = path / "coreselect.json"
        m = _CKPT.match(path.name)
        step = int(m.group(1)) if m else i
        state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
        out.append(
            Checkpoint(path, float(state.get("epoch", step)), int(state.get("step", step)), float(state.get("lr", 1.0)))
        )
    return sorted(out, key=lambda c: c.step)


def warmup_checkpoints(warmup: dict[str, Any], method: str, need: int = 1) -> list[Checkpoint]:
    """The warmup's checkpoints: ``warmup["checkpoints"]`` (``--warmup auto``), else the
    ``checkpoint-*`` folders beside a reused adapter (``<run>/warmup/adapter``).

    Raises ConfigError when fewer than ``need`` are found.
    """
    paths = list(warmup.get("checkpoints") or [])
    if not paths and warmup.get("adapter"):
        parent = Path(warmup["adapter"]).parent
        found = [(int(m.group(1)), p) for p in parent.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
        paths = [p for _, p in sorted(found)]
    if len(paths) < need:
        raise ConfigError(
            f"method {method} needs at least {need} warmup checkpoint(s), found {len(paths)}; run with "
            "--warmup auto (or --warmup <run>/warmup/adapter so the checkpoint-* folders beside it are used)"
        )
    return load_checkpoints(paths)


class AdapterSwitcher:
    """One checkpoint adapter at a time on an un-merged base model.

    ``activate(path)`` returns the :class:`peft.PeftModel` (eval mode, so no dropout) with
    that adapter active and only its LoRA weights requiring grad; :attr:`params` lists those
    weights in ``named_parameters`` order, which is the order the trainer's optimizer saw.
    """

    def __init__(self, base: Any) -> None:
        if hasattr(base, "peft_config"):
            raise ConfigError("checkpoint-based methods need the base model without adapters")
        self.base = base
        self.model: Any = None
        self.active: str | None = None
        self.params: list[Tensor] = []
        self.modules: list[str] = []
        self._n = 0

    def activate(self, path: str | Path) -> Any:
        from peft import PeftModel

        name = f"ckpt{self._n}"
        self._n += 1
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=True)
        else:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=True)
            self.model.set_adapter(name)
            if self.active is not None:
                self.model.delete_adapter(self.active)
        self.active = name
        self.params = []
        for pname, p in self.model.named_parameters():
            mine = "lora_" in pname and f".{name}." in f"{pname}."
            p.requires_grad_(mine)
            if mine:
                self.params.append(p)
        if not self.params:
            raise CoreselectError(f"{path}: the adapter has no LoRA weights")
        self.modules = sorted(
            {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in self.model.named_parameters() if p.requires_grad}
        )
        missing = missing_attention_projections(self.base, self.modules)
        if missing:
            log.warning(
                "%s adapts %s but not the attention projections %s: its gradients miss them",
                path,
                ", ".join(self.modules),
                ", ".join(missing),
            )
        self.model.eval()
        return self.model


Moments = tuple[list[Tensor], list[Tensor], dict[str, float]]


def adam_moments(folder: str | Path, params: Sequence[Tensor]) -> Moments | None:
    """AdamW first/second moments saved with a checkpoint (``optimizer.safetensors`` +
    ``optimizer.json`` as written by ``train_lora``: key ``{i}.exp_avg`` is the ``i``-th
    trainable parameter in ``named_parameters`` order), matched to ``params`` by position.
    A DeepSpeed / FSDP checkpoint has no such file (its optimizer state is sharded).

    Returns ``None`` when there is no optimizer state or it does not match the adapter's
    shapes (the caller then falls back to plain SGD gradients).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    st, js = folder / "optimizer.safetensors", folder / "optimizer.json"
    if not st.is_file():
        return None
    tensors = load_file(str(st))
    avg, sq = [], []
    for i, p in enumerate(params):
        a, s = tensors.get(f"{i}.exp_avg"), tensors.get(f"{i}.exp_avg_sq")
        if a is None or s is None or a.shape != p.shape or s.shape != p.shape:
            return None
        avg.append(a.float().reshape(-1))
        sq.append(s.float().reshape(-1))
    if f"{len(params)}.exp_avg" in tensors:  # more state than weights: not this adapter's optimizer
        return None
    hp = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    if js.is_file():
        g = json.loads(js.read_text()).get("param_groups", [{}])[0]
        betas = g.get("betas", (0.9, 0.999))
        hp = {"beta1": float(betas[0]), "beta2": float(betas[1]), "eps": float(g.get("eps", 1e-8))}
    return avg, sq, hp


# ------------------------------------------------------------------------------ projection
class Projector:
    """Seeded Rademacher random projection ``R^D -> R^k`` applied in row chunks.

    The ``D x k`` matrix is never held: chunk ``j`` (rows ``j*rows .. (j+1)*rows``) is drawn
    from a generator seeded ``seed * 1_000_003 + j`` on the features' device, so pool and
    target features use the same matrix and memory stays at ``chunk_elems`` entries.
    ``k = min(proj_dim, D)`` (a tiny LoRA may have fewer than 8192 weights); ``proj_dim=None``
    keeps the raw gradients. Entries are ``+-1/sqrt(k)``.
    """

    def __init__(self, dim: int, proj_dim: int | None, seed: int = 0, chunk_elems: int = 1 << 24) -> None:
        if proj_dim is not None and proj_dim < 1:
            raise ConfigError(f"proj_dim must be >= 1 or None, got {proj_dim}")
        self.dim = int(dim)
        self.identity = proj_dim is None
        self.k = self.dim if proj_dim is None else min(int(proj_dim), self.dim)
        self.seed = int(seed)
        self.rows = max(1, chunk_elems // self.k)

    def __call__(self, g: Tensor) -> Tensor:
        """``[B, D] -> [B, k]`` (float32)."""
        g = g.float()
        if self.identity:
            return g
        out = torch.zeros(g.shape[0], self.k, dtype=torch.float32, device=g.device)
        for j, start in enumerate(range(0, self.dim, self.rows)):
            stop = min(self.dim, start + self.rows)
            gen = torch.Generator(device=g.device).manual_seed(self.seed * 1_000_003 + j)
            r = torch.randint(0, 2, (stop - start, self.k), generator=gen, device=g.device, dtype=torch.float32)
            out += g[:, start:stop] @ (r * 2 - 1)
        return out / math.sqrt(self.k)


# ------------------------------------------------------------------------------ losses and gradients
@torch.no_grad()
def per_example_losses(model: Any, encoded: Sequence[Encoded], pad_id: int, batch_tokens: int = 4096) -> np.ndarray:
    """Token-mean response-only loss of each record (``loss_mask`` tokens, shifted by one).

    ``NaN`` for a record with no target token. Records are batched by length (right padded).
    """
    device = next(model.parameters()).device
    out = np.full(len(encoded), np.nan, dtype=np.float64)
    was = model.training
    model.eval()
    try:
        for pos in token_budget_batches([len(e) for e in encoded], batch_tokens):
            batch = collate(encoded, pos, pad_id, "right", device)
            s, c = response_losses(_forward(model, batch), batch)
            vals = (s / c.clamp(min=1)).double().cpu().numpy()
            vals[c.cpu().numpy() == 0] = np.nan
            out[pos] = vals
    finally:
        model.train(was)
    return out


@dataclass
class FeatureStats:
    forward_passes: int = 0
    backward_passes: int = 0


def gradient_features(
    model: Any,
    params: Sequence[Tensor],
    encoded: Sequence[Encoded],
    pad_id: int,
    projector: Projector | None,
    adam: Moments | None,
    stats: FeatureStats,
    proj_batch: int = 32,
) -> Tensor:
    """Unit-normalized (projected) gradient features ``[N, k]`` on CPU, float32.

    Per record (batch size 1): the gradient of the token-mean response loss w.r.t. ``params``,
    flattened. With ``adam = (exp_avg, exp_avg_sq, hp)`` it becomes LESS's Adam update
    ``m' / sqrt(v' + eps)`` with ``m' = b1 m + (1-b1) g``, ``v' = b2 v + (1-b2) g^2`` (no bias
    correction, eps inside the root, as LESS's ``obtain_gradients_with_adam``). A record with
    no target token gets a zero feature. Gradients are buffered ``proj_batch`` at a time and
    projected together.
    """
    device = next(model.parameters()).device
    dim = sum(p.numel() for p in params)
    if adam is not None:
        m0 = torch.cat(adam[0]).to(device)
        v0 = torch.cat(adam[1]).to(device)
        b1, b2, eps = adam[2]["beta1"], adam[2]["beta2"], adam[2]["eps"]
    feats: list[Tensor] = []
    buf: list[Tensor] = []

    def flush() -> None:
        if buf:
            g = torch.stack(buf)
            g = projector(g) if projector is not None else g
            feats.append(torch.nn.functional.normalize(g, dim=1).cpu())
            buf.clear()

    for i in range(len(encoded)):
        if not encoded[i].loss_mask[1:].any():
            buf.append(torch.zeros(dim, dtype=torch.float32, device=device))
        else:
            batch = collate(encoded, [i], pad_id, "right", device)
            s, c = response_losses(_forward(model, batch), batch)
            grads = torch.autograd.grad((s / c).sum(), list(params))
            g = torch.cat([x.reshape(-1).float() for x in grads])
            if adam is not None:
                m = b1 * m0 + (1 - b1) * g
                v = b2 * v0 + (1 - b2) * g * g
                g = m / torch.sqrt(v + eps)
            buf.append(g)
            stats.forward_passes += 1
            stats.backward_passes += 1
        if len(buf) >= proj_batch:
            flush()
    flush()
    k = projector.k if projector is not None else dim
    return torch.cat(feats) if feats else torch.zeros(0, k)
