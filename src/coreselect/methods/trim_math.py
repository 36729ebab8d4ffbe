"""TRIM's equations as pure tensor functions (paper 002, §3 and Appendix B).

Everything here is model-free: tensors in, tensors out. ``coreselect.methods.trim``
re-exports these under the contract names and wires them to a model.

Conventions the paper leaves open (fixed by the TRIM issues, tested in tests/methods;
the measurements behind them are in docs/performance.md, "TRIM conventions"):

* Padding: ``attention_mask`` is ``[B, T]`` of 0/1, left or right padded. Only non-pad
  queries and keys count anywhere; pad positions get saliency 0.
* Eq. 2's ``|{j : A_ij > 0}|`` and eq. 4's ``|{i : A_ij > 0}|`` are the *structural*
  counts (:func:`admissible_keys`): causal, non-pad and inside the layer's sliding window,
  so row ``i`` has ``min(i + 1, W)`` keys and column ``j`` of an ``n``-token record
  ``min(n - j, W)`` queries. They equal ``A > 0`` in exact arithmetic but do not change
  with the dtype (fp16 rounds probabilities below 6e-8 to 0). The window is per layer
  (Gemma 2/3 alternate sliding and global layers), read from the model config by
  ``coreselect.models.runner.attention_windows``. A row with a single admissible key has
  ``q_i = 1`` (entropy 0 is perfectly sharp).
* Eq. 6's min-max runs per sequence over the positions that are fingerprinted
  (``minmax_mask``; TRIM's default ``saliency_minmax="scope"``), not over the attention
  sink or template tokens, whose ``K^raw`` would otherwise set the max and squeeze every
  content token's ``K`` towards 0. Other positions are clipped to [0, 1].
* Eq. 9 uses unit-normalized hidden states (the text's eq. 9, not the un-normalized line 10
  of Algorithm 1). Stage I's hidden states come from the same forward kernel as Stage II's
  (``ModelRunner.attn_hidden``), only the probabilities from the eager pass.
* Eq. 15's ``kappa(c)`` has three readings (:func:`coverage_term`); the default ``tokens``
  is the literal one, ``|M(c)| / |c|`` with ``|c|`` the non-pad tokens of the record
  (special and template tokens included).
* Shared prefix: every record starts with the same template, so a record's first content
  token has a hidden state that depends on that token alone. :func:`context_mask`
  (``min_context``) removes such tokens from fingerprints and scoring when asked.
* All accumulation (entropies, class sums, cosine, pooling) runs in float32 or wider,
  whatever the model's dtype.

Two options outside the paper, for the investigation of issue 15 (off by default, so the
default scores are the paper's, bit for bit): IDF-weighted tokens in eq. 13's mean
(:func:`idf`, ``token_weights`` of :func:`pool_scores`) and a minimum token count for that
mean (``min_tokens`` of :func:`pool_scores`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "COVERAGE_LENGTH_N0",
    "FingerprintBuilder",
    "Fingerprints",
    "NearestClassTable",
    "admissible_keys",
    "build_fingerprints",
    "column_saliency",
    "context_mask",
    "coverage_term",
    "idf",
    "pool_scores",
    "row_saliency",
    "score_examples",
    "token_saliency",
    "token_scores",
]


# --------------------------------------------------------------------------- Stage I


def admissible_keys(mask: Tensor, window: int | None = None) -> Tensor:
    """The structural key set of eq. 2 and eq. 4: ``[B, T, T]`` bool, True where query ``i`` may attend key ``j``.

    ``i`` and ``j`` are non-pad, ``j <= i`` (causal) and, with a sliding window ``W``,
    ``i - j < W`` (the window of Mistral / Gemma 2-3 sliding layers / Qwen2 in transformers:
    a query sees itself and the ``W - 1`` keys before it). Row ``i`` (0-based among the
    real tokens) therefore has ``min(i + 1, W)`` admissible keys, and column ``j`` of a
    record of ``n`` real tokens has ``min(n - j, W)`` admissible queries.

    This is what ``{j : A_ij > 0}`` means in exact arithmetic (softmax is positive on every
    unmasked entry), without depending on the dtype: fp16 rounds probabilities below
    ``6e-8`` to 0 and bf16/fp32 far smaller ones, so counting ``A > 0`` changes ``log n`` of
    eq. 2 and the denominator of eq. 4 with the precision. Distances are taken between
    real-token positions (the cumulative count of the mask), so left and right padding
    give the same set.

    Args:
        mask: ``[B, T]`` bool (or 0/1), True on non-pad positions.
        window: the layer's sliding window ``W``, or ``None`` for full causal attention.
    """
    m = mask.bool()
    if window is not None and window < 1:
        raise ValueError(f"sliding window must be >= 1, got {window}")
    pos = m.long().cumsum(-1)  # 1-based position among the real tokens
    dist = pos[:, :, None] - pos[:, None, :]  # i - j
    ok = m[:, :, None] & m[:, None, :] & (dist >= 0)
    if window is not None:
        ok &= dist < window
    return ok


def row_saliency(attn: Tensor, mask: Tensor, eps: float = 1e-12, window: int | None = None) -> Tensor:
    """Row saliency of one layer, averaged over heads: eq. 1-3 for a single ``l``.

    Args:
        attn: ``[B, H, T, T]`` attention probabilities (query rows, key columns), any dtype.
        mask: ``[B, T]`` bool, True on non-pad positions.
        eps: the ``epsilon`` of eq. 1.
        window: the layer's sliding window (``None``: full causal), see :func:`admissible_keys`.

    Returns:
        ``[B, T]`` float32, ``(1/H) sum_h q_i^{h}``; 0 on pad queries. ``log n`` of eq. 2
        uses the structural count ``n = min(i + 1, W)``, never ``A > 0``.
    """
    ok = admissible_keys(mask, window)[:, None]  # [B,1,T,T]
    a = attn.float()  # accumulate in fp32 whatever the model dtype
    a = torch.where(ok, a, torch.zeros((), dtype=a.dtype, device=a.device))
    entropy = -(a * torch.log(a + eps)).sum(-1)  # eq. 1, [B,H,T]
    n_keys = ok.sum(-1)  # [B,1,T], |{j : A_ij > 0}| read structurally
    log_n = torch.log(n_keys.clamp(min=1).to(a.dtype))
    safe_log_n = torch.where(n_keys > 1, log_n, torch.ones_like(log_n))
    q = torch.where(n_keys > 1, 1.0 - entropy / safe_log_n, torch.ones_like(entropy))  # eq. 2
    q = torch.where(n_keys > 0, q, torch.zeros_like(q))
    q = q.mean(1)  # heads
    return torch.where(mask.bool(), q, torch.zeros_like(q))


def column_saliency(attn: Tensor, mask: Tensor, window: int | None = None) -> Tensor:
    """Raw column saliency of one layer, averaged over heads: eq. 4-5 for a single ``l``.

    Args:
        attn: ``[B, H, T, T]`` attention probabilities, any dtype.
        mask: ``[B, T]`` bool, True on non-pad positions.
        window: the layer's sliding window (``None``: full causal), see :func:`admissible_keys`.

    Returns:
        ``[B, T]`` float32, ``(1/H) sum_h k_j^{h}``; 0 on pad keys. The denominator of eq. 4
        is the structural count of queries that may attend ``j``: ``min(n - j, W)``.
    """
    ok = admissible_keys(mask, window)[:, None]  # [B,1,T,T]
    a = attn.float()
    a = torch.where(ok, a, torch.zeros((), dtype=a.dtype, device=a.device))
    total = a.sum(-2)  # sum_i A_ij, [B,H,T]
    n_queries = ok.sum(-2)  # [B,1,T]
    k = torch.where(n_queries > 0, total / n_queries.clamp(min=1).to(a.dtype), torch.zeros_like(total))  # eq. 4
    k = k.mean(1)
    return torch.where(mask.bool(), k, torch.zeros_like(k))


def _minmax(x: Tensor, mask: Tensor, eps: float, over: Tensor | None = None) -> Tensor:
    """Eq. 6: per-sequence min-max scaling.

    ``min`` and ``max`` are taken over ``over`` (default: ``mask``, the non-pad positions)
    and the result is clipped to [0, 1] on the other non-pad positions; a sequence with an
    empty ``over`` falls back to ``mask``.
    """
    over = mask if over is None else (over & mask)
    over = torch.where(over.any(-1, keepdim=True), over, mask)
    big = torch.finfo(x.dtype).max
    lo = torch.where(over, x, torch.full_like(x, big)).amin(-1, keepdim=True)
    hi = torch.where(over, x, torch.full_like(x, -big)).amax(-1, keepdim=True)
    out = ((x - lo) / (hi - lo + eps)).clamp(0.0, 1.0)
    return torch.where(mask, out, torch.zeros_like(out))


def token_saliency(
    attentions: Sequence[Tensor],
    attention_mask: Tensor,
    w_row: float = 0.5,
    w_col: float = 0.5,
    eps: float = 1e-12,
    *,
    windows: Sequence[int | None] | None = None,
    minmax_mask: Tensor | None = None,
) -> Tensor:
    """Aggregated token saliency ``alpha_i = w_Q Q_i + w_K K_i`` (eq. 1-7).

    Args:
        attentions: one ``[B, H, T, T]`` tensor of attention probabilities per layer used
            (the last ``L`` layers). Layers may have different head counts.
        attention_mask: ``[B, T]`` of 0/1, left or right padding.
        w_row: ``w_Q`` of eq. 7.
        w_col: ``w_K`` of eq. 7.
        eps: the ``epsilon`` of eq. 1 and eq. 6.
        windows: each layer's sliding window (``None`` entries, or ``None`` for all: full
            causal attention); sets the admissible keys of eq. 2 and eq. 4.
        minmax_mask: ``[B, T]`` bool, the positions whose ``K^raw`` set the min and max of
            eq. 6 (default: every non-pad position). TRIM passes the positions it
            fingerprints (``min-max over scope``), so the attention sink, a template token,
            does not flatten ``K`` for every content token; see ``trim.TokenScoring``.

    Returns:
        ``[B, T]`` float32 saliency; 0 on pad positions.
    """
    if len(attentions) == 0:
        raise ValueError("token_saliency needs at least one layer of attentions")
    if windows is None:
        windows = [None] * len(attentions)
    if len(windows) != len(attentions):
        raise ValueError(f"{len(windows)} windows for {len(attentions)} layers of attentions")
    mask = attention_mask.bool()
    q_sum = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    k_sum = torch.zeros_like(q_sum)
    for attn, w in zip(attentions, windows):  # eq. 3 and eq. 5: mean over L layers (and H heads inside)
        q_sum += row_saliency(attn, mask, eps, w)
        k_sum += column_saliency(attn, mask, w)
    n_layers = float(len(attentions))
    q_all = q_sum / n_layers
    over = None if minmax_mask is None else minmax_mask.bool().to(mask.device)
    k_all = _minmax(k_sum / n_layers, mask, eps, over)
    alpha = w_row * q_all + w_col * k_all  # eq. 7
    return torch.where(mask, alpha, torch.zeros_like(alpha))


def context_mask(content: Tensor, min_context: int) -> Tensor:
    """Positions with at least ``min_context`` content tokens before them (the shared-prefix rule).

    Every record starts with the same template prefix, so the hidden state of a record's
    first content token is a function of that one token (and of the template): two records
    starting with the same token have identical states there, cosine 1.0, whatever follows.
    With ``min_context = k`` only tokens whose context holds ``>= k`` content tokens are
    fingerprinted (eq. 8) and scored (eq. 14).

    Args:
        content: ``[B, T]`` bool, the non-pad content (prompt or response, not template or
            special) tokens. Counted over both roles whatever the scope: the first response
            token has the prompt in its context.
        min_context: ``k >= 0``; 0 keeps every position.

    Returns:
        ``[B, T]`` bool, True where ``sum_{j < i} content_j >= k``.
    """
    if min_context < 0:
        raise ValueError(f"min_context must be >= 0, got {min_context}")
    c = content.bool()
    before = c.long().cumsum(-1) - c.long()
    return before >= min_context


@dataclass
class Fingerprints:
    """The fingerprint dictionary ``F = {f_t}`` (eq. 9).

    Attributes:
        token_ids: ``[F]`` LongTensor of token classes, ascending.
        vectors: ``[F, D]`` float32 unit rows, ``vectors[r]`` is ``f_{token_ids[r]}``.
        weights: ``[F]`` total saliency weight ``sum alpha`` of each class.
        counts: ``[F]`` number of occurrences ``|O_t|``.
        tokens: the tokenizer's string for each class (for humans; may be empty).
        settings: the run settings they were built with.
        doc_freq: ``[F]`` int64, the number of target examples in which each class occurs
            (at a fingerprinted position), or ``None`` when not counted (files written
            before issue 15, P2D). Feeds :meth:`idf`.
        n_docs: ``N``, the number of target examples ``doc_freq`` was counted over.
    """

    token_ids: Tensor
    vectors: Tensor
    weights: Tensor
    counts: Tensor
    tokens: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    doc_freq: Tensor | None = None
    n_docs: int = 0

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def idf(self) -> Tensor:
        """``[F]`` float32 inverse document frequency of each class, see :func:`idf`."""
        if self.doc_freq is None:
            from coreselect.errors import CoreselectError

            raise CoreselectError(
                "these fingerprints carry no document frequencies (built before token_weighting "
                "existed, or by P2D): rebuild them to use token_weighting: idf"
            )
        return idf(self.doc_freq, self.n_docs)

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (tensors + JSON metadata), atomically."""
        from safetensors.torch import save_file

        from coreselect.io import atomic_path

        meta = {
            "format": "coreselect.fingerprints/1",
            "tokens": json.dumps(self.tokens, ensure_ascii=False),
            "settings": json.dumps(self.settings, ensure_ascii=False, default=str),
        }
        tensors = {
            "token_ids": self.token_ids.to(torch.int64).contiguous().cpu(),
            "vectors": self.vectors.to(torch.float32).contiguous().cpu(),
            "weights": self.weights.to(torch.float32).contiguous().cpu(),
            "counts": self.counts.to(torch.int64).contiguous().cpu(),
        }
        if self.doc_freq is not None:
            tensors["doc_freq"] = self.doc_freq.to(torch.int64).contiguous().cpu()
            meta["n_docs"] = str(int(self.n_docs))
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Fingerprints:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        from coreselect.errors import CoreselectError

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except FileNotFoundError:
            raise CoreselectError(f"{path}: no such fingerprints file") from None
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CoreselectError(f"{path}: not a fingerprints safetensors file ({e})") from None
        if meta.get("format") != "coreselect.fingerprints/1" or not {"token_ids", "vectors"} <= t.keys():
            raise CoreselectError(f"{path}: not a coreselect fingerprints file")
        return cls(
            token_ids=t["token_ids"],
            vectors=t["vectors"],
            weights=t.get("weights", torch.ones(len(t["token_ids"]))),
            counts=t.get("counts", torch.ones(len(t["token_ids"]), dtype=torch.int64)),
            tokens=json.loads(meta.get("tokens", "[]")),
            settings=json.loads(meta.get("settings", "{}")),
            doc_freq=t.get("doc_freq"),
            n_docs=int(meta.get("n_docs", "0")),
        )


