"""P2D stage ii (paper 003, Fig. 2): parameter-guided data selection, P2D-dagger.

**Parameter-guided selection** (:class:`P2DMethod`, the registered ``p2d`` method): a pool record is seen
   only through ``H_T``: the per-head context vectors at the ``o_proj`` input of the
   selected heads, concatenated (``|H_T| * d`` features per token). The forward pass
   stops right after the deepest selected layer (unless ``ppl=all``, below). Two features
   for the default ``centroid`` score (``score=activation``: below):

   * ``pooled`` (default): features mean-pooled over the scoped tokens, cosine to the
     mean of the (unit) pooled target vectors.
   * ``fingerprint``: TRIM's token fingerprints (:class:`FingerprintBuilder`,
     :func:`token_scores`, :func:`pool_scores`) built on those head features instead of
     the final hidden state, the saliency ``alpha`` being TRIM's eq. 1-7 on the selected
     heads' attention maps only.

   Both follow TRIM's conventions (``trim_math`` module doc, issue 11), with TRIM's defaults
   (:class:`P2DConfig`): tokens are pooled / fingerprinted / scored only with ``min_context``
   content tokens before them; the fingerprint feature counts eq. 2 / eq. 4's admissible keys
   with each selected layer's sliding window, runs eq. 6's min-max over the fingerprinted
   positions (``saliency_minmax``), reads eq. 15's ``kappa`` as ``coverage`` says, and takes
   the fitted features from the same kernel as the scored ones (only the probabilities come
   from an eager pass, :func:`head_attentions`).

   The default is ``pooled``. Quick check on the mixed math/other fixture (4 + 4 records,
   2 math targets, 10% of heads, gradient proxy): with SmolLM2-135M-Instruct, ``pooled``
   ranks every math record above every other one under both ``scope=all`` (margin 0.19
   in cosine) and ``scope=response`` (0.31), while ``fingerprint`` does so only under
   ``scope=response`` (with ``all``, "How do I bake bread?" outranks a math record). On
   the tiny random-init test model both put 3 math records in the top 4. ``pooled`` is
   also cheaper: no attention maps, no eager attention, one vector per record. Its
   weakness is the one TRIM addresses (a whole-record average can hide a few matching
   tokens), so ``fingerprint`` stays available (``--feature fingerprint``). (That check predates
   the conventions above, i.e. ``min_context=0`` and the ``tokens`` coverage reading.)

   ``heads="random"`` (the falsification control the reviewers asked for) draws as many heads
   as ``localized`` keeps (``round(head_fraction * L * H)``), uniformly at random over all
   ``(layer, head)`` pairs with ``head_seed``: the localized set's per-layer distribution is
   deliberately *not* kept (a per-layer-matched draw would carry part of the localization's
   information into the control). ``heads.json`` says ``proxy: random`` and
   ``extra.head_seed``; a localized set says ``extra.heads: localized``. With several targets
   every target gets the same draw. ``head_seed`` is its own option, not the run's ``seed``.

**Scores** (``score``). ``centroid`` (default) is everything above: the code's own reading
(cosine of pooled head outputs to a target centre, or fingerprints). ``activation`` is the
paper's reading (Fig. 2: "H_T used as a sparse mask during inference to compute
attention-based scores"; Sec. 3: "measuring how strongly the identified heads activate on
each input", with a task selection prompt in front, Figs. 5-7). Exactly::

    z_{l,h,t}(x)  = head h of layer l's output at token t (the o_proj input slice, d values),
                    in a forward pass over  p + x  (task prompt p in front of record x)
    a_{l,h}(x)    = (1 / |S_x|) * sum_{t in S_x} || z_{l,h,t}(x) ||_2
    mu_{l,h}      = (1 / |T|)   * sum_{y in T}   a_{l,h}(y)        (the target examples, same prompt)
    s(x)          = (1 / |H_T|) * sum_{(l,h) in H_T} a_{l,h}(x) / mu_{l,h}

``S_x`` are the record's scored positions (``scope`` and ``min_context``, as for ``pooled``;
the prompt's own tokens never count: they are coded as template tokens, see
:func:`encode_with_prompt`); a record with none scores ``-inf``. Dividing by the target mean
(rather than a pool mean) keeps the score per record (streaming, any engine) and makes every
head count alike: ``s = 1`` is "as active as on the task's own examples". The prompt ``p`` is
``task_prompt``, or by default the target examples' shared instruction prefix
(:func:`shared_prefix`: longest common prefix of their first user message, cut at the end of
its last whole sentence or line, at least 8 characters), or nothing; it goes in front of the
first user message (``p + "\n\n" + content``; a text record: in front of its text; a message
that already starts with ``p`` keeps it once). The prompt takes room under ``max_length``
(``stats.truncated_with_prompt``); ``n_tokens`` and ``truncated`` stay the plain record's.
(A task instruction that the targets carry in a *system* message is not looked for: give it
as ``task_prompt``.) The prompt changes every activation, so several targets
with different prompts cost one pool pass per distinct prompt (targets sharing a prompt, e.g.
a given ``task_prompt``, share one pass).

**Perplexity skew** (paper Fig. 4, ``ppl``): the base model's mean NLL over each record's
response (loss-mask) tokens; the LM head runs on those positions only (slices of
:data:`NLL_CHUNK` rows, never the ``[B, T, V]`` logits). Scores never change with ``ppl``
(the scoring batches and the captured head outputs are the same).

* ``sample`` (default): a seeded ``ppl_fraction`` share of the pool (:func:`in_ppl_sample`:
  a hash of seed and pool index, so independent of the scores, the chunking and the engine)
  goes through the model once more on its own (:func:`record_nll`), and once the selection is
  written, every selected record is read back from ``coreset.jsonl`` and passed through it
  too (:meth:`P2DMethod.ppl_info`). Cost: about ``ppl_fraction + budget share`` of one
  full-depth pool pass, whatever the heads.
* ``all``: every scored record, from the scoring pass itself. That pass then runs to the last
  layer instead of stopping after the deepest selected head, and the LM head runs on the
  response tokens. Measured on CPU with a SmolLM2-135M-shaped model (30 layers, vocab
  49152): +14% scoring time when the deepest selected head is in the last layer, +60-80%
  when it is in layer 20 of 30. With ``score=activation`` and a prompt, the NLL is conditional
  on the prompt (``conditioned_on_task_prompt``); ``sample`` always measures the plain record.
* ``off``: nothing (the scoring pass keeps its early stop).

run.json's ``ppl`` compares the selected records with the pool: ``n``, mean NLL, ``ppl`` (exp
of the mean NLL), mean and median per-record perplexity, ``delta_mean_nll`` and ``skews_low``
(selected mean NLL below the pool's). A Ray or sharded run scores in other processes, so its
``pool`` side is empty (``coverage`` says how much of the pool has an NLL).

**Several targets** (native, ``multi_target``): ``H_T`` is located and the target side
fitted once per target; each pool batch goes through the model once, capturing the union of
all targets' heads, and each target is scored on its own heads' columns (the same values
:func:`head_features` gives for its heads alone). ``activation`` needs one pass per distinct
prompt (above). Files go to ``OUT/target-<name>/`` (the ``PerTarget`` layout); ``ppl=all``
takes the NLL from the first pass (the plain one if any target has no prompt).

The method contributes three experiment rows (:meth:`P2DMethod.experiment_rows`): P2D,
P2D-dagger and P2D-double-dagger, whose heads-only training is :mod:`coreselect.methods.p2d.train`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from coreselect.data.formatting import TEMPLATE, Encoded, Formatter
from coreselect.data.records import Message, Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.methods.base import (
    ExperimentRow,
    MethodContext,
    ReportFigure,
    ScoreChunk,
    SelectionMethod,
    TargetSets,
    chunk_from_scores,
    record_chunks,
    scores_from_chunks,
)
from coreselect.methods.p2d.localize import (
    PROXIES,
    Head,
    HeadSet,
    localize_heads,
    n_top,
    o_proj_of,
    plot_heatmap,
    random_heads,
    split_heads,
)
from coreselect.methods.registry import register
from coreselect.methods.trim import TokenScoring
from coreselect.methods.trim_math import (
    FingerprintBuilder,
    Fingerprints,
    NearestClassTable,
    context_mask,
    token_saliency,
    token_scores,
)
from coreselect.models.introspect import (
    HeadGeometry,
    attention_module,
    eager_attention,
    projection_weight,
)
from coreselect.models.runner import (
    Batch,
    ModelRunner,
    attention_probs,
    attention_windows,
    token_budget_batches,
)

__all__ = [
    "FEATURES",
    "PPL_MODES",
    "SCORES",
    "P2DConfig",
    "P2DMethod",
    "TargetSide",
    "activation_scores",
    "encode_with_prompt",
    "head_activations",
    "head_attentions",
    "head_features",
    "head_features_nll",
    "in_ppl_sample",
    "ppl_summary",
    "record_nll",
    "response_nll",
    "shared_prefix",
    "with_prompt",
]

FEATURES = ("pooled", "fingerprint")
SCORES = ("centroid", "activation")
PPL_MODES = ("all", "sample", "off")
#: ``heads`` values besides a heads.json path (``auto``: the old name of ``localized``)
HEAD_CHOICES = ("localized", "auto", "random")
#: a shared prefix shorter than this is no task prompt (:func:`shared_prefix`)
MIN_PROMPT_CHARS = 8
#: response positions per LM-head product in :func:`response_nll`
NLL_CHUNK = 2048


class _Stop(Exception):
    """Raised by a capture hook once the deepest selected layer is done."""


@contextlib.contextmanager
def _capture(model: Any, by_layer: dict[int, list[int]], store: dict[int, Tensor], stop: bool) -> Iterator[None]:
    geom = HeadGeometry.of(model)
    last = max(by_layer)

    def make(layer: int, idx: Tensor) -> Any:
        def pre(_mod: Any, args: tuple) -> None:
            x = args[0]
            store[layer] = split_heads(x, geom).index_select(2, idx.to(x.device)).flatten(2)
            if stop and layer == last:
                raise _Stop

        return pre

    handles = []
    for layer, heads in by_layer.items():
        o_proj = o_proj_of(model, layer)
        idx = torch.tensor(heads, device=projection_weight(o_proj).device)  # made once, not copied per batch
        handles.append(o_proj.register_forward_pre_hook(make(layer, idx)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward_base(runner: ModelRunner, batch: Batch) -> None:
    runner.base(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    )


@torch.inference_mode()
def head_features(runner: ModelRunner, batch: Batch, by_layer: dict[int, list[int]]) -> Tensor:
    """``[B, T, |H_T| * d]`` float32: the selected heads' outputs, layer-major, head order within a layer.

    The forward pass stops after the deepest selected layer's ``o_proj`` input.
    """
    store: dict[int, Tensor] = {}
    with _capture(runner.model, by_layer, store, stop=True), contextlib.suppress(_Stop):
        _forward_base(runner, batch)
    runner.forward_passes += batch.input_ids.shape[0]
    runner.tokens_seen += batch.n_real_tokens
    return torch.cat([store[layer].float() for layer in sorted(by_layer)], dim=-1)


@torch.inference_mode()
def head_attentions(runner: ModelRunner, batch: Batch, by_layer: dict[int, list[int]]) -> list[Tensor]:
    """The selected heads' attention probabilities, one ``[B, h_l, T, T]`` per selected layer (sorted).

    One eager pass (the SDPA / flash kernels return no probabilities), stopped after the
    deepest selected layer's attention. Only the probabilities come from it: the features
    fingerprinted next to them come from :func:`head_features`, the kernel that scores the
    pool (TRIM's convention, ``trim_math`` module doc).
    """
    attns: dict[int, Tensor] = {}
    last = max(by_layer)

    def make(layer: int) -> Any:
        def post(_mod: Any, _args: Any, out: Any) -> None:
            attns[layer] = attention_probs(out)[:, by_layer[layer]]
            if layer == last:
                raise _Stop

        return post

    handles = [attention_module(runner.layers[layer]).register_forward_hook(make(layer)) for layer in by_layer]
    try:
        with eager_attention(runner.model):
            _forward_base(runner, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    runner.forward_passes += batch.input_ids.shape[0]
    runner.tokens_seen += batch.n_real_tokens
    return [attns[layer] for layer in sorted(by_layer)]


# ------------------------------------------------------------------------------ task prompt (score=activation)
def shared_prefix(records: Sequence[Record], min_chars: int = MIN_PROMPT_CHARS) -> str:
    """The target examples' shared instruction prefix (``score=activation``'s default task prompt).

    The longest common prefix of their first user message (a ``text`` record: its text), cut
    back to the end of its last whole sentence or line (a ``.``, ``:``, ``?``, ``!`` or line
    break followed by whitespace in every example) and stripped; ``""`` with fewer than two
    examples or when that is shorter than ``min_chars`` characters. So ``"Answer with a
    number. What is 2+2?"`` / ``"Answer with a number. What is 3+5?"`` give ``"Answer with a
    number."``, and ``"How many apples ..."`` / ``"How many pears ..."`` give nothing.
    """
    texts = [_prompt_text(r)[1] for r in records]
    if len(texts) < 2:
        return ""
    p = os.path.commonprefix(texts)
    ends = [i + 1 for i, c in enumerate(p) if c in ".:?!\n"]
    ends = [e for e in ends if all(len(t) == e or t[e].isspace() for t in texts)]
    p = p[: ends[-1]].strip() if ends else ""
    return p if len(p) >= min_chars else ""


def _prompt_text(record: Record) -> tuple[int, str]:
    """``(message position, content)`` of the message a task prompt goes in front of: the first
    user message (a ``text`` record: its only message)."""
    if record.kind == "text":
        return 0, record.messages[0].content
    for i, m in enumerate(record.messages):
        if m.role == "user":
            return i, m.content
    return 0, record.messages[0].content if record.messages else ""


def with_prompt(record: Record, prompt: str) -> tuple[Record, int]:
    """``record`` with ``prompt + "\\n\\n"`` in front of its first user message (module doc), and the
    number of content characters that belong to the prompt (the prompt and the whitespace after
    it). A message that already starts with the prompt keeps it once."""
    i, content = _prompt_text(record)
    if not content.startswith(prompt):
        content = f"{prompt}\n\n{content}"
    n = len(prompt) + (len(content[len(prompt) :]) - len(content[len(prompt) :].lstrip()))
    msgs = list(record.messages)
    msgs[i] = Message(msgs[i].role, content)
    return replace(record, messages=tuple(msgs)), n


def encode_with_prompt(formatter: Formatter, records: Sequence[Record], prompt: str) -> list[Encoded]:
    """Encode each record with ``prompt`` in front of its first user message (:func:`with_prompt`).

    The prompt's tokens (those overlapping its characters in the rendered text) are recoded
    ``TEMPLATE`` and taken out of the loss mask, so no scope pools or scores them and
    ``min_context`` counts only the record's own content tokens. The prompt shortens what is
    left of a record under ``max_length``. ``prompt=""``: plain :meth:`Formatter.encode_many`.
    """
    if not prompt:
        return formatter.encode_many(list(records))
    pairs = [with_prompt(r, prompt) for r in records]
    encoded = formatter.encode_many([r for r, _ in pairs])
    for (rec, n), enc in zip(pairs, encoded, strict=True):
        text, spans = formatter.render(rec)
        start = next((s for s, _, _ in spans if text.startswith(prompt, s)), None)
        if start is None or enc.offsets is None:
            raise CoreselectError(f"record {rec.id}: cannot locate the task prompt in the rendered text")
        a, b = enc.offsets[:, 0], enc.offsets[:, 1]
        inside = (a < start + n) & (b > start) & (b > a)
        enc.codes[inside] = TEMPLATE
        enc.loss_mask[inside] = False
    return encoded


# ------------------------------------------------------------------------------ activation and NLL
def head_activations(feats: Tensor, mask: Tensor, n_heads: int) -> tuple[Tensor, Tensor]:
    """``a [B, n_heads]``: per record, the mean over the ``mask`` tokens of each head's L2 norm
    (``feats [B, T, n_heads * d]``, head-major as :func:`head_features` returns them), and
    ``ok [B]`` (the record has a masked token). Float32 at least."""
    b, t, _ = feats.shape
    x = feats if feats.dtype in (torch.float32, torch.float64) else feats.float()
    norms = x.view(b, t, n_heads, -1).norm(dim=-1)  # [B, T, H]
    n = mask.sum(-1)
    a = (norms * mask.to(norms.dtype)[..., None]).sum(1) / n.clamp(min=1)[:, None].to(norms.dtype)
    return a, n > 0


def activation_scores(act: Tensor, mu: Tensor) -> Tensor:
    """``s(x) = mean_h a_h(x) / mu_h`` (module doc), ``[B]`` float64."""
    return (act.double() / mu.double().to(act.device).clamp(min=1e-30)).mean(-1)


def response_nll(model: Any, hidden: Tensor, batch: Batch, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed response-token NLL ``[B]`` (float32+) and target count ``[B]`` from the final hidden states.

    The targets of :func:`coreselect.models.runner.response_losses` (``loss_mask`` tokens, token
    ``t`` from ``t - 1``), but the LM head only runs on those positions (in slices of
    :data:`NLL_CHUNK`), never on the whole ``[B, T, V]``; Gemma-2's ``final_logit_softcapping``
    is applied. ``rows [B]`` bool: only those records (others get 0 / 0).
    """
    keep = batch.loss_mask[:, 1:] & batch.attention_mask[:, 1:].bool()
    if rows is not None:
        keep = keep & rows.to(keep.device)[:, None]
    picked = hidden[:, :-1][keep]
    targets = batch.input_ids[:, 1:][keep]
    row_of = keep.nonzero()[:, 0]
    head = model.get_output_embeddings()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    parts = []
    for i in range(0, picked.shape[0], NLL_CHUNK):
        logits = head(picked[i : i + NLL_CHUNK])
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        parts.append(torch.nn.functional.cross_entropy(logits, targets[i : i + NLL_CHUNK], reduction="none"))
    dtype = parts[0].dtype if parts else torch.float32
    total = torch.zeros(keep.shape[0], dtype=dtype, device=hidden.device)
    if parts:
        total.index_add_(0, row_of, torch.cat(parts))
    return total, keep.sum(-1)


