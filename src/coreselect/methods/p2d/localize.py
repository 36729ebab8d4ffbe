"""P2D stage i (paper 003, Fig. 2; heat maps as Fig. 3): fast head localization of the task-sensitive heads ``H_T``.

The paper names the stage but gives few formulas, so the choices below are ours (each is
tested in ``tests/methods/test_p2d.py``).

1. **Fast head localization** (:func:`localize_heads`) scores every ``(layer, head)`` on
   the few target examples and keeps the top ``head_fraction`` (at least 1) as ``H_T``.

   * ``gradient`` (default), head importance after Michel et al. (2019): each head's
     output (the ``o_proj`` input, ``[B, T, H, d]``) is multiplied by a gate ``xi = 1``
     through a forward pre-hook on ``o_proj``. (``o_proj`` stands for the family's output
     projection, :func:`o_proj_of`: ``dense`` on GPT-NeoX and Phi, ``c_proj`` on GPT-2; its
     input is head-major, ``head_dim`` contiguous, in every family of
     :data:`coreselect.models.introspect.ATTENTION_SPECS`, fused QKV or not.) The gates
     are per example (``[B, H]`` per layer), so one backward pass gives every example's
     own gradient, and
     ``I_h = sum_examples |dL_x / d xi_h|`` where ``L_x`` is the token-mean response loss
     of example ``x`` (response tokens only, as in training; the token mean keeps long
     examples from dominating). Scores are not normalized per layer: ``H_T`` is a global
     top-k across layers, as in the paper's heat maps.
   * ``attention`` (no backward): the mean attention mass that response-token queries
     put on *prompt* tokens, per head, summed over examples. Chosen over TRIM's row
     sharpness because it is conditional on the task (how much a head reads the question
     while the answer is produced), while sharpness ranks attention-sink and
     previous-token heads high for any input. Template tokens (BOS, role headers, the
     usual attention sinks) are neither prompt nor response, so they never count. Needs

``heads="random"`` (:func:`random_heads`, seeded by P2D's ``head_seed``) draws the same number of
heads uniformly over all ``(layer, head)`` pairs (the localized set's per-layer counts are not
kept): the falsification control (task heads vs random heads), see
:mod:`coreselect.methods.p2d.select`. ``coreselect heads``
(:func:`heads_command`) runs this stage alone and writes ``heads.json`` + ``heads.png``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coreselect.data.formatting import PROMPT, RESPONSE, Encoded, Formatter, TemplateChoice
from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.models.introspect import HeadGeometry, projection
from coreselect.models.runner import (
    Batch,
    ModelRunner,
    frozen_parameters,
    response_losses,
    token_budget_batches,
)
from coreselect.train.loop import forward

__all__ = [
    "PROXIES",
    "Head",
    "HeadSet",
    "HeadsArgs",
    "attention_importance",
    "gradient_importance",
    "head_gates",
    "heads_command",
    "localize_heads",
    "n_top",
    "o_proj_of",
    "per_example_loss",
    "plot_heatmap",
    "random_heads",
    "split_heads",
    "top_heads",
]

PROXIES = ("gradient", "attention")
Head = tuple[int, int]


# ------------------------------------------------------------------------------ geometry
# HeadGeometry and decoder_layers live in coreselect.models.introspect (re-exported here).
def o_proj_of(model: Any, layer: int) -> torch.nn.Module:
    """Layer ``layer``'s output projection (``o_proj`` / ``dense`` / ``c_proj``, per family): its
    input is the concatenation of the per-head context vectors ``[B, T, H * head_dim]``."""
    return projection(model, layer, HeadGeometry.of(model).spec.output)


# ------------------------------------------------------------------------------ head sets
def n_top(fraction: float, total: int) -> int:
    """``round(fraction * total)``, at least 1 and at most ``total``."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"head_fraction must be in (0, 1], got {fraction}")
    return min(total, max(1, round(fraction * total)))


