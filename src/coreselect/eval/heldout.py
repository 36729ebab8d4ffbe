"""Held-out target loss: LESS's cheap signal, which lm-eval cannot compute.

The mean response loss of the model on held-out examples in the target's own format
(coreselect records: chat ``messages``, prompt/response...), formatted exactly as for
training by :class:`coreselect.data.formatting.Formatter` (chat template when the
tokenizer has one) with the loss on the response tokens only. lm-eval scores
continuations of plain-text prompts; it has no notion of coreselect's record formats, chat
templates applied per turn, or a response-only mask over multi-turn records, so this stays
here (one forward per batch with :func:`coreselect.models.runner.response_losses`).

Each example counts once: ``loss`` is the mean over examples of the example's mean
response-token cross-entropy (nats/token), with a 95% Student-t interval over examples
(``mean ± t_{0.975, n-1} * sd / sqrt(n)``). The token-weighted mean is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from coreselect.errors import ConfigError, CoreselectError

if TYPE_CHECKING:
    from coreselect.data.formatting import TemplateChoice

__all__ = ["heldout_loss", "t_interval"]


def t_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float | None, list[float] | None]:
    """``(mean, sd, stderr, [lo, hi])`` with a Student-t interval over ``xs`` (no interval for n < 2)."""
    n = len(xs)
    if n == 0:
        raise ConfigError("no values to average")
    mean = math.fsum(xs) / n
    if n < 2:
        return mean, 0.0, None, None
    from scipy.stats import t

    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    se = sd / math.sqrt(n)
    h = float(t.ppf(0.5 + level / 2, n - 1)) * se
    return mean, sd, se, [mean - h, mean + h]


def heldout_loss(
    model: Any,
    tokenizer: Any,
    paths: Sequence[str],
    *,
    max_length: int = 2048,
    template: TemplateChoice = "auto",
    batch_size: int = 8,
) -> dict[str, Any]:
    """Mean response loss of ``model`` on the records of ``paths`` with a 95% t-interval over examples.

    Returns ``{"loss", "stderr", "ci95", "sd", "loss_token_weighted", "n", "tokens", "skipped",
    "truncated", "files", "ci_method"}`` plus ``per_example`` (``id``, ``loss``, ``tokens``).
    Records with no response token left after truncation to ``max_length`` are skipped.
    """
    from coreselect.data.formatting import Formatter, pad_id
    from coreselect.data.readers import read_records
    from coreselect.models.runner import collate, response_losses

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    records = list(read_records(list(paths), check_duplicate_ids=False))
    if not records:
        raise CoreselectError(f"{', '.join(map(str, paths))}: no held-out records")
    fmt = Formatter(tokenizer, max_length, template)
    enc = [fmt.encode(r) for r in records]
    keep = [i for i, e in enumerate(enc) if e.loss_mask[1:].any()]
    if not keep:
        raise CoreselectError("held-out records: none has a response token to score")
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    order = sorted(keep, key=lambda i: -len(enc[i]))
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                batch = collate(enc, order[b : b + batch_size], int(pad), "right", device)
                logits = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
                ).logits
                s, c = response_losses(logits, batch)
                for j, i in enumerate(batch.positions):
                    sums[i], counts[i] = float(s[j]), int(c[j])
    finally:
        if was_training:
            model.train()
    per = [{"id": records[i].id, "loss": sums[i] / counts[i], "tokens": counts[i]} for i in keep]
    mean, sd, se, ci = t_interval([sums[i] / counts[i] for i in keep])
    tokens = sum(counts.values())
    return {
        "loss": mean,
        "stderr": se,
        "ci95": ci,
        "sd": sd,
        "loss_token_weighted": math.fsum(sums.values()) / tokens,
        "n": len(per),
        "tokens": tokens,
        "skipped": len(records) - len(keep),
        "truncated": sum(enc[i].truncated for i in keep),
        "files": [str(p) for p in paths],
        "max_length": max_length,
        "template": template,
        "ci_method": "Student-t interval over examples of the per-example mean response-token loss",
        "per_example": per,
    }