class FingerprintBuilder:
    """Accumulates eq. 8-9 over any number of batches of target examples.

    ``add`` keeps per-class sums ``sum alpha h_hat`` (float64) and weights; ``finalize``
    normalizes them. Adding the same tokens in any batching gives the same fingerprints.
    ``count_documents`` (optional, TRIM calls it for every target batch) counts in how many
    target examples each class occurs, for ``token_weighting: idf``.
    """

    def __init__(self) -> None:
        self._sums: dict[int, Tensor] = {}
        self._weights: dict[int, float] = {}
        self._counts: dict[int, int] = {}
        self._doc_freq: dict[int, int] = {}
        self._n_docs: int | None = None  # None: count_documents never called

    def count_documents(self, token_ids: Tensor, mask: Tensor) -> None:
        """Document frequencies: each row of ``token_ids [B, T]`` is one target example; a class
        counts once per row in which it occurs at a ``mask``-ed (fingerprinted) position. Rows
        without such a position still count towards ``N``."""
        m = mask.bool()
        self._n_docs = (self._n_docs or 0) + int(m.shape[0])
        if not m.any():
            return
        rows = torch.arange(m.shape[0], device=m.device)[:, None].expand_as(m)[m]
        pairs = torch.unique(torch.stack([rows, token_ids.to(m.device)[m].to(torch.int64)]), dim=1)
        uniq, df = torch.unique(pairs[1], return_counts=True)
        for t, c in zip(uniq.tolist(), df.tolist()):
            self._doc_freq[t] = self._doc_freq.get(t, 0) + c

    def add(self, hidden: Tensor, saliency: Tensor, token_ids: Tensor, mask: Tensor) -> None:
        """Add one batch: ``hidden [B,T,D]``, ``saliency [B,T]``, ``token_ids [B,T]``, ``mask [B,T]`` bool."""
        m = mask.bool()
        if not m.any():
            return
        h = hidden[m].to(torch.float64)
        h = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-30)  # h_hat of eq. 9
        w = saliency[m].to(torch.float64)
        ids = token_ids[m].to(torch.int64)
        uniq, inv = torch.unique(ids, return_inverse=True)
        sums = torch.zeros(len(uniq), h.shape[1], dtype=torch.float64, device=h.device)
        sums.index_add_(0, inv, w[:, None] * h)
        wsum = torch.zeros(len(uniq), dtype=torch.float64, device=h.device).index_add_(0, inv, w)
        cnt = torch.bincount(inv, minlength=len(uniq))
        # one device-to-host copy per batch, not one (and a sync) per class
        sums_cpu, wsum_l, cnt_l = sums.cpu(), wsum.tolist(), cnt.tolist()
        for r, t in enumerate(uniq.tolist()):
            if t in self._sums:
                self._sums[t] += sums_cpu[r]
                self._weights[t] += wsum_l[r]
                self._counts[t] += cnt_l[r]
            else:
                self._sums[t] = sums_cpu[r].clone()
                self._weights[t] = wsum_l[r]
                self._counts[t] = cnt_l[r]

    def finalize(self, tokens: Mapping[int, str] | None = None, settings: dict[str, Any] | None = None) -> Fingerprints:
        """Eq. 9: normalize each class sum; classes of zero total weight are dropped."""
        keep = [t for t in sorted(self._sums) if self._weights[t] > 0 and float(self._sums[t].norm()) > 0]
        if keep:
            sums = torch.stack([self._sums[t] for t in keep])
            vectors = (sums / sums.norm(dim=-1, keepdim=True)).to(torch.float32)
        else:
            dim = next(iter(self._sums.values())).numel() if self._sums else 0
            vectors = torch.zeros(0, dim, dtype=torch.float32)
        counted = self._n_docs is not None
        return Fingerprints(
            token_ids=torch.tensor(keep, dtype=torch.int64),
            vectors=vectors,
            weights=torch.tensor([self._weights[t] for t in keep], dtype=torch.float32),
            counts=torch.tensor([self._counts[t] for t in keep], dtype=torch.int64),
            tokens=[tokens.get(t, "") for t in keep] if tokens is not None else [],
            settings=dict(settings or {}),
            doc_freq=torch.tensor([self._doc_freq.get(t, 0) for t in keep], dtype=torch.int64) if counted else None,
            n_docs=self._n_docs or 0,
        )


