"""Batching by token budget and the two forward passes TRIM needs.

* :func:`token_budget_batches` sorts records by length and packs them so that
  ``n_records x longest`` stays within a token budget (little padding).
* :meth:`ModelRunner.hidden` runs the *base* model (no LM head, so no ``[B, T, V]``
  logits) with SDPA and returns ``last_hidden_state``.
* :meth:`ModelRunner.attentions` switches to eager attention and hooks only the last
  ``L`` attention modules, so only their probability maps are ever kept.
* :meth:`ModelRunner.attn_hidden` returns those maps with the hidden states of a separate
  :meth:`~ModelRunner.hidden` pass: Stage I fingerprints and Stage II pool states come from
  the same kernel (SDPA), never from eager attention, which in bf16/fp16 rounds the
  probabilities before they multiply V (issue 11, §2). The extra pass runs over the 5-10
  target records only.
* :func:`attention_windows` reads each layer's sliding window from the config, for the
  admissible keys of eq. 2 and eq. 4.

Position ids are computed from the attention mask, so left and right padding give the
same hidden states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coreselect.data.formatting import Encoded, Scope, pad_id, scope_mask
from coreselect.errors import ConfigError
from coreselect.models.introspect import attention_module as _attention_module
from coreselect.models.introspect import decoder_layers as _decoder_layers
from coreselect.models.introspect import eager_attention


def token_budget_batches(lengths: Sequence[int], batch_tokens: int, max_batch_size: int = 1024) -> list[list[int]]:
    """Group positions into batches by a padded-token budget, longest first.

    Each batch satisfies ``len(batch) * max(lengths in batch) <= batch_tokens`` (a record
    longer than the budget gets a batch of its own). Ties in length keep input order, so
    the batching is deterministic.
    """
    if batch_tokens < 1:
        raise ConfigError(f"batch_tokens must be >= 1, got {batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        new_max = max(cur_max, n)
        if cur and (new_max * (len(cur) + 1) > batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur, new_max = [], n
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


@dataclass
class Batch:
    """Padded tensors for a list of encoded records (``positions`` index into the caller's list)."""

    positions: list[int]
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    codes: Tensor
    loss_mask: Tensor
    #: ``[B]`` record lengths, kept on the host so that counting tokens never reads the device
    lengths: np.ndarray | None = None

    @property
    def n_real_tokens(self) -> int:
        if self.lengths is not None:
            return int(self.lengths.sum())
        return int(self.attention_mask.sum())

    @property
    def n_padded_tokens(self) -> int:
        return int(self.attention_mask.numel())

    def scope_mask(self, scope: Scope) -> Tensor:
        """``[B, T]`` bool on the batch's device: the non-pad tokens of ``scope`` (never template or
        special tokens). :func:`coreselect.data.formatting.scope_mask` is a plain comparison on the
        codes, so it runs on the tensor where it is, with no copy to the CPU and back."""
        return scope_mask(self.codes, scope) & self.attention_mask.bool()  # type: ignore[arg-type,return-value]


def response_losses(logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-record summed response cross-entropy ``[B]`` and target count ``[B]``.

    Targets are the ``loss_mask`` tokens (never pad), token ``t`` predicted from ``t - 1``, as in
    :func:`coreselect.train.lora.masked_lm_loss` (which sums over the whole batch). Only the target
    positions' logits are taken and upcast (float32; a float64 model stays float64), so no float copy
    of the ``[B, T, V]`` logits is made. Differentiable.
    """
    keep = batch.loss_mask[:, 1:] & batch.attention_mask[:, 1:].bool()
    picked = logits[:, :-1][keep]
    if picked.dtype not in (torch.float32, torch.float64):
        picked = picked.float()
    ce = torch.nn.functional.cross_entropy(picked, batch.input_ids[:, 1:][keep], reduction="none")
    per_pos = torch.zeros(keep.shape, dtype=ce.dtype, device=ce.device).masked_scatter(keep, ce)
    return per_pos.sum(-1), keep.sum(-1)


def _to_device(a: np.ndarray, device: torch.device | str) -> Tensor:
    """A host array as a tensor on ``device``: on CUDA through pinned memory with a non-blocking copy
    (the host buffer is not touched again, so the copy can overlap whatever the device is doing)."""
    t = torch.from_numpy(a)
    dev = torch.device(device)
    if dev.type == "cpu":
        return t
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def collate(
    encoded: Sequence[Encoded],
    positions: Sequence[int],
    pad_id: int,
    padding_side: str = "right",
    device: torch.device | str = "cpu",
) -> Batch:
    """Pad a batch; ``padding_side`` is ``right`` or ``left``.

    Everything is built on the host with numpy (position ids included) and copied once per tensor
    (pinned, non-blocking on CUDA); the record lengths stay on the host (:attr:`Batch.lengths`).
    """
    items = [encoded[p] for p in positions]
    lengths = np.fromiter((len(e) for e in items), dtype=np.int64, count=len(items))
    width = int(lengths.max())
    b = len(items)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    pos = np.zeros((b, width), dtype=np.int64)
    codes = np.zeros((b, width), dtype=np.int8)
    loss = np.zeros((b, width), dtype=bool)
    ramp = np.arange(width, dtype=np.int64)
    for r, e in enumerate(items):
        n = len(e)
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[r, sl] = e.input_ids
        mask[r, sl] = 1
        pos[r, sl] = ramp[:n]  # (cumsum(mask) - 1).clamp(0): 0 on left padding, 0..n-1 on the record
        if padding_side == "right":
            pos[r, n:] = n - 1
        codes[r, sl] = e.codes
        loss[r, sl] = e.loss_mask
    return Batch(
        positions=list(positions),
        input_ids=_to_device(ids, device),
        attention_mask=_to_device(mask, device),
        position_ids=_to_device(pos, device),
        codes=_to_device(codes, device),
        loss_mask=_to_device(loss, device),
        lengths=lengths,
    )


@dataclass
class Packed:
    """Several records laid end to end in rows of one width (sequence packing).

    ``input_ids`` / ``position_ids`` are ``[R, W]``; positions restart at 0 for each record, and
    the tail of a row is a padding segment of its own (positions 0, 1, ...), so the model's packed
    sequence detection (``position_ids`` jumps, no ``attention_mask``) gives every record its own
    causal block: a block-diagonal mask under SDPA / eager, varlen kernels under
    ``flash_attention_2``. ``gather`` ``[B * T]`` indexes the flattened ``[R * W]`` output so that
    ``hidden.flatten(0, 1)[gather].view(B, T, D)`` is the padded layout of :attr:`batch`
    (positions past a record's end repeat its last state; pad positions are never scored).
    """

    batch: Batch
    input_ids: Tensor
    position_ids: Tensor
    gather: Tensor
    rows: int


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: record positions grouped into rows of at most ``width`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(width - n)
    return rows


def collate_packed(
    encoded: Sequence[Encoded],
    positions: Sequence[int],
    pad_id: int,
    device: torch.device | str = "cpu",
    width: int | None = None,
) -> Packed:
    """:func:`collate` (right padding) plus the same records packed into rows of ``width`` tokens
    (default: the longest record, so attention costs no more than the padded batch)."""
    batch = collate(encoded, positions, pad_id, "right", "cpu")
    lengths = batch.lengths
    assert lengths is not None
    b, t = batch.input_ids.shape
    w = int(width or t)
    rows = pack_rows(lengths.tolist(), w)
    ids = np.full((len(rows), w), pad_id, dtype=np.int64)
    pos = np.zeros((len(rows), w), dtype=np.int64)
    gather = np.zeros((b, t), dtype=np.int64)
    ramp = np.arange(w, dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = int(lengths[i])
            ids[r, at : at + n] = encoded[positions[i]].input_ids
            pos[r, at : at + n] = ramp[:n]
            gather[i, :n] = r * w + at + ramp[:n]
            gather[i, n:] = r * w + at + n - 1  # padding: the record's last state (never scored)
            at += n
        pos[r, at:] = ramp[: w - at]
    dev = torch.device(device)
    on_dev = Batch(
        positions=batch.positions,
        input_ids=_to_device(batch.input_ids.numpy(), dev),
        attention_mask=_to_device(batch.attention_mask.numpy(), dev),
        position_ids=_to_device(batch.position_ids.numpy(), dev),
        codes=_to_device(batch.codes.numpy(), dev),
        loss_mask=_to_device(batch.loss_mask.numpy(), dev),
        lengths=lengths,
    )
    return Packed(on_dev, _to_device(ids, dev), _to_device(pos, dev), _to_device(gather.reshape(-1), dev), len(rows))


@contextlib.contextmanager
def frozen_parameters(model: Any) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter for the block, then restore the flags."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def attention_windows(config: Any, layer_indices: Sequence[int]) -> list[int | None]:
    """The sliding window ``W`` of each given decoder layer (``None``: full causal attention).

    transformers' convention (``masking_utils.sliding_window_overlay``): a query at ``i``
    sees keys ``j`` with ``i - W < j <= i``. Per layer:

    * ``config.layer_types`` (Gemma 2/3, Qwen2, Qwen3, OLMo ...): ``sliding_attention``
      layers use ``config.sliding_window``, ``full_attention`` layers none. Qwen2/3 write
      ``sliding_attention`` only when ``use_sliding_window`` is on.
    * no ``layer_types`` (Mistral, Mixtral, Phi-3): every layer uses ``config.sliding_window``
      when it is set.

    Raises:
        ConfigError: for attention this reading cannot express (chunked attention,
            bidirectional attention), rather than miscount the keys.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ConfigError(
            f"{type(cfg).__name__} uses bidirectional attention; TRIM's saliency assumes causal attention"
        )
    sw = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        sw = None  # Qwen2-style flag that older configs keep beside a non-null sliding_window
    types = getattr(cfg, "layer_types", None)
    out: list[int | None] = []
    for i in layer_indices:
        if types is None:
            out.append(int(sw) if sw else None)
            continue
        kind = types[i]
        if kind == "sliding_attention":
            out.append(int(sw) if sw else None)
        elif kind == "full_attention":
            out.append(None)
        else:
            raise ConfigError(
                f"layer {i} of {type(cfg).__name__} has attention type {kind!r}, which TRIM's saliency does not support"
            )
    return out


def attention_probs(out: Any) -> Tensor:
    """The ``[B, H, T, T]`` probabilities an attention module returned (a forward hook's ``out``)."""
    w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
    if w is None:
        raise RuntimeError("attention module returned no probabilities (eager attention required)")
    return w


class ModelRunner:
    """Holds a loaded causal LM and runs the forward passes the methods need.

    Args:
        model: a ``*ForCausalLM`` (adapters already merged).
        tokenizer: its tokenizer (used for the pad id).
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.base = model.base_model if hasattr(model, "base_model") else model
        self.layers = _decoder_layers(self.base)
        self.pad_id = pad_id(tokenizer)
        self.forward_passes = 0
        self.tokens_seen = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embeddings(self) -> Tensor:
        """The input-embedding matrix ``E`` (``[V, E]``), used by eq. 11."""
        return self.model.get_input_embeddings().weight.detach()

    def collate(self, encoded: Sequence[Encoded], positions: Sequence[int], padding_side: str = "right") -> Batch:
        return collate(encoded, positions, self.pad_id, padding_side, self.device)

    @torch.inference_mode()
    def hidden(self, batch: Batch) -> Tensor:
        """Last-layer hidden states ``[B, T, D]`` of the base model (no logits, no attention maps)."""
        out = self.base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        self.forward_passes += batch.input_ids.shape[0]
        self.tokens_seen += batch.n_real_tokens
        return out.last_hidden_state

    def collate_packed(self, encoded: Sequence[Encoded], positions: Sequence[int]) -> Packed:
        return collate_packed(encoded, positions, self.pad_id, self.device)

    @torch.inference_mode()
    def hidden_packed(self, packed: Packed) -> Tensor:
        """:meth:`hidden` for a packed batch: one pass over the packed rows (no attention mask; the
        model finds the records from the position ids), returned in the padded ``[B, T, D]`` layout
        of ``packed.batch``. Needs a kernel that honours packed position ids (SDPA, eager,
        flash_attention_2 in transformers >= 4.54)."""
        out = self.base(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
        h = out.last_hidden_state
        b, t = packed.batch.input_ids.shape
        self.forward_passes += b
        self.tokens_seen += packed.batch.n_real_tokens
        return h.flatten(0, 1).index_select(0, packed.gather).view(b, t, h.shape[-1])

    @contextlib.contextmanager
    def _eager(self) -> Iterator[None]:
        """Eager attention for the block (:func:`coreselect.models.introspect.eager_attention`)."""
        with eager_attention(self.model):
            yield

    def _last_layer_indices(self, last_layers: int) -> list[int]:
        if not 1 <= last_layers <= self.num_layers:
            raise ConfigError(f"layers must be in 1..{self.num_layers} for this model, got {last_layers}")
        return list(range(self.num_layers - last_layers, self.num_layers))

    def windows(self, last_layers: int) -> list[int | None]:
        """The sliding window of each of the last ``L`` layers (see :func:`attention_windows`)."""
        return attention_windows(self.model.config, self._last_layer_indices(last_layers))

    @torch.inference_mode()
    def attentions(self, batch: Batch, last_layers: int) -> list[Tensor]:
        """Attention probabilities ``[B, H, T, T]`` of the last ``L`` layers (one eager pass)."""
        idx = self._last_layer_indices(last_layers)
        captured: list[Tensor] = []

        def hook(_mod: Any, _args: Any, out: Any) -> None:
            captured.append(attention_probs(out))

        handles = [_attention_module(self.layers[i]).register_forward_hook(hook) for i in idx]
        try:
            with self._eager():
                self.hidden(batch)
        finally:
            for h in handles:
                h.remove()
        return captured

    @torch.inference_mode()
    def attn_hidden(self, batch: Batch, last_layers: int) -> tuple[list[Tensor], Tensor]:
        """Attention probabilities of the last ``L`` layers (eager pass) and the last hidden
        state of a separate :meth:`hidden` pass with the model's own attention kernel, the one
        Stage II scores the pool with."""
        attns = self.attentions(batch, last_layers)
        return attns, self.hidden(batch)
