"""Small training helpers shared outside :mod:`transformers.Trainer`.

LoRA fine-tuning (:mod:`coreselect.train.lora`) runs on ``transformers.Trainer``. What is
left here is used by code that runs its own forward passes: the response-only loss
(:func:`make_labels`, :func:`masked_lm_loss`, :func:`forward`) for scoring and evaluation,
plus the encoding and step plan that :func:`coreselect.train.lora.train_lora` (LoRA and
P2D-double-dagger's heads-only training) computes before handing over to ``Trainer``.

Conventions (the same as ``Trainer`` with :func:`coreselect.train.lora.collate_for_lm`):
labels are ``input_ids`` where ``loss_mask`` else ``-100``; token ``t`` is predicted from
``t - 1``; an optimizer step's loss is normalized by the total number of target tokens of
all its micro-batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from coreselect.data.formatting import (  # the one pad-id rule (re-exported)
    Encoded,
    Formatter,
    pad_id,
)
from coreselect.data.records import Record
from coreselect.errors import CoreselectError
from coreselect.models.runner import Batch

log = logging.getLogger(__name__)

IGNORE = -100
SCHEDULES = ("linear", "cosine", "constant")

__all__ = [
    "IGNORE",
    "SCHEDULES",
    "device_of",
    "encode_for_training",
    "forward",
    "make_labels",
    "masked_lm_loss",
    "n_targets",
    "pad_id",
    "plan_steps",
]


def make_labels(batch: Batch) -> Tensor:
    """Unshifted HF-style labels: ``input_ids`` where ``loss_mask`` else ``-100``."""
    return torch.where(batch.loss_mask, batch.input_ids, torch.full_like(batch.input_ids, IGNORE))


def masked_lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy of the target tokens and their count (token ``t`` from ``t-1``)."""
    lab = labels[:, 1:]
    keep = lab != IGNORE
    picked = logits[:, :-1][keep].float()
    return torch.nn.functional.cross_entropy(picked, lab[keep], reduction="sum"), int(keep.sum())


def n_targets(e: Encoded) -> int:
    """Target tokens of a record (position 0 has no previous token to predict it from)."""
    return int(e.loss_mask[1:].sum())


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def forward(model: Any, batch: Batch) -> Tensor:
    """Logits of a collated batch (no KV cache)."""
    return model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    ).logits


def encode_for_training(fmt: Formatter, records: Sequence[Record]) -> tuple[list[Encoded], int]:
    """Encoded records that have a target token, and how many were skipped for having none."""
    encoded_all = [fmt.encode(r) for r in records]
    encoded = [e for e in encoded_all if n_targets(e) > 0]
    skipped = len(encoded_all) - len(encoded)
    if skipped:
        log.warning(
            "%d of %d records have no target token (after truncation) and are skipped", skipped, len(encoded_all)
        )
    if not encoded:
        raise CoreselectError("no record has a target token to train on")
    return encoded, skipped


def plan_steps(n: int, args: Any, world_size: int = 1) -> tuple[int, int]:
    """``(steps_per_epoch, total optimizer steps)`` for ``n`` records (``max_steps`` applied).

    With ``world_size`` processes each takes every ``world_size``-th micro-batch, as
    ``Trainer`` / accelerate shard them.
    """
    micro = math.ceil(math.ceil(n / args.batch_size) / world_size)
    steps_per_epoch = math.ceil(micro / args.grad_accum)
    total = math.ceil(args.epochs * steps_per_epoch)
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    return steps_per_epoch, total