def build_fingerprints(hidden: Tensor, saliency: Tensor, token_ids: Tensor, mask: Tensor) -> Fingerprints:
    """Saliency-weighted token-class fingerprints (eq. 8-9) from one batch.

    Args:
        hidden: ``[B, T, D]`` last-layer hidden states.
        saliency: ``[B, T]`` ``alpha`` from :func:`token_saliency`.
        token_ids: ``[B, T]`` token classes.
        mask: ``[B, T]`` bool, the positions that may contribute (scope, no specials, no pad).

    For several batches use :class:`FingerprintBuilder` directly.
    """
    b = FingerprintBuilder()
    b.add(hidden, saliency, token_ids, mask)
    return b.finalize()


def idf(doc_freq: Tensor, n_docs: int) -> Tensor:
    """Smoothed inverse document frequency over the target examples (``token_weighting: idf``).

    ``idf(t) = ln((N + 1) / (df(t) + 1)) + 1``, with ``N`` the number of target examples and
    ``df(t)`` the number of them in which class ``t`` occurs at a fingerprinted position
    (:meth:`FingerprintBuilder.count_documents`). The ``+ 1`` inside keeps it finite; the
    outer ``+ 1`` keeps every weight ``>= 1 > 0`` (``df <= N``), so a class found in every
    target example still counts, just least: the weights range over ``[1, 1 + ln((N+1)/2)]``.

    Why the target set, not the pool: the paper's only hint is App. A ("Connection to
    Linguistic Collapse", item iii): "By emphasizing TF-IDF-weighted, task-specific tokens,
    TRIM may preferentially retain examples that reinforce useful token centroids for the
    downstream task"; eq. 13 itself weights every token alike. Counting
    ``df`` over the target examples needs no pass over the pool (Stage I reads the target
    anyway, ``fit`` never sees the pool, and a pool-side count made while scoring would make
    a record's score depend on the records read before it), and it is the set the
    fingerprints describe: a class in every target example (digits, ``the``, ``?`` for
    GSM8K) says little about which example a record resembles, one in a single example is
    specific. ``tf`` needs no factor: each occurrence of a class in a record is its own
    term of eq. 13's sum already.

    Args:
        doc_freq: ``[F]`` document frequency of each fingerprint class.
        n_docs: ``N``.

    Returns:
        ``[F]`` float32.
    """
    df = doc_freq.to(torch.float64)
    return (torch.log((float(n_docs) + 1.0) / (df + 1.0)) + 1.0).to(torch.float32)


