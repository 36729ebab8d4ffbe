"""P2D stage iii (paper 003, Fig. 2), P2D-double-dagger: fine-tune only the task-sensitive heads ``H_T``; and the AER.

**What is trained.** For a selected query head ``h`` of layer ``l`` (head size ``d``,
``config.head_dim`` when the config sets it):

* rows ``h*d:(h+1)*d`` of ``q_proj.weight`` (and of its bias, if any);
* columns ``h*d:(h+1)*d`` of ``o_proj.weight`` (``o_proj``'s bias is shared by all heads
  and is not trained);
* rows ``g*d:(g+1)*d`` of ``k_proj`` and ``v_proj`` (weights and biases) for the key/value
  head ``g = h // (H / H_kv)`` that ``h`` reads.

Those are the Llama names; other families use their own (``dense`` / ``c_proj`` for the
output projection), and a fused QKV projection (Phi-3 ``qkv_proj``, GPT-NeoX
``query_key_value``, ...) trains the union of the head's q, k and v rows inside it, at the
positions its layout puts them (:func:`coreselect.models.introspect.head_index_map`). With
grouped-query attention a KV head is shared by several query heads; **we train it as soon as any of its query heads is
  selected** (``KV_POLICY = "any"``): a selected head must be able to change what it
  attends to, and the only way to change its keys is the shared KV rows. The side effect
  (the sibling query heads see the updated keys/values too) is the price of GQA; a model
  without GQA (``H_kv = H``) trains exactly the selected heads.

**How.** Separate delta parameters, not gradient masks: every trained slice gets a float32
``delta`` (initialized to 0) added through forward hooks (``out[..., rows] += x @ dq^T``
for q/k/v, ``out += x[..., cols] @ do^T`` for o_proj). The base weights are frozen, so
everything outside the slices stays bit-identical by construction (AdamW's decoupled
weight decay would otherwise move masked entries too), and the optimizer state is the
size of the slices only. At the end the deltas are merged into the model
(``W[slice] = W[slice] + delta``, computed in float32) and saved.

**Engine.** The same ``transformers.Trainer`` run as LoRA (:func:`coreselect.train.lora.train_lora`
with ``trainable=``:class:`HeadsOnly`): Table 7 recipe, response-only labels and the
collator, per-step token-mean loss across micro-batches and processes, per-epoch
safetensors checkpoints (the deltas as ``model.safetensors`` and their AdamW state) with
the resume checks, ``loss.png``, ``accelerate launch`` / ``torchrun``. ``Trainer`` trains
:class:`HeadsModule`, a module whose only parameters are the deltas; the base model is
held outside its module tree, so DDP synchronizes, and checkpoints save, the deltas only.

**Artifact.** ``OUT/heads_delta.safetensors`` holds, per trained projection,
``layers.{l}.{proj}.weight`` (the delta slice) and ``layers.{l}.{proj}.index`` (its row,
or for o_proj column, indices), plus ``.bias`` deltas where the projection has a bias;
``OUT/heads.json`` is the head set. :func:`apply_head_delta` adds them onto a fresh base
model with the same float32 arithmetic, giving bit-identical weights.

**AER** (Alignment Efficiency Ratio, lower is better)::

    AER = (selection wall time + training wall time) / (full-data full-parameter SFT wall time)

all on the same hardware (:func:`alignment_efficiency_ratio`). Full SFT is rarely run, so
:func:`estimate_aer` estimates the training terms: it times forward+backward passes on a
sample (the target examples, after one untimed warm-up batch) once with gradients for
every parameter and once for the ``H_T`` deltas only, converts them to seconds per real
token, and multiplies by the token counts (the selected records for P2D training, the
whole pool for full SFT) and the epochs. The optimizer step is not timed; it is far
cheaper for the head deltas than for all parameters, so leaving it out under-estimates
the full-SFT time and makes the reported AER conservative (too high, not too low).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coreselect.data.formatting import Encoded, Formatter
from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.io import atomic_path, write_json
from coreselect.methods.p2d.localize import HeadSet
from coreselect.models.introspect import (
    HeadGeometry,
    head_index_map,
    projection,
    projection_weight,
)
from coreselect.models.runner import collate, frozen_parameters
from coreselect.train.loop import IGNORE, device_of, forward, masked_lm_loss
from coreselect.train.lora import TrainArgs, train_lora

__all__ = [
    "KV_POLICY",
    "HeadDelta",
    "HeadTrainResult",
    "HeadsModule",
    "HeadsOnly",
    "alignment_efficiency_ratio",
    "apply_head_delta",
    "estimate_aer",
    "head_slices",
    "train_heads",
    "train_heads_from_file",
    "train_heads_run",
]

KV_POLICY = "any"
FORMAT = "coreselect.heads_delta/1"


def alignment_efficiency_ratio(selection_s: float, training_s: float, full_sft_s: float) -> float:
    """``(selection_s + training_s) / full_sft_s``: below 1 means faster than full SFT on all data."""
    for name, v in (("selection_s", selection_s), ("training_s", training_s), ("full_sft_s", full_sft_s)):
        if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
    if full_sft_s <= 0:
        raise ConfigError("full_sft_s must be > 0")
    return (selection_s + training_s) / full_sft_s


# ------------------------------------------------------------------------------ slices
def head_slices(heads: Sequence[tuple[int, int]], geom: HeadGeometry) -> dict[int, dict[str, Tensor]]:
    """Per layer, the trained indices of each attention projection: output rows of the q/k/v (or fused
    QKV) projection, input columns of the output projection (:func:`~coreselect.models.introspect.head_index_map`)."""
    return head_index_map(heads, geom)


def _proj(model: Any, layer: int, name: str) -> torch.nn.Module:
    return projection(model, layer, name)


def _out_in(mod: torch.nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a ``Linear`` or GPT-2 ``Conv1D``."""
    out_f, in_f = projection_weight(mod).shape
    return int(out_f), int(in_f)