@torch.inference_mode()
def head_features_nll(
    runner: ModelRunner, batch: Batch, by_layer: dict[int, list[int]], rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`head_features` and the records' mean response-token NLL ``[B]`` (NaN where a record has
    no target or is not in ``rows``) from the same, complete, forward pass. The features are the
    same tensors :func:`head_features` captures (the hooks see the same inputs; only the pass goes on)."""
    store: dict[int, Tensor] = {}
    with _capture(runner.model, by_layer, store, stop=False):
        out = runner.base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    runner.forward_passes += batch.input_ids.shape[0]
    runner.tokens_seen += batch.n_real_tokens
    total, count = response_nll(runner.model, out.last_hidden_state, batch, rows)
    nll = torch.where(count > 0, total / count.clamp(min=1).to(total.dtype), torch.full_like(total, float("nan")))
    return torch.cat([store[layer].float() for layer in sorted(by_layer)], dim=-1), nll


@torch.inference_mode()
def record_nll(runner: ModelRunner, encoded: Sequence[Encoded], batch_tokens: int) -> np.ndarray:
    """``[N]`` float64: each record's mean response-token NLL under the base model (NaN: no target),
    from its own forward passes (no head capture), in ``batch_tokens`` batches."""
    out = np.full(len(encoded), np.nan)
    for positions in token_budget_batches([len(e) for e in encoded], batch_tokens):
        batch = runner.collate(encoded, positions)
        hidden = runner.base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        runner.forward_passes += batch.input_ids.shape[0]
        runner.tokens_seen += batch.n_real_tokens
        total, count = response_nll(runner.model, hidden, batch)
        nll = (total.double() / count.clamp(min=1).double()).cpu().numpy()
        out[positions] = np.where(count.cpu().numpy() > 0, nll, np.nan)
    return out


def in_ppl_sample(index: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Seeded, per-record membership in the NLL sample (``ppl=sample``): a SplitMix64 hash of
    ``(seed, pool index)`` mapped to ``[0, 1)``, below ``fraction``. Independent of the scores, of
    chunking and of the engine, so the selected records in the sample are a uniform sample of the
    selection."""
    with np.errstate(over="ignore"):
        z = np.asarray(index, dtype=np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def ppl_summary(nll: np.ndarray) -> dict[str, Any]:
    """``n``, ``mean_nll``, ``ppl`` (= exp of the mean NLL), ``mean_ppl``, ``median_ppl`` of per-record NLLs."""
    x = np.asarray(nll, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return {"n": 0, "mean_nll": None, "ppl": None, "mean_ppl": None, "median_ppl": None}
    return {
        "n": len(x),
        "mean_nll": float(x.mean()),
        "ppl": float(np.exp(x.mean())),
        "mean_ppl": float(np.exp(x).mean()),
        "median_ppl": float(np.exp(np.median(x))),
    }


# ------------------------------------------------------------------------------ selection
@dataclass
class P2DConfig(TokenScoring):
    """P2D selection knobs, plus TRIM's token-scoring ones (:class:`~coreselect.methods.trim.TokenScoring`)
    and TRIM's three conventions (issue 11), with TRIM's defaults (:class:`~coreselect.methods.trim.TrimConfig`
    documents the measurements behind them). Every field is a ``--flag`` / YAML key of ``p2d``
    (``seed`` and ``chunk_records`` come from the run).

    Attributes:
        heads: ``localized`` (default: located on the target, stage i; ``auto`` is the old name),
            ``random`` (the falsification control: as many heads as ``localized`` keeps, i.e.
            ``round(head_fraction * L * H)``, drawn uniformly over all ``(layer, head)`` pairs
            with ``head_seed``; the per-layer distribution of the localized set is *not* kept)
            or a ``heads.json`` path.
        head_seed: seeds ``heads=random`` (``numpy.random.default_rng(head_seed)``); written into
            ``heads.json`` (``extra.head_seed``).
        proxy: ``gradient`` or ``attention`` (``heads=localized`` only).
        head_fraction: share of all heads kept in ``H_T`` (paper: 10%).
        score: ``centroid`` (default, the code's own reading: cosine of the pooled ``H_T``
            outputs to the target centre, or fingerprints, per ``feature``) or ``activation``
            (the paper's reading, module doc: how strongly ``H_T`` activates on the record
            with the task prompt in front, relative to the target examples).
        task_prompt: ``score=activation``: the task selection prompt put in front of every
            record (paper Figs. 5-7); ``""`` (default): the target examples' shared
            instruction prefix (:func:`shared_prefix`), none if they share none.
        feature: ``score=centroid``: ``pooled`` (mean-pool cosine to the target, default) or
            ``fingerprint`` (TRIM fingerprints on the head outputs).
        ppl: base-model NLL of the records (paper Fig. 4's perplexity skew; module doc):
            ``sample`` (default: a seeded ``ppl_fraction`` sample of the pool, in a pass of its
            own, and every selected record, read back from ``coreset.jsonl``), ``all`` (every
            scored record, from the scoring pass itself) or ``off``.
        ppl_fraction: the sample's share of the pool for ``ppl=sample``.
        seed: the run's seed; seeds the ``ppl=sample`` sample.
        aer: estimate the Alignment Efficiency Ratio into run.json (times a few training steps).
        aer_epochs: epochs assumed for both trainings in that estimate (Table 7 of paper 002: 4).
        coverage: ``kappa(c)`` of TRIM's eq. 15 for the ``fingerprint`` feature: ``length``
            (default), ``tokens`` or ``content`` (``trim_math.coverage_term``).
        saliency_minmax: where eq. 6's min-max runs for the ``fingerprint`` feature: ``scope``
            (default: the fingerprinted positions) or ``all`` non-pad positions.
        min_context: fingerprint, pool and score only tokens with at least this many content
            tokens before them (``trim_math.context_mask``; every score); 0 keeps all.
    """

    heads: str = "localized"
    head_seed: int = 0
    proxy: str = "gradient"
    head_fraction: float = 0.1
    score: str = "centroid"
    task_prompt: str = ""
    feature: str = "pooled"
    ppl: str = "sample"
    ppl_fraction: float = 0.05
    seed: int = 0
    aer: bool = True
    aer_epochs: float = 4.0
    saliency_minmax: str = "scope"
    min_context: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.saliency_minmax not in ("scope", "all"):
            raise ConfigError(f"saliency_minmax must be scope or all, got {self.saliency_minmax!r}")
        if self.min_context < 0:
            raise ConfigError(f"min_context must be >= 0, got {self.min_context}")
        if self.proxy not in PROXIES:
            raise ConfigError(f"proxy must be one of {', '.join(PROXIES)}, got {self.proxy!r}")
        if self.feature not in FEATURES:
            raise ConfigError(f"feature must be one of {', '.join(FEATURES)}, got {self.feature!r}")
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.score == "activation" and self.feature != "pooled":
            raise ConfigError("feature=fingerprint is a centroid score; score=activation takes no feature")
        if self.ppl not in PPL_MODES:
            raise ConfigError(f"ppl must be one of {', '.join(PPL_MODES)}, got {self.ppl!r}")
        if not 0 < self.ppl_fraction <= 1:
            raise ConfigError(f"ppl_fraction must be in (0, 1], got {self.ppl_fraction}")
        n_top(self.head_fraction, 1)  # validates the range
        if self.heads == "auto":
            self.heads = "localized"
        if self.heads not in HEAD_CHOICES and not Path(self.heads).is_file():
            raise CoreselectError(f"{self.heads}: --heads must be localized, random or a heads.json file")

    def scored_positions(self, batch: Batch) -> Tensor:
        """``[B, T]`` bool: the positions pooled / fingerprinted and scored: in scope, not special,
        not pad, with at least ``min_context`` content tokens before them (as ``TrimConfig``)."""
        m = batch.scope_mask(self.scope)
        if self.min_context:
            m = m & context_mask(batch.scope_mask("all"), self.min_context)
        return m


@dataclass
class TargetSide:
    """What :meth:`P2DMethod.fit` learned from one target set.

    Attributes:
        head_set: ``H_T``.
        center: ``score=centroid``, ``feature=pooled``: the unit target centre.
        fingerprints, table: ``feature=fingerprint``: TRIM's fingerprints on the head outputs.
        mu: ``score=activation``: ``[|H_T|]`` the heads' mean activation on the target examples.
        prompt: ``score=activation``: the task prompt in front of every record.
    """

    head_set: HeadSet
    center: Tensor | None = None
    fingerprints: Fingerprints | None = None
    table: NearestClassTable | None = None
    mu: Tensor | None = None
    prompt: str = ""


@register("p2d", config=P2DConfig)
class P2DMethod(SelectionMethod):
    """P2D-dagger: score pool records through the task-sensitive heads only (module doc)."""

    name: ClassVar[str] = "p2d"
    needs_model: ClassVar[bool] = True
    uses_warmup: ClassVar[bool] = False  # the experiment never gives P2D the shared warmup
    streaming: ClassVar[bool] = True
    #: several targets natively (module doc): ``H_T`` and target side per target, one pool pass
    multi_target: ClassVar[bool] = True
    #: the target side of the fit (pooled centre, or the activation means), beside heads.json
    STATE_FILE: ClassVar[str] = "p2d_target.safetensors"

    def __init__(
        self,
        runner: ModelRunner,
        formatter: Formatter,
        config: P2DConfig | None = None,
        *,
        model_name: str = "",
        out_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.runner = runner
        self.formatter = formatter
        self.config = config or P2DConfig()
        self.model_name = model_name
        self.out_dir = Path(out_dir) if out_dir else None
        self.progress = progress
        self.geom = HeadGeometry.of(runner.model)
        #: target name -> what was learned from it (one entry for one target)
        self.sides: dict[str, TargetSide] = {}
        self.head_set: HeadSet | None = None
        self.fingerprints: Fingerprints | None = None
        self._table: NearestClassTable | None = None
        self._center: Tensor | None = None
        self._target_encoded: list[Encoded] = []
        #: pool index and mean response-token NLL of every record whose NLL was computed (``ppl``)
        self._nll_index: list[np.ndarray] = []
        self._nll: list[np.ndarray] = []
        self._nll_prompted = False
        #: the run folder (``ppl=sample`` reads the selection back from its ``coreset.jsonl``)
        self.run_dir: Path | None = None

    @classmethod
    def experiment_rows(cls) -> list[ExperimentRow]:
        """P2D (select + train the heads), P2D-dagger (select only) and P2D-double-dagger
        (train the heads on random data; locating them counts as its selection cost)."""
        return [
            ExperimentRow("p2d", "p2d", "P2D", train_heads_from="p2d"),
            ExperimentRow("p2d_select", "p2d", "P2D† (select only)"),
            ExperimentRow(
                "p2d_train",
                "random",
                "P2D‡ (heads only, random data)",
                train_heads_from="p2d",
                extra_cost=(("p2d", "localize_s"),),
            ),
        ]

    @classmethod
    def report_summary(cls, run: dict[str, Any]) -> list[tuple[str, object]]:
        """The report's summary rows: where ``H_T`` came from, its size, the score and the AER."""
        st = run.get("settings", {})
        heads = (run.get("stats") or {}).get("heads") or {}
        aer = (run.get("aer") or {}).get("aer") if isinstance(run.get("aer"), dict) else run.get("aer")
        where = f"{heads.get('proxy', st.get('heads'))}, fraction {st.get('head_fraction')}"
        size = f"{heads.get('n', '?')} of {heads.get('of', '?')} ({where}), layers {heads.get('layers', '?')}"
        rows: list[tuple[str, object]] = [
            ("model", st.get("model", "?")),
            ("heads H_T", size),
            ("feature / scope", f"{st.get('feature')} / {st.get('scope')}"),
            ("min_context / coverage", f"{st.get('min_context')} / {st.get('coverage')}"),
            ("AER (estimated)", None if aer is None else f"{aer:.4g}"),
        ]
        if st.get("score", "centroid") != "centroid":
            rows.insert(3, ("score", st.get("score")))
        ppl = run.get("ppl") if isinstance(run.get("ppl"), dict) else None
        if ppl and ppl.get("skews_low") is not None:
            sel, pool = ppl["selected"], ppl["pool"]
            rows.append(
                (
                    "perplexity selected / pool",
                    f"{sel['ppl']:.4g} / {pool['ppl']:.4g} "
                    f"(low-perplexity skew: {'yes' if ppl['skews_low'] else 'no'})",
                )
            )
        return rows

    @classmethod
    def report_figures(cls, run_dir: Path, run: dict[str, Any]) -> list[ReportFigure]:
        """The heads' heat map (paper Fig. 3) from the run's ``heads.json``; none for random heads."""
        import tempfile

        if not (run_dir / "heads.json").is_file():
            return []
        hs = HeadSet.load(run_dir / "heads.json")
        if not hs.scores:
            return []
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_heatmap(hs, Path(tmp) / "heads.png").read_bytes()
        by_layer = "; ".join(f"layer {layer}: {', '.join(map(str, h))}" for layer, h in hs.by_layer().items())
        return [
            ReportFigure(
                "p2d-heads",
                "Task-sensitive heads H_T (stage i)",
                png,
                f"{hs.proxy} head sensitivity, H_T outlined",
                note=f"{len(hs.heads)} heads by {hs.proxy} sensitivity ({by_layer}).",
            )
        ]

    @classmethod
    def create(cls, config: Any, ctx: MethodContext) -> P2DMethod:
        model = ctx.require_model(cls.name)
        method = cls(model.runner, model.formatter, config, model_name=ctx.model_name, progress=ctx.progress)
        method.run_dir = Path(ctx.out) if ctx.out else None
        return method

    def settings(self) -> dict[str, Any]:
        return asdict(self.config)

    # ------------------------------------------------------------ state
    def _use_first(self) -> None:
        side = next(iter(self.sides.values()))
        self.head_set, self._center = side.head_set, side.center
        self.fingerprints, self._table = side.fingerprints, side.table

    def save_state(self, out: Path) -> list[Path]:
        """``heads.json`` (+ ``heads.png`` when localized) and the target side of the fit; several
        targets: the same files in ``out/target-<name>/`` per target (the ``PerTarget`` layout)."""
        if not self.sides:
            return []
        if len(self.sides) == 1:
            return self._save_side(next(iter(self.sides.values())), out)
        written: list[Path] = []
        for name, side in self.sides.items():
            sub = out / f"target-{name}"
            sub.mkdir(parents=True, exist_ok=True)
            written += self._save_side(side, sub)
        return written

    def _save_side(self, side: TargetSide, out: Path) -> list[Path]:
        from safetensors.torch import save_file

        from coreselect.io import atomic_path

        written = [out / "heads.json"]
        side.head_set.save(out / "heads.json")
        if side.head_set.scores:
            written.append(plot_heatmap(side.head_set, out / "heads.png"))
        if side.fingerprints is not None:
            side.fingerprints.save(out / "p2d_fingerprints.safetensors")
            written.append(out / "p2d_fingerprints.safetensors")
        elif side.center is not None or side.mu is not None:
            tensors = {"center": side.center} if side.center is not None else {"mu": side.mu}
            meta = {"score": self.config.score, "task_prompt": side.prompt}
            with atomic_path(out / self.STATE_FILE) as tmp:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}, str(tmp), meta
                )
            written.append(out / self.STATE_FILE)
        return written

    def load_state(self, out: Path) -> bool:
        """Restore heads and target side (not the AER estimate's encoded targets: fit again for that)."""
        names = self.target_names if len(self.target_names) > 1 else []
        sides: dict[str, TargetSide] = {}
        for name in names or ["target"]:
            side = self._load_side(out / f"target-{name}" if names else out)
            if side is None:
                return False
            sides[name] = side
        self.sides = sides
        self._use_first()
        return True

    def _load_side(self, out: Path) -> TargetSide | None:
        from safetensors import safe_open

        fp, state = out / "p2d_fingerprints.safetensors", out / self.STATE_FILE
        if not (out / "heads.json").is_file():
            return None
        hs = HeadSet.load(out / "heads.json")
        hs.check(self.geom)
        side = TargetSide(hs)
        if self.config.score == "centroid" and self.config.feature == "fingerprint":
            if not fp.is_file():
                return None
            side.fingerprints = Fingerprints.load(fp)
            side.table = NearestClassTable(side.fingerprints, self.runner.embeddings())
            return side
        if not state.is_file():
            return None
        with safe_open(str(state), framework="pt") as f:
            meta = f.metadata() or {}
            key = "mu" if self.config.score == "activation" else "center"
            if key not in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                return None
            value = f.get_tensor(key)
        if key == "mu":
            side.mu, side.prompt = value, meta.get("task_prompt", "")
        else:
            side.center = value
        return side

    # ------------------------------------------------------------ stage 1 + target side
    def resolve_heads(self, target: Sequence[Record]) -> HeadSet:
        cfg, g = self.config, self.geom
        if cfg.heads in ("localized", "auto"):
            t0 = time.perf_counter()
            hs = localize_heads(
                self.runner,
                self.formatter,
                target,
                proxy=cfg.proxy,
                fraction=cfg.head_fraction,
                batch_tokens=cfg.batch_tokens,
                model_name=self.model_name,
            )
            hs.extra["heads"] = "localized"
            self.stats["localize_s"] = time.perf_counter() - t0
            self.cost.backward_passes += len(target) if cfg.proxy == "gradient" else 0
        elif cfg.heads == "random":
            k = n_top(cfg.head_fraction, g.n_layers * g.n_heads)  # the count localized keeps
            hs = HeadSet(
                self.model_name,
                "random",
                cfg.head_fraction,
                random_heads(g.n_layers, g.n_heads, k, cfg.head_seed),
                n_layers=g.n_layers,
                n_heads=g.n_heads,
                extra={
                    "heads": "random",
                    "head_seed": cfg.head_seed,
                    "seed": cfg.head_seed,
                    "draw": "uniform over all (layer, head) pairs, without replacement; "
                    "the localized set's per-layer counts are not kept",
                },
            )
        else:
            hs = HeadSet.load(cfg.heads)
            hs.extra.setdefault("heads", str(cfg.heads))
        hs.check(g)
        return hs

    def fit_targets(self, targets: TargetSets) -> P2DMethod:
        """One target: :meth:`fit`. Several: ``H_T`` and target side per target (module doc)."""
        for key in ("per_target", "heads_union", "localize_s", "task_prompt"):  # a refit starts afresh
            self.stats.pop(key, None)
        if len(targets) <= 1:
            return self.fit(next(iter(targets.values()), []))
        sides, per_stats = {}, {}
        for name, records in targets.items():
            self.fit(records)
            sides[name] = self.sides["target"]
            per_stats[name] = {"heads": self.stats["heads"], "fit_s": self.stats["fit_s"]}
            for key in ("localize_s", "task_prompt"):
                if key in self.stats:
                    per_stats[name][key] = self.stats.pop(key)
        self.sides = sides
        self._use_first()
        self.stats["per_target"] = per_stats
        self.stats["fit_s"] = sum(s["fit_s"] for s in per_stats.values())
        if any("localize_s" in s for s in per_stats.values()):  # the experiment's P2D-double-dagger cost
            self.stats["localize_s"] = sum(s.get("localize_s", 0.0) for s in per_stats.values())
        self.stats["heads"] = next(iter(per_stats.values()))["heads"]
        self.stats["heads_union"] = len({h for s in sides.values() for h in s.head_set.heads})
        return self

    def fit(self, target: Sequence[Record]) -> P2DMethod:
        if not target:
            raise CoreselectError("the target set is empty")
        t0 = time.perf_counter()
        hs = self.resolve_heads(target)
        if self.out_dir is not None:
            hs.save(self.out_dir / "heads.json")
            if hs.scores:
                plot_heatmap(hs, self.out_dir / "heads.png")
        cfg = self.config
        encoded = self._target_encoded = [self.formatter.encode(r) for r in target]
        side = TargetSide(hs)
        if cfg.score == "activation":
            side.prompt = cfg.task_prompt.strip() or shared_prefix(target)
            side.mu = self._target_activation(target, hs, side.prompt)
        else:
            self._fit_centroid(encoded, side)
        self.sides = {"target": side}
        self._use_first()
        self.cost.forward_passes += len(target)
        self.stats["fit_s"] = time.perf_counter() - t0
        self.stats["heads"] = {
            "n": len(hs.heads),
            "of": self.geom.n_layers * self.geom.n_heads,
            "proxy": hs.proxy,
            "layers": sorted(hs.by_layer()),
            "feature_dim": len(hs.heads) * self.geom.head_dim,
        }
        if cfg.heads == "random":
            self.stats["heads"]["head_seed"] = cfg.head_seed
        if cfg.score == "activation":
            self.stats["task_prompt"] = side.prompt
        return self

    def _fit_centroid(self, encoded: list[Encoded], side: TargetSide) -> None:
        cfg = self.config
        by_layer = side.head_set.by_layer()
        builder = FingerprintBuilder()
        pooled: list[Tensor] = []
        # eq. 2 / eq. 4 count the keys each selected layer admits (its sliding window, if any)
        windows = attention_windows(self.runner.model.config, sorted(by_layer))
        for positions in token_budget_batches([len(e) for e in encoded], cfg.batch_tokens):
            batch = self.runner.collate(encoded, positions)
            mask = cfg.scored_positions(batch)
            feats = head_features(self.runner, batch, by_layer)  # the kernel that scores the pool
            if cfg.feature == "fingerprint":
                attns = head_attentions(self.runner, batch, by_layer)
                alpha = token_saliency(
                    attns,
                    batch.attention_mask,
                    cfg.w_row,
                    cfg.w_col,
                    windows=windows,
                    minmax_mask=mask if cfg.saliency_minmax == "scope" else None,
                )
                del attns
                builder.add(feats, alpha, batch.input_ids, mask)
            else:
                v, ok = _mean_pool(feats, mask)
                pooled.extend(_unit(v[ok]))
        if cfg.feature == "fingerprint":
            fp = builder.finalize(settings={"method": "p2d", "heads": [list(h) for h in side.head_set.heads]})
            if len(fp) == 0:
                raise CoreselectError(f"the target has no scorable token under scope '{cfg.scope}'")
            side.fingerprints = fp
            side.table = NearestClassTable(fp, self.runner.embeddings())
        else:
            if not pooled:
                raise CoreselectError(f"the target has no scorable token under scope '{cfg.scope}'")
            side.center = _unit(torch.stack(pooled).mean(0))

    def _target_activation(self, target: Sequence[Record], hs: HeadSet, prompt: str) -> Tensor:
        """``mu [|H_T|]``: the mean over target examples of each head's activation ``a_h`` (module doc)."""
        cfg = self.config
        encoded = encode_with_prompt(self.formatter, target, prompt)
        by_layer = hs.by_layer()
        acts: list[Tensor] = []
        for positions in token_budget_batches([len(e) for e in encoded], cfg.batch_tokens):
            batch = self.runner.collate(encoded, positions)
            a, ok = head_activations(
                head_features(self.runner, batch, by_layer), cfg.scored_positions(batch), len(hs.heads)
            )
            acts.extend(a[ok].float().cpu())
        if not acts:
            raise CoreselectError(f"the target has no scorable token under scope '{cfg.scope}'")
        return torch.stack(acts).mean(0)

    # ------------------------------------------------------------ stage 2
    def _groups(self) -> list[tuple[str, list[str]]]:
        """Target names by the text in front of the records: one pool pass per distinct prompt
        (centroid targets and activation targets without a prompt share the plain pass, first)."""
        groups: dict[str, list[str]] = {}
        for name, side in self.sides.items():
            groups.setdefault(side.prompt if self.config.score == "activation" else "", []).append(name)
        return sorted(groups.items(), key=lambda kv: kv[0] != "")

    def _nll_rows(self, encoded: list[Encoded]) -> np.ndarray:
        cfg = self.config
        if cfg.ppl == "all":
            return np.ones(len(encoded), dtype=bool)
        if cfg.ppl == "off":
            return np.zeros(len(encoded), dtype=bool)
        return in_ppl_sample(np.array([e.index for e in encoded], dtype=np.int64), cfg.seed, cfg.ppl_fraction)

    def _score_records(self, records: list[Record]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, int]:
        """Per-target scores, the first target's ``n_scored``, token counts and the number of pool passes."""
        cfg = self.config
        scores = {name: np.empty(len(records), dtype=np.float64) for name in self.sides}
        n_scored = np.zeros(len(records), dtype=np.int64)
        first = next(iter(self.sides))
        # token counts and truncation are the plain record's, whatever is put in front of it
        plain = self.formatter.encode_many(records)
        n_tokens = np.array([len(e) for e in plain], dtype=np.int64)
        self.n_truncated += sum(e.truncated for e in plain)
        want = self._nll_rows(plain)
        groups = self._groups()
        for g, (prompt, names) in enumerate(groups):
            if prompt:
                encoded = encode_with_prompt(self.formatter, records, prompt)
                cut = sum(e.truncated for e in encoded)
                if cut:
                    self.stats["truncated_with_prompt"] = self.stats.get("truncated_with_prompt", 0) + cut
            else:
                encoded = plain
            if g == 0:
                self._nll_prompted = bool(prompt) and cfg.ppl == "all"
            union = sorted({h for n in names for h in self.sides[n].head_set.heads})
            by_layer: dict[int, list[int]] = {}
            for layer, head in union:
                by_layer.setdefault(layer, []).append(head)
            cols = {n: _columns(union, self.sides[n].head_set.heads, self.geom.head_dim) for n in names}
            nll_all = np.full(len(records), np.nan)
            for positions in token_budget_batches([len(e) for e in encoded], cfg.batch_tokens):
                batch = self.runner.collate(encoded, positions)
                rows = want[positions] if g == 0 and cfg.ppl == "all" else None
                if rows is not None and rows.any():
                    feats, nll = head_features_nll(
                        self.runner, batch, by_layer, torch.from_numpy(rows).to(batch.input_ids.device)
                    )
                    nll_all[positions] = nll.double().cpu().numpy()
                else:
                    feats = head_features(self.runner, batch, by_layer)
                mask = cfg.scored_positions(batch)
                for name in names:
                    c = cols[name]
                    f = feats if c is None else feats.index_select(-1, c.to(feats.device))
                    sc, n = self._score_side(self.sides[name], f, batch, mask)
                    scores[name][positions] = sc.double().cpu().numpy()
                    if name == first:
                        n_scored[positions] = n.cpu().numpy()
            if g == 0 and cfg.ppl == "all":
                got = np.isfinite(nll_all)
                self._nll_index.append(np.array([e.index for e in encoded], dtype=np.int64)[got])
                self._nll.append(nll_all[got])
        if cfg.ppl == "sample" and want.any():  # a pass of its own over the sampled records only
            picked = [plain[i] for i in np.nonzero(want)[0]]
            sampled = record_nll(self.runner, picked, cfg.batch_tokens)
            self.cost.forward_passes += len(picked)
            got = np.isfinite(sampled)
            self._nll_index.append(np.array([e.index for e in picked], dtype=np.int64)[got])
            self._nll.append(sampled[got])
        return scores, n_scored, n_tokens, len(groups)

    def _score_side(self, side: TargetSide, feats: Tensor, batch: Batch, mask: Tensor) -> tuple[Tensor, Tensor]:
        """One target's scores ``[B]`` and scored-token counts ``[B]`` of a batch from its heads' features."""
        cfg = self.config
        if cfg.score == "activation":
            assert side.mu is not None
            a, ok = head_activations(feats, mask, len(side.head_set.heads))
            sc = torch.where(
                ok, activation_scores(a, side.mu), torch.full_like(a[:, 0], float("-inf"), dtype=torch.float64)
            )
            return sc, mask.sum(-1)
        if cfg.feature == "fingerprint":
            assert side.fingerprints is not None
            s, in_m, _ = token_scores(
                side.fingerprints, feats, batch.input_ids, mask, oov_penalty=cfg.oov_penalty, table=side.table
            )
            sc, parts = cfg.pool(s, in_m, batch)
            return sc, parts["n_scored"]
        assert side.center is not None
        v, ok = _mean_pool(feats, mask)
        sc = torch.where(ok, _unit(v) @ side.center.to(v.device), torch.full_like(v[:, 0], float("-inf")))
        return sc, mask.sum(-1)

    def _chunk(self, chunk: list[Record]) -> ScoreChunk:
        per, n_scored, n_tokens, passes = self._score_records(chunk)
        for scores in per.values():
            if np.isnan(scores).any():
                raise CoreselectError(f"non-finite score for pool record id {chunk[int(np.isnan(scores).argmax())].id}")
        self.cost.forward_passes += len(chunk) * passes
        out = chunk_from_scores(chunk, next(iter(per.values())), n_tokens=n_tokens, n_scored=n_scored)
        if len(self.sides) > 1:
            out.targets = per
        return out

    def score_chunks(
        self, pool: Iterable[Record], total: int | None = None, chunk_records: int | None = None
    ) -> Iterator[ScoreChunk]:
        if not self.sides:
            raise CoreselectError("P2DMethod.score called before fit")
        from coreselect.progress import progress_bar

        t0 = time.perf_counter()
        with progress_bar(total=total, desc="P2D: scoring", enabled=self.progress) as bar:
            for chunk in record_chunks(pool, chunk_records or self.config.chunk_records):
                out = self._chunk(chunk)
                bar.update(len(chunk))
                yield out
        self.stats["score_s"] = self.stats.get("score_s", 0.0) + time.perf_counter() - t0

    def score_batch(self, records: Sequence[Record]) -> ScoreChunk:
        """Scores of one slice of the pool (what engines call per chunk)."""
        if not self.sides:
            raise CoreselectError("P2DMethod.score called before fit")
        return self._chunk(list(records))

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        return scores_from_chunks(self.score_chunks(pool))

    # ------------------------------------------------------------ run.json
    def nll_by_index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(pool index, mean response-token NLL)`` of every record whose NLL this instance computed."""
        if not self._nll:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        return np.concatenate(self._nll_index), np.concatenate(self._nll)

    def ppl_info(self, table: Any) -> dict[str, Any]:
        """run.json's ``ppl``: base-model NLL / perplexity of the selection vs the pool (module doc).

        ``pool``: every record whose NLL was computed while scoring (``ppl=all``: all of them;
        ``sample``: the seeded sample). ``selected``: ``all``: the selected ones among them;
        ``sample``: every selected record, read back from the run's ``coreset.jsonl`` and passed
        through the base model here (``selected_from: coreset``; without a run folder: the
        selected records in the sample, ``selected_from: sample``).
        """
        cfg = self.config
        index, nll = self.nll_by_index()
        t_index = np.asarray(table.column("index").to_numpy(), dtype=np.int64)
        selected = t_index[np.asarray(table.column("selected").to_numpy(), dtype=bool)]
        index, first = np.unique(index, return_index=True)  # a record scored twice (score() called again) counts once
        nll = nll[first]
        sel_nll, selected_from, extra_s = nll[np.isin(index, selected)], "scored", 0.0
        coreset = self.run_dir / "coreset.jsonl" if self.run_dir is not None else None
        if cfg.ppl == "sample":
            selected_from = "sample"
            if coreset is not None and coreset.is_file():
                from coreselect.data.readers import read_records

                t0 = time.perf_counter()
                encoded = self.formatter.encode_many(list(read_records([coreset])))
                sel_nll = record_nll(self.runner, encoded, cfg.batch_tokens)  # after the run's cost: not in it
                selected_from, extra_s = "coreset", time.perf_counter() - t0
        pool_s, sel_s = ppl_summary(nll), ppl_summary(sel_nll)
        skews = None if not (pool_s["n"] and sel_s["n"]) else bool(sel_s["mean_nll"] < pool_s["mean_nll"])
        return {
            "mode": cfg.ppl,
            "fraction": cfg.ppl_fraction if cfg.ppl == "sample" else 1.0,
            "pool": pool_s,
            "selected": sel_s,
            "selected_from": selected_from,
            "delta_mean_nll": None if skews is None else sel_s["mean_nll"] - pool_s["mean_nll"],
            "skews_low": skews,
            "coverage": len(index) / max(len(t_index), 1),
            "conditioned_on_task_prompt": self._nll_prompted,
            "selected_nll_s": extra_s,
            "how": "base model's mean NLL over each record's response (loss-mask) tokens; pool = every scored "
            "record with an NLL (ppl=sample: a seeded sample of the pool, in a pass of its own), selected = the "
            "selected records (see selected_from); ppl = exp(mean NLL)",
        }

    def run_info(self, table: Any, info: dict[str, Any]) -> dict[str, Any]:
        """Extra run.json keys: ``aer`` (estimated, see :func:`coreselect.methods.p2d.train.estimate_aer`) and
        ``ppl`` (:meth:`ppl_info`; absent with ``ppl=off``; empty counts when this process scored nothing,
        e.g. a Ray or resumed run)."""
        out: dict[str, Any] = {}
        if self.config.ppl != "off":
            out["ppl"] = self.ppl_info(table)
        if not self.config.aer or self.head_set is None or not self._target_encoded:
            return out
        from coreselect.methods.p2d.train import estimate_aer

        n_tok = np.asarray(table.column("n_tokens").to_numpy(), dtype=np.int64)
        sel = np.asarray(table.column("selected").to_numpy(), dtype=bool)
        try:
            aer = estimate_aer(
                self.runner.model,
                self.runner.pad_id,
                self._target_encoded,
                self.head_set.heads,
                selection_s=float(info["cost"]["wall_s"]),
                tokens_selected=int(n_tok[sel].sum()),
                tokens_pool=int(n_tok.sum()),
                epochs=self.config.aer_epochs,
            )
        except (RuntimeError, CoreselectError) as e:  # e.g. out of memory for the full-gradient timing
            aer = {"aer": None, "error": str(e).splitlines()[0]}
        out["aer"] = aer
        return out


def _columns(union: list[Head], heads: list[Head], d: int) -> Tensor | None:
    """Feature columns of ``heads`` inside features captured for ``union`` (None: all, same order)."""
    if list(heads) == list(union):
        return None
    pos = {h: i for i, h in enumerate(union)}
    return torch.tensor([pos[h] * d + j for h in heads for j in range(d)], dtype=torch.long)


def _mean_pool(feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    m = mask.to(feats.dtype)[..., None]
    n = mask.sum(-1)
    return (feats * m).sum(1) / n.clamp(min=1)[:, None].to(feats.dtype), n > 0


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-30)