# --------------------------------------------------------------------------- Stage II


class NearestClassTable:
    """Maps a token class to its fingerprint row: itself if fingerprinted, else eq. 11.

    The nearest fingerprinted class (cosine of input embeddings) is looked up lazily,
    only for the unseen ids actually met, and cached, so scoring never does an
    ``O(V x F)`` matmul per batch.
    """

    def __init__(self, fingerprints: Fingerprints, embeddings: Tensor) -> None:
        vocab = int(embeddings.shape[0])
        self.fingerprints = fingerprints
        self._emb = embeddings
        device = embeddings.device
        self._direct = torch.full((vocab,), -1, dtype=torch.int64, device=device)
        ids = fingerprints.token_ids.to(device)
        if ids.numel() and int(ids.max()) >= vocab:
            raise ValueError(f"fingerprint token id {int(ids.max())} outside the embedding table (V={vocab})")
        self._direct[ids] = torch.arange(len(ids), device=device)
        self._nearest = torch.full((vocab,), -2, dtype=torch.int64, device=device)  # -2: not computed
        fe = embeddings[ids].float() if ids.numel() else embeddings[:0].float()
        self._fp_emb = fe / fe.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        self.vocab = vocab
        #: where the lookup tables live (the embeddings' device): token ids are moved here to look up
        self.device = device
        #: the fingerprint vectors on the embeddings' device, so scoring does not copy them per batch
        self.vectors = fingerprints.vectors.to(device=device, dtype=torch.float32)
        self._idf: Tensor | None = None  # token_weighting: idf, computed on first use

    def idf_weights(self, token_ids: Tensor, in_m: Tensor, *, filled: bool = False) -> Tensor:
        """``[B, T]`` float32 ``idf`` of the fingerprint class each token is matched against
        (its own class, or its nearest one under eq. 11's backoff); 0 outside ``in_m``.

        ``filled``: as in :meth:`rows` (every id was :meth:`prefill`-ed)."""
        if self._idf is None:
            self._idf = self.fingerprints.idf().to(self._direct.device)
        ids = token_ids.to(self._direct.device).clamp(min=0, max=self.vocab - 1)
        rows, _ = self.rows(ids, filled=filled)
        m = in_m.to(rows.device) & (rows >= 0)
        w = self._idf[rows.clamp(min=0)] if len(self.fingerprints) else torch.zeros(rows.shape, device=rows.device)
        return torch.where(m, w, torch.zeros_like(w))

    def prefill(self, token_ids: Tensor) -> None:
        """Look up the nearest class of every id given now (e.g. a chunk's unique ids), so that
        :meth:`rows` with ``filled=True`` needs no data-dependent step (no device sync)."""
        self.rows(token_ids.to(self._direct.device))

    def rows(self, token_ids: Tensor, *, filled: bool = False) -> tuple[Tensor, Tensor]:
        """Return ``(row, is_direct)`` for each id: the fingerprint row used and whether it is the id's own.

        ``filled=True``: every id was :meth:`prefill`-ed, skip the lookup of unseen ids."""
        direct = self._direct[token_ids]
        is_direct = direct >= 0
        missing = token_ids[~is_direct] if not filled else token_ids[:0]
        if missing.numel():
            uniq = torch.unique(missing)
            todo = uniq[self._nearest[uniq] == -2]
            if todo.numel():
                self._fill(todo)
        nearest = self._nearest[token_ids]
        return torch.where(is_direct, direct, nearest), is_direct

    def _fill(self, ids: Tensor) -> None:
        if self._fp_emb.shape[0] == 0:
            self._nearest[ids] = -1
            return
        e = self._emb[ids].float()
        e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        sim = e @ self._fp_emb.T  # [n_oov, F], eq. 11
        self._nearest[ids] = sim.argmax(-1)