def top_heads(scores: np.ndarray, fraction: float) -> list[Head]:
    """The top ``fraction`` of ``scores [L, H]`` as sorted ``(layer, head)`` pairs.

    Ties are broken toward the lower ``(layer, head)`` (stable sort on the flat index).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or not np.isfinite(s).all():
        raise CoreselectError("head scores must be a finite [layers, heads] matrix")
    k = n_top(fraction, s.size)
    flat = np.argsort(-s.ravel(), kind="stable")[:k]
    return sorted((int(i) // s.shape[1], int(i) % s.shape[1]) for i in flat)


def random_heads(n_layers: int, n_heads: int, k: int, seed: int = 0) -> list[Head]:
    """``k`` distinct heads drawn uniformly with ``numpy.random.default_rng(seed)``, sorted."""
    flat = np.random.default_rng(seed).choice(n_layers * n_heads, size=k, replace=False)
    return sorted((int(i) // n_heads, int(i) % n_heads) for i in flat)


@dataclass
class HeadSet:
    """``H_T`` and the scores it came from; ``heads.json`` on disk.

    Attributes:
        model: the model it was located on.
        proxy: ``gradient``, ``attention``, ``random`` or ``given``.
        fraction: the ``head_fraction`` asked for.
        heads: sorted ``[layer, head]`` pairs.
        scores: ``[layers][heads]`` proxy scores (empty for random heads).
        n_layers, n_heads: the model's attention shape (checked when reused).
    """

    model: str
    proxy: str
    fraction: float
    heads: list[Head]
    scores: list[list[float]] = field(default_factory=list)
    n_layers: int = 0
    n_heads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, head in self.heads:
            out.setdefault(layer, []).append(head)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def check(self, geom: HeadGeometry) -> None:
        """Fail clearly when the heads do not fit the model."""
        if self.n_layers and (self.n_layers, self.n_heads) != (geom.n_layers, geom.n_heads):
            raise CoreselectError(
                f"heads were located on a model with {self.n_layers} layers x {self.n_heads} heads; "
                f"this one has {geom.n_layers} x {geom.n_heads}"
            )
        if not self.heads:
            raise CoreselectError("the head set is empty")
        for layer, head in self.heads:
            if not (0 <= layer < geom.n_layers and 0 <= head < geom.n_heads):
                raise CoreselectError(f"head ({layer}, {head}) is outside the model ({geom.n_layers} x {geom.n_heads})")

    def save(self, path: str | Path) -> None:
        from coreselect.io import write_json

        d = asdict(self)
        d["heads"] = [list(h) for h in self.heads]
        write_json(path, d)

    @classmethod
    def load(cls, path: str | Path) -> HeadSet:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            hs = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
            hs.heads = sorted((int(a), int(b)) for a, b in hs.heads)
        except FileNotFoundError:
            raise CoreselectError(f"{path}: no such heads file") from None
        except (ValueError, TypeError) as e:
            raise CoreselectError(f"{path}: not a heads.json file ({e})") from None
        return hs


def plot_heatmap(hs: HeadSet, path: str | Path) -> Path:
    """Layer x head heat map of the proxy scores (paper Fig. 3), ``H_T`` outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    s = np.asarray(hs.scores, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise CoreselectError("no head scores to plot")
    s = s / s.max() if s.max() > 0 else s
    n_l, n_h = s.shape
    fig, ax = plt.subplots(figsize=(min(12, max(4.5, 2 + 0.3 * n_h)), min(10, 1.5 + 0.3 * n_l)))
    im = ax.imshow(s, cmap="viridis", aspect="auto", origin="lower")
    for layer, head in hs.heads:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{hs.proxy} head sensitivity\n(top {len(hs.heads)} of {s.size} outlined)", fontsize=10)
    fig.colorbar(im, ax=ax, label="score / max")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------ hooks
def split_heads(x: Tensor, geom: HeadGeometry) -> Tensor:
    """``[B, T, H * d]`` output-projection input -> ``[B, T, H, d]`` (``d = geom.head_dim``, which is
    ``config.head_dim`` on Gemma / Qwen3, not ``hidden / H``)."""
    b, t, _ = x.shape
    return x.view(b, t, geom.n_heads, geom.head_dim)


@contextlib.contextmanager
def head_gates(model: Any, gates: Tensor) -> Iterator[None]:
    """Multiply head ``h`` of example ``b`` in layer ``l`` by ``gates[l, b, h]`` (before ``o_proj``)."""
    geom = HeadGeometry.of(model)

    def make(layer: int) -> Any:
        def pre(_mod: Any, args: tuple) -> tuple:
            x = args[0]
            g = gates[layer].to(x.dtype)[:, None, :, None]
            return ((split_heads(x, geom) * g).reshape(x.shape), *args[1:])

        return pre

    handles = [o_proj_of(model, i).register_forward_pre_hook(make(i)) for i in range(geom.n_layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------ localization
def per_example_loss(logits: Tensor, batch: Batch) -> Tensor:
    """``[B]`` token-mean response loss (targets = ``loss_mask``, token ``t`` from ``t - 1``); 0 where none."""
    total, count = response_losses(logits, batch)
    return total / count.clamp(min=1).to(total.dtype)


def gradient_importance(runner: ModelRunner, encoded: Sequence[Encoded], batch_tokens: int = 8192) -> np.ndarray:
    """``[L, H]`` ``sum_x |dL_x / d xi_{l,h}|`` at ``xi = 1`` (Michel et al., 2019; module doc)."""
    model = runner.model
    geom = HeadGeometry.of(model)
    total = np.zeros((geom.n_layers, geom.n_heads), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model), torch.enable_grad():
            for positions in token_budget_batches([len(e) for e in encoded], batch_tokens):
                batch = runner.collate(encoded, positions)
                gates = torch.ones(
                    geom.n_layers,
                    len(positions),
                    geom.n_heads,
                    dtype=torch.float64,
                    device=runner.device,
                    requires_grad=True,
                )
                with head_gates(model, gates):
                    logits = forward(model, batch)
                loss = per_example_loss(logits, batch)
                (grad,) = torch.autograd.grad(loss.sum(), gates)
                total += grad.abs().sum(1).cpu().numpy()
                runner.forward_passes += len(positions)
                runner.tokens_seen += batch.n_real_tokens
    finally:
        model.train(was_training)
    return total


def attention_importance(runner: ModelRunner, encoded: Sequence[Encoded], batch_tokens: int = 8192) -> np.ndarray:
    """``[L, H]`` sum over examples of the mean attention mass response queries put on prompt keys."""
    if not any((e.codes == PROMPT).any() for e in encoded):
        raise CoreselectError("the attention proxy needs targets with a prompt (user turn); use --proxy gradient")
    geom = HeadGeometry.of(runner.model)
    total = np.zeros((geom.n_layers, geom.n_heads), dtype=np.float64)
    for positions in token_budget_batches([len(e) for e in encoded], batch_tokens):
        batch = runner.collate(encoded, positions)
        attns = runner.attentions(batch, runner.num_layers)  # probabilities only: no second (SDPA) pass
        real = batch.attention_mask.bool()
        resp = (batch.codes == RESPONSE) & real  # [B, T] queries
        prompt = ((batch.codes == PROMPT) & real).float()  # [B, T] keys
        n_resp = resp.sum(-1).clamp(min=1).double()  # [B]
        for layer, a in enumerate(attns):
            mass = (a.double() * prompt[:, None, None, :]).sum(-1)  # [B, H, T]
            mass = torch.where(resp[:, None, :], mass, torch.zeros_like(mass)).sum(-1) / n_resp[:, None]
            total[layer] += mass.sum(0).cpu().numpy()
    return total


def localize_heads(
    runner: ModelRunner,
    formatter: Formatter,
    target: Sequence[Record],
    *,
    proxy: str = "gradient",
    fraction: float = 0.1,
    batch_tokens: int = 8192,
    model_name: str = "",
) -> HeadSet:
    """Stage 1: score every head on the target and keep the top ``fraction`` as ``H_T``."""
    if proxy not in PROXIES:
        raise ConfigError(f"proxy must be one of {', '.join(PROXIES)}, got {proxy!r}")
    if not target:
        raise CoreselectError("the target set is empty")
    encoded = [formatter.encode(r) for r in target]
    if proxy == "gradient":
        if not any(e.loss_mask[1:].any() for e in encoded):
            raise CoreselectError("no target example has a response token to compute the loss on")
        scores = gradient_importance(runner, encoded, batch_tokens)
    else:
        scores = attention_importance(runner, encoded, batch_tokens)
    geom = HeadGeometry.of(runner.model)
    return HeadSet(
        model=model_name,
        proxy=proxy,
        fraction=fraction,
        heads=top_heads(scores, fraction),
        scores=scores.tolist(),
        n_layers=geom.n_layers,
        n_heads=geom.n_heads,
        extra={"n_target": len(target)},
    )


# ------------------------------------------------------------------------------ `coreselect heads`
@dataclass
class HeadsArgs:
    """Arguments of ``coreselect heads`` (YAML config keys are the same names).

    Attributes:
        model: causal LM: folder, ``.gguf`` file, hub id, or ``smollm2``.
        target: the few target examples.
        out: output folder (``heads.json``, ``heads.png``).
        proxy: ``gradient`` (|dL/d gate| per head) or ``attention`` (response-to-prompt attention mass).
        head_fraction: share of all heads kept (paper: 10%, at least 1 head).
        max_length: truncate records longer than this many tokens.
        batch_tokens: padded-token budget per forward batch.
        template: ``auto`` / ``chat`` / ``plain`` prompt formatting.
        template_date: the date chat templates see (fixed, see ``coreselect select --help``).
        dtype, device: ``auto`` = fp32 on CPU, bf16 on GPU.
        trust_remote_code: allow model code from the hub.
    """

    model: str = "smollm2"
    target: list[str] = field(default_factory=list)
    out: str = ""
    proxy: str = "gradient"
    head_fraction: float = 0.1
    max_length: int = 2048
    batch_tokens: int = 8192
    template: TemplateChoice = "auto"
    template_date: str = "26 Jul 2024"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target, str):
            self.target = [self.target]


def heads_command(args: HeadsArgs) -> HeadSet:
    """``coreselect heads``: locate ``H_T`` and write ``heads.json`` and ``heads.png``."""
    from coreselect.data.readers import read_records
    from coreselect.models.loading import load_model

    if not args.target:
        raise ConfigError("no target given (--target FILE)")
    if not args.out:
        raise ConfigError("no output folder given (--out DIR)")
    if args.proxy not in PROXIES:
        raise ConfigError(f"proxy must be one of {', '.join(PROXIES)}, got {args.proxy!r}")
    n_top(args.head_fraction, 1)
    target = list(read_records(args.target, on_bad_record="error"))
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    runner = ModelRunner(model, tok)
    fmt = Formatter(tok, args.max_length, args.template, template_date=args.template_date)
    t1 = time.perf_counter()
    hs = localize_heads(
        runner,
        fmt,
        target,
        proxy=args.proxy,
        fraction=args.head_fraction,
        batch_tokens=args.batch_tokens,
        model_name=args.model,
    )
    hs.extra.update({"localize_s": time.perf_counter() - t1, "model_load_s": t1 - t0})
    out = Path(args.out)
    hs.save(out / "heads.json")
    plot_heatmap(hs, out / "heads.png")
    return hs