class HeadDelta(torch.nn.Module):
    """Trainable float32 deltas for the ``H_T`` slices of a model (module doc)."""

    def __init__(self, model: Any, heads: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.geom = HeadGeometry.of(model)
        self.slices = head_slices(heads, self.geom)
        self.weights = torch.nn.ParameterDict()
        self.biases = torch.nn.ParameterDict()
        self.index: dict[str, Tensor] = {}
        dev = next(model.parameters()).device
        for layer, sl in self.slices.items():
            for name, idx in sl.items():
                lin = _proj(model, layer, name)
                key = f"layers.{layer}.{name}"
                out_f, in_f = _out_in(lin)
                is_o = self.geom.is_output(name)
                shape = (len(idx), in_f) if not is_o else (out_f, len(idx))
                self.weights[_k(key)] = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=dev))
                if getattr(lin, "bias", None) is not None and not is_o:
                    self.biases[_k(key)] = torch.nn.Parameter(torch.zeros(len(idx), dtype=torch.float32, device=dev))
                self.index[key] = idx.to(dev)

    @contextlib.contextmanager
    def attached(self, model: Any) -> Iterator[None]:
        """Add the deltas to the projections' outputs while inside the block."""
        handles = []
        for key, idx in self.index.items():
            _, layer, name = key.split(".")
            w = self.weights[_k(key)]
            b = self.biases.get(_k(key), None)

            def hook(
                _m: Any,
                args: tuple,
                out: Tensor,
                w: Tensor = w,
                b: Tensor | None = b,
                idx: Tensor = idx,
                is_o: bool = self.geom.is_output(name),
            ) -> Tensor:
                x = args[0]
                if is_o:
                    return out + torch.nn.functional.linear(x.index_select(-1, idx), w.to(x.dtype))
                extra = torch.nn.functional.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
                return out.index_add(-1, idx, extra)

            handles.append(_proj(model, int(layer), name).register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def tensors(self) -> dict[str, Tensor]:
        """The artifact's tensors (see the module doc)."""
        out: dict[str, Tensor] = {}
        for key, idx in self.index.items():
            out[f"{key}.weight"] = self.weights[_k(key)].detach().float().cpu().contiguous()
            out[f"{key}.index"] = idx.cpu().clone()  # q/o and k/v share index tensors
            if _k(key) in self.biases:
                out[f"{key}.bias"] = self.biases[_k(key)].detach().float().cpu().contiguous()
        return out


def _k(key: str) -> str:
    return key.replace(".", "__")  # ParameterDict keys cannot contain dots


@torch.no_grad()
def _merge(model: Any, tensors: dict[str, Tensor]) -> None:
    """``W[slice] = W[slice] + delta`` in float32, cast back to the weight's dtype (``W`` seen as
    ``[out, in]``, a view of the parameter, so a Conv1D is written through its transpose)."""
    geom = HeadGeometry.of(model)
    for key in sorted(k[: -len(".index")] for k in tensors if k.endswith(".index")):
        _, layer, name = key.split(".")
        lin = _proj(model, int(layer), name)
        W = projection_weight(lin)
        idx = tensors[f"{key}.index"].to(W.device)
        delta = tensors[f"{key}.weight"].to(W.device, torch.float32)
        if geom.is_output(name):
            if delta.shape != (W.shape[0], len(idx)):
                raise CoreselectError(f"{key}: delta shape {tuple(delta.shape)} does not fit the model")
            W[:, idx] = (W[:, idx].float() + delta).to(W.dtype)
        else:
            if delta.shape != (len(idx), W.shape[1]):
                raise CoreselectError(f"{key}: delta shape {tuple(delta.shape)} does not fit the model")
            W[idx] = (W[idx].float() + delta).to(W.dtype)
            bias = getattr(lin, "bias", None)
            if f"{key}.bias" in tensors and isinstance(bias, Tensor):
                bias[idx] = (bias[idx].float() + tensors[f"{key}.bias"].to(bias.device)).to(bias.dtype)


def apply_head_delta(model: Any, path: str | Path) -> Any:
    """Add a saved ``heads_delta.safetensors`` onto ``model`` (in place) and return it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except FileNotFoundError:
        raise CoreselectError(f"{path}: no such head delta file") from None
    if meta.get("format") != FORMAT:
        raise CoreselectError(f"{path}: not a coreselect heads_delta file")
    geom = HeadGeometry.of(model)
    if (int(meta.get("n_layers", -1)), int(meta.get("n_heads", -1))) != (geom.n_layers, geom.n_heads):
        raise CoreselectError(
            f"{path}: made for {meta.get('n_layers')} layers x {meta.get('n_heads')} heads, "
            f"the model has {geom.n_layers} x {geom.n_heads}"
        )
    _merge(model, tensors)
    return model


# ------------------------------------------------------------------------------ training
class HeadsModule(torch.nn.Module):
    """What ``Trainer`` trains for P2D-double-dagger: the :class:`HeadDelta` hooked into a frozen base.

    Its only parameters (and ``state_dict``) are the deltas: the base model is kept out of the
    module tree (``Trainer`` would otherwise save, and DDP broadcast, all its weights). The hooks
    stay attached from construction to :meth:`detach`, so a forward pass recomputed under
    gradient checkpointing sees the deltas too.
    """

    #: ``Trainer`` passes ``num_items_in_batch`` through to the base model's loss (token mean per step)
    accepts_loss_kwargs = True
    base: Any

    def __init__(self, base: Any, delta: HeadDelta) -> None:
        super().__init__()
        self.delta = delta
        object.__setattr__(self, "base", base)  # not a submodule (class doc)
        self._attached = contextlib.ExitStack()
        self._attached.enter_context(delta.attached(base))

    def forward(self, **kwargs: Any) -> Any:
        return self.base(**kwargs)

    def train(self, mode: bool = True) -> HeadsModule:
        super().train(mode)
        self.base.train(mode)  # dropout in the base follows Trainer's train/eval switches
        return self

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """Gradient checkpointing in the base (``TrainArgs.gradient_checkpointing``; Trainer calls this)."""
        self.base.activation_checkpointing_enable(**kwargs)

    def enable_input_require_grads(self) -> None:
        self.base.enable_input_require_grads()

    def detach(self) -> None:
        """Remove the delta hooks from the base model."""
        self._attached.close()


@dataclass
class HeadsOnly:
    """The :class:`coreselect.train.lora.Trainable` of P2D-double-dagger: the ``H_T`` deltas.

    Attributes:
        heads: sorted ``(layer, head)`` pairs.
        module: the :class:`HeadsModule` once :meth:`wrap` ran.
    """

    heads: list[tuple[int, int]]
    module: HeadsModule | None = None

    @property
    def targets(self) -> list[str]:
        """``head.{layer}.{head}`` per head plus the KV policy (train_state.json, resume fingerprint)."""
        return [f"head.{layer}.{h}" for layer, h in self.heads] + [f"kv_policy.{KV_POLICY}"]

    def wrap(self, model: Any) -> HeadsModule:
        self.module = HeadsModule(model, HeadDelta(model, self.heads))
        return self.module


@dataclass
class HeadTrainResult:
    """What :func:`train_heads` produced.

    Attributes:
        delta_path: ``OUT/heads_delta.safetensors``.
        heads_path: ``OUT/heads.json``.
        losses: token-mean training loss of every optimizer step.
        steps, wall_s, tokens, skipped, checkpoints, plot: as in :class:`coreselect.train.lora.TrainResult`.
        n_trainable: trained scalars (delta elements).
    """

    delta_path: Path
    heads_path: Path
    losses: list[float]
    steps: int
    wall_s: float
    tokens: int
    skipped: int
    n_trainable: int
    checkpoints: list[Any] = field(default_factory=list)
    plot: Path | None = None


def train_heads(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    heads: HeadSet | Sequence[tuple[int, int]],
    args: TrainArgs,
    out_dir: str | Path,
    *,
    progress: bool = True,
    resume: bool = False,
    formatter: Formatter | None = None,
) -> HeadTrainResult:
    """Fine-tune only the ``H_T`` slices of ``model`` on ``records`` (module doc), on ``Trainer``.

    Uses ``args``' recipe, checkpoint and precision fields (the LoRA fields are ignored).
    On return the deltas are merged into ``model`` (left in eval mode) and saved in
    ``out_dir``; under ``torchrun`` / ``accelerate launch`` every process merges and only the
    main one writes.

    Args:
        resume: continue from the newest complete checkpoint in ``out_dir`` (same records,
            args and heads), as :func:`coreselect.train.lora.train_lora`.
    """
    t0 = time.perf_counter()
    geom = HeadGeometry.of(model)
    hs = (
        heads
        if isinstance(heads, HeadSet)
        else HeadSet("", "given", 0.0, sorted(heads), n_layers=geom.n_layers, n_heads=geom.n_heads)
    )
    hs.check(geom)
    out = Path(out_dir)
    spec = HeadsOnly(sorted(hs.heads))
    try:
        with frozen_parameters(model):  # the base gets no .grad: only the deltas are leaves that train
            res = train_lora(
                model,
                tokenizer,
                records,
                args,
                out,
                progress=progress,
                resume=resume,
                formatter=formatter,
                trainable=spec,
            )
    finally:
        if spec.module is not None:
            spec.module.detach()
    assert spec.module is not None
    delta = spec.module.delta
    model.eval()
    tensors = delta.tensors()
    _merge(model, tensors)
    delta_path, heads_path = out / "heads_delta.safetensors", out / "heads.json"
    n_trainable = sum(p.numel() for p in delta.parameters())
    if int(os.environ.get("RANK", "0")) == 0:  # the main process writes (as train_lora does)
        from safetensors.torch import save_file

        meta = {
            "format": FORMAT,
            "kv_policy": KV_POLICY,
            "n_layers": str(geom.n_layers),
            "n_heads": str(geom.n_heads),
            "n_kv_heads": str(geom.n_kv_heads),
            "head_dim": str(geom.head_dim),
            "qkv_layout": geom.spec.layout,
        }
        with atomic_path(delta_path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        hs.save(heads_path)
        state_file = out / "train_state.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        state.update(
            {
                "mode": "heads",
                "heads": [list(h) for h in hs.heads],
                "kv_policy": KV_POLICY,
                "n_trainable": n_trainable,
                "n_model_params": sum(p.numel() for p in model.parameters()),
                "wall_s": time.perf_counter() - t0,
            }
        )
        write_json(state_file, state)
    return HeadTrainResult(
        delta_path,
        heads_path,
        res.losses,
        res.steps,
        time.perf_counter() - t0,
        res.tokens,
        res.skipped,
        n_trainable,
        list(res.checkpoints),
        res.plot,
    )


def train_heads_from_file(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    heads_json: str | Path,
    args: TrainArgs,
    out_dir: str | Path,
    *,
    progress: bool = True,
    resume: bool = False,
    formatter: Formatter | None = None,
) -> HeadTrainResult:
    """The hook for ``coreselect train --heads heads.json``: load ``H_T`` and call :func:`train_heads`."""
    return train_heads(
        model,
        tokenizer,
        records,
        HeadSet.load(heads_json),
        args,
        out_dir,
        progress=progress,
        resume=resume,
        formatter=formatter,
    )


# ------------------------------------------------------------------------------ AER estimate
def seconds_per_token(
    model: Any,
    pad_id: int,
    encoded: Sequence[Encoded],
    heads: Sequence[tuple[int, int]] | None,
    *,
    batch_size: int = 2,
    batches: int = 2,
) -> float:
    """Forward+backward seconds per real token: all parameters (``heads=None``) or the ``H_T`` deltas only.

    One untimed warm-up micro-batch, then ``batches`` timed ones (cycling over ``encoded``).
    The model's weights and ``.grad`` are left as they were.
    """
    enc = [e for e in encoded if len(e) > 1]
    if not enc:
        raise CoreselectError("no example to time training steps on")
    device = device_of(model)
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    delta = HeadDelta(model, heads) if heads is not None else None
    for p, _, _ in flags:
        p.requires_grad_(heads is None)
    was_training = model.training
    model.eval()
    elapsed, n_tok = 0.0, 0
    try:
        ctx = delta.attached(model) if delta is not None else contextlib.nullcontext()
        with ctx, torch.enable_grad():
            for i in range(batches + 1):
                pos = [(i * batch_size + j) % len(enc) for j in range(batch_size)]
                batch = collate(enc, pos, pad_id, "right", device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                logits = forward(model, batch)
                ids = batch.input_ids
                labels = torch.where(batch.attention_mask.bool(), ids, torch.full_like(ids, IGNORE))
                loss, cnt = masked_lm_loss(logits, labels)
                (loss / max(cnt, 1)).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i > 0:
                    elapsed += time.perf_counter() - t
                    n_tok += batch.n_real_tokens
                for p in model.parameters():
                    p.grad = None
    finally:
        for p, f, g in flags:
            p.requires_grad_(f)
            p.grad = g
        model.train(was_training)
    return elapsed / max(n_tok, 1)


def estimate_aer(
    model: Any,
    pad_id: int,
    sample: Sequence[Encoded],
    heads: Sequence[tuple[int, int]],
    *,
    selection_s: float,
    tokens_selected: int,
    tokens_pool: int,
    epochs: float = 4.0,
    batches: int = 2,
) -> dict[str, Any]:
    """Estimated AER of "P2D-dagger selection + P2D-double-dagger training" vs full SFT (module doc)."""
    full = seconds_per_token(model, pad_id, sample, None, batches=batches)
    sparse = seconds_per_token(model, pad_id, sample, heads, batches=batches)
    training_s = sparse * tokens_selected * epochs
    full_sft_s = full * tokens_pool * epochs
    aer = alignment_efficiency_ratio(selection_s, training_s, full_sft_s) if full_sft_s > 0 else None
    return {
        "aer": aer,
        "selection_s": selection_s,
        "training_s": training_s,
        "full_sft_s": full_sft_s,
        "estimated": True,
        "how": "training terms = measured fwd+bwd seconds per token on the target examples x tokens x epochs; "
        "optimizer step not timed (AER conservative)",
        "s_per_token_heads": sparse,
        "s_per_token_full": full,
        "tokens_selected": tokens_selected,
        "tokens_pool": tokens_pool,
        "epochs": epochs,
        "speedup": float(1.0 / aer) if aer else None,
    }


def train_heads_run(
    heads_json: str | Path,
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    args: TrainArgs,
    out_dir: str | Path,
    *,
    formatter: Formatter | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """``coreselect train --heads``: :func:`train_heads_from_file` plus the run.json fields of a LoRA run.

    The caller (``coreselect.train.command.train``) adds settings, versions, model and timings.
    """
    res = train_heads_from_file(
        model, tokenizer, records, heads_json, args, out_dir, progress=progress, resume=resume, formatter=formatter
    )
    return {
        "mode": "heads",
        "heads": str(res.heads_path),
        "delta": str(res.delta_path.resolve()),
        "counts": {"records": len(records), "trained": len(records) - res.skipped, "skipped": res.skipped},
        "steps": res.steps,
        "first_loss": res.losses[0] if res.losses else None,
        "final_loss": res.losses[-1] if res.losses else None,
        "tokens": res.tokens,
        "n_trainable": res.n_trainable,
        "train_s": res.wall_s,
        "checkpoints": [c.path.name for c in res.checkpoints],
        "loss_plot": str(res.plot) if res.plot else None,
        "apply": "coreselect.methods.p2d.train.apply_head_delta(base_model, DELTA)",
    }