def token_scores(
    fingerprints: Fingerprints,
    hidden: Tensor,
    token_ids: Tensor,
    scored_mask: Tensor,
    embeddings: Tensor | None = None,
    *,
    oov_penalty: float | None = 1.0,
    table: NearestClassTable | None = None,
    checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token match scores ``s_j`` (eq. 10-12) and the scored set ``M(c)`` (eq. 14).

    ``checked=True``: the caller has verified the ids are inside the embedding table and
    :meth:`NearestClassTable.prefill`-ed them, so nothing here reads the device (Stage II's loop).

    Returns:
        ``(s, in_m, direct)``: ``s [B,T]`` float32 (0 outside ``M``), ``in_m [B,T]`` bool,
        ``direct [B,T]`` bool (True where the token's own class was fingerprinted).
    """
    if table is None:
        if embeddings is None:
            raise ValueError("token_scores needs embeddings or a NearestClassTable")
        table = NearestClassTable(fingerprints, embeddings)
    scored = scored_mask.bool()
    ids = token_ids.to(table._direct.device)
    outside = (ids < 0) | (ids >= table.vocab)
    if not checked and bool((outside & scored.to(ids.device)).any()):
        from coreselect.errors import CoreselectError

        bad = int(ids[outside & scored.to(ids.device)][0])
        raise CoreselectError(
            f"token id {bad} is outside the model's embedding table (V={table.vocab}): "
            "the tokenizer does not match the model"
        )
    rows, direct = table.rows(
        ids.clamp(min=0, max=table.vocab - 1), filled=checked
    )  # only unscored (pad) ids are clamped
    has_fp = rows >= 0
    in_m = scored & (direct | (has_fp & (oov_penalty is not None)))
    vec = table.vectors if table.fingerprints is fingerprints else fingerprints.vectors
    vec = vec.to(device=hidden.device, dtype=torch.float32)  # no-op when already there
    h = hidden.float()
    h_hat = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    safe_rows = torch.where(in_m, rows, torch.zeros_like(rows))
    if len(fingerprints) == 0:
        s = torch.zeros(h.shape[:2], dtype=torch.float32, device=h.device)
    else:
        s = (h_hat * vec[safe_rows]).sum(-1)  # eq. 10: cos(h_hat, f_t), f_t is unit
    if oov_penalty is not None:
        s = torch.where(direct, s, s * float(oov_penalty))  # eq. 12
    s = torch.where(in_m, s, torch.zeros_like(s))
    return s, in_m, direct & in_m


#: ``n_0`` of the explicit length term of eq. 15 (``coverage="length"``): kappa = n / (n + n_0)
#: reaches 1/2 at 32 scored tokens, about the template overhead of SmolLM2's chat template
#: (the prior the literal ``tokens`` reading gives with that template).
COVERAGE_LENGTH_N0 = 32.0


def coverage_term(
    n_scored: Tensor, attention_mask: Tensor, coverage: str = "tokens", content: Tensor | None = None
) -> Tensor:
    """``kappa(c)`` of eq. 15 under one of three readings of ``|c|``.

    * ``tokens``: ``|M(c)| / |c|``, ``|c|`` = the record's non-pad tokens, template and
      special tokens included (the literal reading). With OOV backoff every content token
      is in ``M(c)``, so this is ``n / (n + t)`` with ``t`` the template's token count: a
      length prior whose strength depends on the model's chat template.
    * ``content``: ``|M(c)| / |content(c)|``, the share of the in-scope content tokens
      that are scored. With OOV backoff (and ``min_context = 0``) it is 1 for every record,
      i.e. no coverage term at all; it only bites with ``oov_penalty = None``.
    * ``length``: ``|M(c)| / (|M(c)| + n_0)`` with ``n_0 =`` :data:`COVERAGE_LENGTH_N0`:
      the same saturating length prior made explicit and template-independent.

    Measured (SmolLM2, demo pool, docs/performance.md): SmolLM2's template is 30-32 tokens,
    so ``length`` and ``tokens`` rank the pool identically (Spearman 1.0000 for the GSM8K and
    CSQA targets); ``content`` (= no prior, like ``eta = 0``) lowers the CSQA target source's
    AUC from 0.9933 to 0.9916. TRIM's default is ``length``; this function's default stays
    the literal ``tokens``.

    Args:
        n_scored: ``[B]`` ``|M(c)|``.
        attention_mask: ``[B, T]`` 0/1.
        coverage: ``tokens``, ``content`` or ``length``.
        content: ``[B, T]`` bool, the in-scope content tokens (needed for ``content``).
    """
    n = n_scored.float()
    if coverage == "tokens":
        return n / attention_mask.bool().sum(-1).clamp(min=1).float()
    if coverage == "content":
        if content is None:
            raise ValueError("coverage='content' needs the content mask")
        return n / content.bool().sum(-1).clamp(min=1).float()
    if coverage == "length":
        return n / (n + COVERAGE_LENGTH_N0)
    raise ValueError(f"coverage must be tokens, content or length, got {coverage!r}")


def pool_scores(
    s: Tensor,
    in_m: Tensor,
    attention_mask: Tensor,
    *,
    w_mean: float = 0.5,
    w_max: float = 0.5,
    coverage_weight: float = 0.05,
    coverage: str = "tokens",
    content: Tensor | None = None,
    token_weights: Tensor | None = None,
    min_tokens: int = 0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Robust pooling with coverage, eq. 13-15.

    ``coverage`` and ``content`` choose ``kappa(c)``, see :func:`coverage_term`.

    Two changes to eq. 13's mean ``mu(c)``, the only token average in ``S(c)`` (the max
    ``m(c)`` and the count ``|M(c)|`` of ``kappa(c)`` are not averages and stay as they are);
    both off by default, which runs exactly the paper's arithmetic:

    * ``token_weights`` ``w [B, T]`` (``token_weighting: idf``: :meth:`NearestClassTable.idf_weights`):
      ``mu(c) = sum_{j in M} w_j s_j / sum_{j in M} w_j``, a weighted mean. Equal weights
      give the paper's mean; scaling all weights changes nothing.
    * ``min_tokens`` ``n_min`` (``0``: off): ``mu'(c) = mu(c) * |M(c)| / max(|M(c)|, n_min)``,
      i.e. ``sum s_j / n_min`` (unweighted) for a record with fewer than ``n_min`` scored
      tokens, shrinking its mean towards 0 as if the missing tokens matched with cosine 0;
      records with ``|M(c)| >= n_min`` keep the paper's score. It answers "a few tokens that all
      match strongly outrank a full solution": the mean of 3 digit tokens has little
      evidence behind it, and the shrinkage puts a floor on the evidence a mean needs.

    Returns:
        ``(score [B], parts)`` with ``parts`` = ``mean`` (after the two options), ``max``,
        ``coverage``, ``n_scored``. A record with ``|M(c)| = 0`` scores ``-inf``.
    """
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
    n = in_m.sum(-1)
    if token_weights is None:
        mean = torch.where(n > 0, s.sum(-1) / n.clamp(min=1).float(), torch.zeros_like(s[:, 0]))
    else:
        w = torch.where(in_m, token_weights.float(), torch.zeros_like(s))
        w_sum = w.sum(-1)
        mean = torch.where(w_sum > 0, (w * s).sum(-1) / w_sum.clamp(min=1e-30), torch.zeros_like(s[:, 0]))
    if min_tokens > 0:
        mean = mean * (n.float() / n.clamp(min=min_tokens).float())
    neg = torch.full_like(s, float("-inf"))
    mx = torch.where(in_m, s, neg).amax(-1)
    kappa = coverage_term(n, attention_mask, coverage, content)
    score = w_mean * mean + w_max * mx + coverage_weight * kappa  # eq. 15
    score = torch.where(n > 0, score, torch.full_like(score, float("-inf")))
    return score, {"mean": mean, "max": torch.where(n > 0, mx, torch.zeros_like(mx)), "coverage": kappa, "n_scored": n}


def score_examples(
    fingerprints: Fingerprints,
    hidden: Tensor,
    token_ids: Tensor,
    scored_mask: Tensor,
    attention_mask: Tensor,
    embeddings: Tensor,
    *,
    oov_penalty: float | None = 1.0,
    w_mean: float = 0.5,
    w_max: float = 0.5,
    coverage_weight: float = 0.05,
    table: NearestClassTable | None = None,
    token_weighting: str = "none",
    min_tokens: int = 0,
) -> Tensor:
    """Stage II example scores ``S(c)`` (eq. 10-15).

    Args:
        fingerprints: the dictionary from Stage I.
        hidden: ``[B, T, D]`` last-layer hidden states of the candidates.
        token_ids: ``[B, T]``.
        scored_mask: ``[B, T]`` bool, tokens in scope and not special (eq. 14 before the
            OOV rule).
        attention_mask: ``[B, T]`` 0/1; its row sums are ``|c|`` of eq. 15.
        embeddings: ``[V, E]`` input-embedding matrix (eq. 11).
        oov_penalty: ``lambda`` of eq. 12; ``None`` skips unseen classes instead.
        w_mean, w_max, coverage_weight: ``w_mu``, ``w_m``, ``eta`` of eq. 15.
        table: an optional cached :class:`NearestClassTable` to reuse across batches.
        token_weighting: ``none`` (paper) or ``idf`` (eq. 13's mean weighted by :func:`idf`
            of the matched class; the fingerprints need ``doc_freq``).
        min_tokens: the minimum token count of eq. 13's mean, see :func:`pool_scores`.

    Returns:
        ``[B]`` float32 scores; ``-inf`` for a record with no scored token.
    """
    if token_weighting not in ("none", "idf"):
        raise ValueError(f"token_weighting must be none or idf, got {token_weighting!r}")
    if table is None:
        table = NearestClassTable(fingerprints, embeddings)
    s, in_m, _ = token_scores(
        fingerprints, hidden, token_ids, scored_mask, embeddings, oov_penalty=oov_penalty, table=table
    )
    weights = table.idf_weights(token_ids, in_m) if token_weighting == "idf" else None
    score, _ = pool_scores(
        s,
        in_m,
        attention_mask,
        w_mean=w_mean,
        w_max=w_max,
        coverage_weight=coverage_weight,
        token_weights=weights,
        min_tokens=min_tokens,
    )
    return score
