"""Model-based baselines of TRIM App. C: RDS, LESS, TAGCOS, S2L and CLD.

All checkpoint-based methods read the warmup's ``checkpoint-*`` PEFT adapters (see
:mod:`coreselect.methods.baselines.gradients`) on an un-merged base model. The paper runs
CLD / S2L on trajectories of a full-pool training run; here, by default, they use the same
warmup checkpoints as LESS (pass other ``checkpoints`` to use a full-pool run).

Task-agnostic, budgeted methods (TAGCOS, S2L) select a set rather than rank; their
``score`` returns values whose top-``budget`` *is* that set: chosen records score in
``(2, 4)``, the others in ``[-1, 1]`` (TAGCOS: cosine to their cluster centre; S2L: a seeded
uniform key in ``[0, 1)``).

Several named targets (issue 14 §1): RDS and LESS are ``multi_target``. The target side is
fitted per target (RDS: one centroid, or one set of target representations for ``max``, per
target; LESS: one set of target gradient features per target and checkpoint), computed for
each target exactly as a single-target run computes it; the pool side (RDS: last-token
hidden states; LESS: Adam-aware projected gradients per checkpoint) is computed ONCE per
record and scored against every target, so one run costs one pool pass and column k equals
a single-target run on target k. TAGCOS, S2L and CLD keep one target (TAGCOS and S2L do not
read it; CLD goes through the per-target fallback).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from coreselect.data.formatting import pad_id
from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.methods.base import (
    MethodContext,
    ScoreChunk,
    SelectionMethod,
    TargetSets,
    chunk_from_scores,
    peak_memory_mb,
    record_chunks,
    scores_from_chunks,
)
from coreselect.methods.baselines.gradients import (
    AdapterSwitcher,
    FeatureStats,
    Projector,
    adam_moments,
    gradient_features,
    load_checkpoints,
    per_example_losses,
    warmup_checkpoints,
)
from coreselect.methods.multi import WholePoolMethod
from coreselect.methods.registry import register
from coreselect.models.runner import token_budget_batches
from coreselect.train.lora import Checkpoint


# ------------------------------------------------------------------------------ pure helpers
def omp_select(features: np.ndarray, target: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal Matching Pursuit: ``k`` rows of ``features`` whose span best fits ``target``.

    Uses :class:`sklearn.linear_model.OrthogonalMatchingPursuit` (no intercept) with
    ``features.T`` as the dictionary. Returns ``(chosen row indices, their weights)``; when
    OMP stops early (target already fitted / linear dependence) fewer than ``k`` rows come
    back and the caller fills up.
    """
    import warnings

    from sklearn.linear_model import OrthogonalMatchingPursuit

    n = features.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    if not np.any(target) or not np.any(features):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    omp = OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ended prematurely due to linear dependence"
        omp.fit(np.asarray(features, dtype=np.float64).T, np.asarray(target, dtype=np.float64))
    coef = np.atleast_1d(omp.coef_)  # scikit-learn returns a scalar for a one-column dictionary
    idx = np.flatnonzero(coef)
    return idx.astype(np.int64), coef[idx]


def kmeans_labels(x: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Seeded k-means (scikit-learn, ``n_init=10``); ``n_clusters`` is capped at the number of
    distinct rows."""
    from sklearn.cluster import KMeans

    n_distinct = len(np.unique(np.round(x, 12), axis=0))
    c = max(1, min(int(n_clusters), n_distinct))
    if c == 1:
        return np.zeros(len(x), dtype=np.int64)
    return KMeans(n_clusters=c, random_state=seed, n_init=10).fit_predict(x).astype(np.int64)


def default_clusters(n: int) -> int:
    """``min(100, max(1, n // 10))`` (S2L and TAGCOS use up to 100 clusters)."""
    return min(100, max(1, n // 10))


def balanced_sample(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """S2L's balanced sampling: visit clusters from smallest to largest; each takes
    ``min(size, remaining_budget // remaining_clusters)`` members uniformly at random (seeded),
    so small clusters are taken whole and the rest share the budget equally. Returns sorted
    positions (exactly ``min(k, n)`` of them)."""
    rng = np.random.default_rng(seed)
    ids, sizes = np.unique(labels, return_counts=True)
    order = np.lexsort((ids, sizes))
    left, chosen = min(int(k), len(labels)), []
    for j, c in enumerate(order):
        members = np.flatnonzero(labels == ids[c])
        take = min(len(members), left // (len(order) - j))
        chosen.append(rng.choice(members, size=take, replace=False))
        left -= take
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def proportional_shares(sizes: np.ndarray, k: int) -> np.ndarray:
    """Budget per cluster proportional to its size (largest remainder, ties to lower id)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    raw = k * sizes / sizes.sum()
    share = np.minimum(np.floor(raw).astype(np.int64), sizes)
    frac = raw - share
    for c in np.lexsort((np.arange(len(sizes)), -frac)):
        if share.sum() >= k:
            break
        if share[c] < sizes[c]:
            share[c] += 1
    return share


def cld_scores(pool_losses: np.ndarray, target_losses: np.ndarray) -> np.ndarray:
    """CLD: Pearson correlation between each record's epoch-to-epoch loss differences and the
    target set's mean difference vector.

    ``pool_losses`` is ``[n, C]`` and ``target_losses`` ``[q, C]`` (C checkpoints, oldest first,
    C >= 3). A record whose difference vector has zero variance (or any NaN loss: no target
    token), or a target mean with zero variance, scores 0.
    """
    pool_losses, target_losses = np.asarray(pool_losses, np.float64), np.asarray(target_losses, np.float64)
    if pool_losses.shape[1] < 3 or target_losses.shape[1] != pool_losses.shape[1]:
        raise ConfigError(
            f"CLD needs the same >= 3 checkpoints for pool and target, got "
            f"{pool_losses.shape[1]} and {target_losses.shape[1]}"
        )
    t = np.nanmean(np.diff(target_losses, axis=1), axis=0)
    d = np.diff(pool_losses, axis=1)
    dc = d - d.mean(axis=1, keepdims=True)
    tc = t - t.mean()
    den = np.linalg.norm(dc, axis=1) * np.linalg.norm(tc)
    ok = np.isfinite(den) & (den > 1e-12) & np.isfinite(dc).all(axis=1)
    out = np.zeros(len(d), dtype=np.float64)
    out[ok] = (dc[ok] @ tc) / den[ok]
    return np.clip(out, -1.0, 1.0)


def _budget(budget: str | int, n: int) -> int:
    from coreselect.selection import parse_budget

    return parse_budget(budget, n)


# ------------------------------------------------------------------------------ configs
@dataclass
class RDSConfig:
    """Options of ``rds``.

    Attributes:
        aggregate: ``mean`` (cosine to the mean target representation) or ``max`` over targets.
        batch_tokens: padded-token budget per forward batch.
        chunk_records: records scored together (inherited from the run's ``--shard-records``).
    """

    aggregate: str = "mean"
    batch_tokens: int = 8192
    chunk_records: int = 2048

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "max"):
            raise ConfigError(f"rds aggregate must be mean or max, got {self.aggregate!r}")
        if self.batch_tokens < 1 or self.chunk_records < 1:
            raise ConfigError("batch_tokens and chunk_records must be >= 1")


@dataclass
class CheckpointConfig:
    """Options shared by the checkpoint methods (LESS, TAGCOS, S2L, CLD).

    Attributes:
        checkpoints: PEFT checkpoint folders, oldest first (default: the warmup's ``checkpoint-*``).
        seed: seeds projections, k-means and sampling (inherited from the run's ``--seed``).
    """

    checkpoints: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class GradientConfig(CheckpointConfig):
    """Options of the gradient methods (LESS, TAGCOS).

    Attributes:
        proj_dim: Rademacher projection size (capped at the number of LoRA weights).
        optimizer: ``adam`` (Adam-aware pool gradients from the saved moments) or ``sgd``.
        proj_batch: gradients projected together.
    """

    proj_dim: int | None = 8192
    optimizer: str = "adam"
    proj_batch: int = 32

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be adam or sgd, got {self.optimizer!r}")


@dataclass
class TAGCOSConfig(GradientConfig):
    """Options of ``tagcos``.

    Attributes:
        n_clusters: k-means clusters (default ``min(100, n // 10)``).
    """

    n_clusters: int | None = None


@dataclass
class S2LConfig(CheckpointConfig):
    """Options of ``s2l``.

    Attributes:
        n_clusters: k-means clusters (default ``min(100, n // 10)``).
        batch_tokens: padded-token budget per forward batch of the loss trajectories.
    """

    n_clusters: int | None = None
    batch_tokens: int = 4096


@dataclass
class CLDConfig(CheckpointConfig):
    """Options of ``cld``.

    Attributes:
        batch_tokens: padded-token budget per forward batch of the losses.
    """

    batch_tokens: int = 4096


def _base_and_checkpoints(name: str, config: CheckpointConfig, ctx: MethodContext, need: int) -> tuple[Any, Any, list]:
    """The *base* model (no adapter, loaded like the scorer) and the checkpoints to read."""
    from coreselect.models.loading import load_model

    model = ctx.require_model(name)
    ckpts = load_checkpoints(config.checkpoints) if config.checkpoints else warmup_checkpoints(model.warmup, name, need)
    base, _ = load_model(ctx.model_name, dtype=ctx.dtype, device=ctx.device, trust_remote_code=ctx.trust_remote_code)
    return base, model, ckpts


# ------------------------------------------------------------------------------ RDS
@register("rds", config=RDSConfig)
class RDSMethod(SelectionMethod):
    """RDS as LESS implements it (Xia et al. 2024; TRIM App. C).

    Representation: the final-layer hidden state (``ModelRunner.hidden``, the warmed-up
    scoring model) of the *last non-pad token* of the formatted record, unit-normalized.
    Score: with ``aggregate="mean"`` (default) the cosine to the mean of the unit target
    representations (same ranking as LESS's mean over targets of cosines); with ``"max"``
    the maximum cosine over target examples. Uses the final warmup model only (not LESS's
    checkpoint-averaged variant). Streaming: each record's score depends only on itself.
    Several named targets: one centroid (``max``: one set of representations) per target,
    each pool record's representation computed once and scored against every target.
    """

    name: ClassVar[str] = "rds"
    needs_model: ClassVar[bool] = True
    uses_warmup: ClassVar[bool] = True
    streaming: ClassVar[bool] = True
    #: several targets natively: per-target centroids, one forward pass per pool record
    multi_target: ClassVar[bool] = True
    #: the fitted target representations (:meth:`save_state`); several targets:
    #: ``rds_targets-<name>.safetensors`` per target
    STATE_FILE: ClassVar[str] = "rds_targets.safetensors"

    def __init__(
        self,
        runner: Any,
        formatter: Any,
        aggregate: Literal["mean", "max"] = "mean",
        batch_tokens: int = 8192,
        chunk_records: int = 2048,
    ) -> None:
        super().__init__()
        if aggregate not in ("mean", "max"):
            raise ConfigError(f"rds aggregate must be mean or max, got {aggregate!r}")
        self.runner, self.formatter = runner, formatter
        self.aggregate, self.batch_tokens, self.chunk_records = aggregate, int(batch_tokens), int(chunk_records)
        self.targets: torch.Tensor | None = None  # the (first) target's representations
        #: several targets: name -> that target's representations (empty for one target)
        self.target_reps: dict[str, torch.Tensor] = {}

    @classmethod
    def create(cls, config: Any, ctx: MethodContext) -> RDSMethod:
        model = ctx.require_model(cls.name)
        return cls(model.runner, model.formatter, config.aggregate, config.batch_tokens, config.chunk_records)

    @staticmethod
    def target_state_file(name: str) -> str:
        return f"rds_targets-{name}.safetensors"

    def save_state(self, out: Path) -> list[Path]:
        from safetensors.torch import save_file

        from coreselect.io import atomic_path

        if self.targets is None:
            return []
        if self.target_reps:
            files = {out / self.target_state_file(n): t for n, t in self.target_reps.items()}
        else:
            files = {out / self.STATE_FILE: self.targets}
        for path, t in files.items():
            with atomic_path(path) as tmp:
                save_file({"targets": t.contiguous()}, str(tmp), metadata={"aggregate": self.aggregate})
        return list(files)

    def load_state(self, out: Path) -> bool:
        from safetensors.torch import load_file

        if len(self.target_names) > 1:
            paths = {n: out / self.target_state_file(n) for n in self.target_names}
            if not all(p.is_file() for p in paths.values()):
                return False
            self.target_reps = {n: load_file(str(p))["targets"] for n, p in paths.items()}
            self.targets = next(iter(self.target_reps.values()))
            return True
        path = out / self.STATE_FILE
        if not path.is_file():
            return False
        self.targets = load_file(str(path))["targets"]
        self.target_reps = {}
        return True

    def _reps(self, records: Sequence[Record]) -> tuple[torch.Tensor, np.ndarray]:
        enc = self.formatter.encode_many(list(records))
        self.n_truncated += sum(e.truncated for e in enc)
        out = torch.zeros(len(enc), 0)
        for pos in token_budget_batches([len(e) for e in enc], self.batch_tokens):
            batch = self.runner.collate(enc, pos, "right")
            h = self.runner.hidden(batch)
            last = batch.attention_mask.sum(1) - 1
            rep = h[torch.arange(h.shape[0], device=h.device), last].float().cpu()
            if out.shape[1] == 0:
                out = torch.zeros(len(enc), rep.shape[1])
            out[pos] = rep
            self.cost.forward_passes += len(pos)
        return torch.nn.functional.normalize(out, dim=1), np.array([len(e) for e in enc], dtype=np.int64)

    def _target_reps(self, target: Sequence[Record], name: str = "") -> torch.Tensor:
        """One target's representations: its unit centroid (``mean``) or every example's (``max``)."""
        if not target:
            raise ConfigError(f"rds needs at least one target example{f' (target {name})' if name else ''}")
        reps, _ = self._reps(target)
        return torch.nn.functional.normalize(reps.mean(0, keepdim=True), dim=1) if self.aggregate == "mean" else reps

    def fit(self, target: Sequence[Record]) -> RDSMethod:
        t0 = time.perf_counter()
        self.targets = self._target_reps(target)
        self.target_reps = {}
        self._account(t0)
        return self

    def fit_targets(self, targets: TargetSets) -> RDSMethod:
        """One target: :meth:`fit`. Several: one centroid (or set of representations) per target."""
        if len(targets) <= 1:
            return self.fit(next(iter(targets.values()), []))
        t0 = time.perf_counter()
        for name, recs in targets.items():
            if not recs:
                raise ConfigError(f"rds needs at least one target example (target {name})")
        self.target_reps = {name: self._target_reps(recs, name) for name, recs in targets.items()}
        self.targets = next(iter(self.target_reps.values()))
        self._account(t0)
        return self

    def _account(self, t0: float) -> None:
        self.cost.peak_memory_mb = max(self.cost.peak_memory_mb, peak_memory_mb(self.runner.device))

    def score_chunks(
        self, pool: Iterable[Record], total: int | None = None, chunk_records: int | None = None
    ) -> Iterator[ScoreChunk]:
        for chunk in record_chunks(pool, chunk_records or self.chunk_records):
            yield self.score_batch(chunk)

    def score_batch(self, records: Sequence[Record]) -> ScoreChunk:
        if self.targets is None:
            raise CoreselectError("RDSMethod.score called before fit")
        t0 = time.perf_counter()
        reps, n_tok = self._reps(records)  # once per record, whatever the number of targets
        sets = self.target_reps or {"": self.targets}
        per = {name: (reps @ t.T).max(dim=1).values.double().numpy() for name, t in sets.items()}
        self._account(t0)
        chunk = chunk_from_scores(records, next(iter(per.values())), n_tokens=n_tok)
        if self.target_reps:
            chunk.targets = per
        return chunk

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        return scores_from_chunks(self.score_chunks(pool))

    def settings(self) -> dict[str, Any]:
        return {"representation": "last non-pad token, final layer, unit norm", "aggregate": self.aggregate}


# ------------------------------------------------------------------------------ checkpoint base
class _CheckpointMethod(SelectionMethod):
    """Holds the base model, the checkpoints and the shared feature / loss code."""

    needs_model: ClassVar[bool] = True
    uses_warmup: ClassVar[bool] = True

    def __init__(
        self, base_model: Any, tokenizer: Any, formatter: Any, checkpoints: Sequence[Checkpoint | str], seed: int = 0
    ) -> None:
        super().__init__()
        if not checkpoints:
            raise ConfigError(f"{self.name} needs at least one checkpoint")
        self.checkpoints = [c if isinstance(c, Checkpoint) else load_checkpoints([c])[0] for c in checkpoints]
        self.switcher = AdapterSwitcher(base_model)
        self.tokenizer, self.formatter, self.seed = tokenizer, formatter, int(seed)
        self.pad_id = pad_id(tokenizer)

    def _encode(self, records: Sequence[Record]) -> list[Any]:
        enc = self.formatter.encode_many(list(records))
        self.n_truncated += sum(e.truncated for e in enc)
        return enc

    @property
    def _device(self) -> torch.device:
        return next(self.switcher.base.parameters()).device

    def _account(self, t0: float) -> None:
        self.cost.peak_memory_mb = max(self.cost.peak_memory_mb, peak_memory_mb(self._device))

    def _losses(self, records: Sequence[Record], batch_tokens: int) -> np.ndarray:
        """``[n, C]`` per-record response losses at every checkpoint (oldest first)."""
        enc = self._encode(records)
        cols = []
        for ck in self.checkpoints:
            model = self.switcher.activate(ck.path)
            cols.append(per_example_losses(model, enc, self.pad_id, batch_tokens))
            self.cost.forward_passes += len(enc)
        return np.stack(cols, axis=1) if cols else np.zeros((len(enc), 0))


class _GradientMethod(_CheckpointMethod):
    def __init__(
        self,
        base_model: Any,
        tokenizer: Any,
        formatter: Any,
        checkpoints: Sequence[Checkpoint | str],
        proj_dim: int | None = 8192,
        seed: int = 0,
        optimizer: Literal["adam", "sgd"] = "adam",
        proj_batch: int = 32,
    ) -> None:
        super().__init__(base_model, tokenizer, formatter, checkpoints, seed)
        if optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be adam or sgd, got {optimizer!r}")
        self.proj_dim, self.optimizer, self.proj_batch = proj_dim, optimizer, int(proj_batch)
        self.pool_gradient: dict[str, str] = {}
        self.feature_dim = 0

    def _features(self, ck: Checkpoint, records: Sequence[Record], adam: bool) -> torch.Tensor:
        return self._features_sets(ck, [records], adam)[0]

    def _features_sets(self, ck: Checkpoint, sets: Sequence[Sequence[Record]], adam: bool) -> list[torch.Tensor]:
        """Features of each record set at ``ck`` (one adapter activation; each set computed as
        :meth:`_features` computes it alone, so a set's features do not depend on the others)."""
        encs = [self._encode(records) for records in sets]
        model = self.switcher.activate(ck.path)
        params = self.switcher.params
        dim = sum(p.numel() for p in params)
        proj = Projector(dim, self.proj_dim, self.seed)
        self.feature_dim = proj.k
        moments = None
        if adam and self.optimizer == "adam":
            moments = adam_moments(ck.path, params)
            self.pool_gradient[ck.path.name] = "adam" if moments is not None else "sgd (no optimizer state)"
        out = []
        for enc in encs:
            stats = FeatureStats()
            out.append(gradient_features(model, params, enc, self.pad_id, proj, moments, stats, self.proj_batch))
            self.cost.forward_passes += stats.forward_passes
            self.cost.backward_passes += stats.backward_passes
        return out

    def settings(self) -> dict[str, Any]:
        return {
            "checkpoints": [str(c.path) for c in self.checkpoints],
            "lrs": [c.lr for c in self.checkpoints],
            "proj_dim": self.proj_dim,
            "feature_dim": self.feature_dim,
            "projection": "rademacher",
            "lora_modules": list(self.switcher.modules),
            "seed": self.seed,
            "optimizer": self.optimizer,
            "pool_gradient": dict(self.pool_gradient),
            "target_gradient": "sgd",
        }


# ------------------------------------------------------------------------------ LESS
@register("less", config=GradientConfig)
class LESSMethod(WholePoolMethod, _GradientMethod):
    """LESS (Xia et al. 2024): optimizer-aware LoRA gradient similarity over checkpoints.

    For each checkpoint: per-example gradients (batch size 1, token-mean response loss, eval
    mode so no dropout) w.r.t. the active LoRA weights; pool records get the Adam update
    built from the checkpoint's saved AdamW moments (``optimizer="adam"``; when a checkpoint
    has no optimizer state its pool gradients stay plain SGD and ``settings()["pool_gradient"]``
    says so), target records plain SGD gradients. Features are projected with a seeded
    Rademacher matrix to ``min(proj_dim, #LoRA weights)`` and unit-normalized.
    Score per checkpoint = mean over target examples of the cosine (LESS: mean over a task's
    validation examples, max over tasks; one task here); scores are summed over checkpoints
    weighted by ``lr_c / sum(lr)`` (``Checkpoint.lr``: mean lr since the previous checkpoint).
    Several named targets: one set of target features per target and checkpoint; each pool
    record's gradient is computed once per checkpoint and scored against every target (one
    score column per target, LESS's "max over tasks" left to the run's ``--combine``).
    """

    name: ClassVar[str] = "less"
    #: several targets natively: per-target target gradients, pool gradients computed once
    multi_target: ClassVar[bool] = True

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.target_feats: list[torch.Tensor] = []  # per checkpoint, the (first) target's
        #: several targets: name -> per-checkpoint target features (empty for one target)
        self.target_set_feats: dict[str, list[torch.Tensor]] = {}

    @classmethod
    def create(cls, config: Any, ctx: MethodContext) -> LESSMethod:
        base, m, ckpts = _base_and_checkpoints(cls.name, config, ctx, 1)
        return cls(
            base,
            m.tokenizer,
            m.formatter,
            ckpts,
            proj_dim=config.proj_dim,
            seed=config.seed,
            optimizer=config.optimizer,
            proj_batch=config.proj_batch,
        )

    def fit(self, target: Sequence[Record]) -> LESSMethod:
        if not target:
            raise ConfigError("less needs at least one target example")
        t0 = time.perf_counter()
        self.target_feats = [self._features(ck, target, adam=False) for ck in self.checkpoints]
        self.target_set_feats = {}
        self._account(t0)
        return self

    def fit_targets(self, targets: TargetSets) -> LESSMethod:
        """One target: :meth:`fit`. Several: target gradients per target (one activation per checkpoint)."""
        if len(targets) <= 1:
            return self.fit(next(iter(targets.values()), []))
        for name, recs in targets.items():
            if not recs:
                raise ConfigError(f"less needs at least one target example (target {name})")
        t0 = time.perf_counter()
        per_ck = [self._features_sets(ck, list(targets.values()), adam=False) for ck in self.checkpoints]
        self.target_set_feats = {name: [feats[j] for feats in per_ck] for j, name in enumerate(targets)}
        self.target_feats = next(iter(self.target_set_feats.values()))
        self._account(t0)
        return self

    def _score_targets(self, records: Sequence[Record]) -> dict[str, np.ndarray]:
        """Scores per target (key ``""`` for one target); pool gradients once per checkpoint."""
        if not self.target_feats:
            raise CoreselectError("LESSMethod.score called before fit")
        t0 = time.perf_counter()
        sets = self.target_set_feats or {"": self.target_feats}
        lrs = np.array([c.lr for c in self.checkpoints], dtype=np.float64)
        w = lrs / lrs.sum() if lrs.sum() > 0 else np.full(len(lrs), 1 / len(lrs))
        totals = {name: np.zeros(len(records), dtype=np.float64) for name in sets}
        for c, (wc, ck) in enumerate(zip(w, self.checkpoints, strict=True)):
            pf = self._features(ck, records, adam=True)
            for name, feats in sets.items():
                totals[name] += wc * (pf @ feats[c].T).mean(dim=1).double().numpy()
        self._account(t0)
        return totals

    def _named_targets(self) -> bool:
        return bool(self.target_set_feats)


# ------------------------------------------------------------------------------ TAGCOS
@register("tagcos", config=TAGCOSConfig)
class TAGCOSMethod(_GradientMethod):
    """TAGCOS (Zhang et al. 2025b): gradient clustering + OMP coreset, task-agnostic.

    Features: LESS's pool features (Adam-aware, projected, unit norm) at the *last*
    checkpoint only. k-means (seeded) with ``n_clusters`` (default ``min(100, n // 10)``); each
    cluster gets a budget share proportional to its size (largest remainder); within a cluster
    OMP (scikit-learn) fits the cluster's mean feature with ``share`` members. If OMP stops
    early, the remaining share goes to members closest (cosine) to the cluster centre.
    Scores: OMP-chosen records ``3 + tanh(OMP weight)`` in ``(2, 4)``, fill-ups ``2 + ~cos`` in
    ``(2, 3)``, all others their cosine to the cluster centre in ``[-1, 1]``, so the top
    ``budget`` is the selection. The target is not used.
    """

    name: ClassVar[str] = "tagcos"

    def __init__(
        self,
        base_model: Any,
        tokenizer: Any,
        formatter: Any,
        checkpoints: Sequence[Checkpoint | str],
        budget: str | int,
        n_clusters: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(base_model, tokenizer, formatter, list(checkpoints)[-1:], **kw)
        self.budget, self.n_clusters = budget, n_clusters

    @classmethod
    def create(cls, config: Any, ctx: MethodContext) -> TAGCOSMethod:
        base, m, ckpts = _base_and_checkpoints(cls.name, config, ctx, 1)
        return cls(
            base,
            m.tokenizer,
            m.formatter,
            ckpts,
            budget=ctx.budget,
            n_clusters=config.n_clusters,
            proj_dim=config.proj_dim,
            seed=config.seed,
            optimizer=config.optimizer,
            proj_batch=config.proj_batch,
        )

    def fit(self, target: Sequence[Record]) -> TAGCOSMethod:
        """Task-agnostic: the target is ignored."""
        return self

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        t0 = time.perf_counter()
        records = list(pool)
        k = _budget(self.budget, len(records))
        feats = self._features(self.checkpoints[-1], records, adam=True).double().numpy()
        scores = select_by_clusters_omp(
            feats, k, self.n_clusters or default_clusters(len(records)), self.seed, self.stats
        )
        self._account(t0)
        return scores

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "budget": str(self.budget), "n_clusters": self.n_clusters or "min(100, n//10)"}


def select_by_clusters_omp(
    feats: np.ndarray, k: int, n_clusters: int, seed: int, stats: dict[str, Any] | None = None
) -> np.ndarray:
    """TAGCOS selection on unit features ``[n, d]``: k-means, proportional shares, OMP per
    cluster; returns scores whose top-``k`` is the selection (see :class:`TAGCOSMethod`)."""
    n = len(feats)
    labels = kmeans_labels(feats, n_clusters, seed)
    ids, sizes = np.unique(labels, return_counts=True)
    shares = proportional_shares(sizes, k)
    scores = np.zeros(n, dtype=np.float64)
    n_fill = 0
    for c, share in zip(ids, shares):
        members = np.flatnonzero(labels == c)
        centre = feats[members].mean(axis=0)
        norm = np.linalg.norm(centre)
        cos = feats[members] @ (centre / norm) if norm > 0 else np.zeros(len(members))
        scores[members] = np.clip(cos, -1, 1)
        idx, w = omp_select(feats[members], centre, int(share))
        scores[members[idx]] = 3 + np.tanh(w)
        missing = int(share) - len(idx)
        if missing > 0:
            rest = np.setdiff1d(np.arange(len(members)), idx)
            fill = rest[np.lexsort((rest, -cos[rest]))][:missing]
            scores[members[fill]] = 2 + np.clip(cos[fill], 0, 1) * 0.999 + 1e-3
            n_fill += missing
    if stats is not None:
        stats.update(
            {"clusters": len(ids), "cluster_sizes": sizes.tolist(), "shares": shares.tolist(), "omp_fill_ups": n_fill}
        )
    return scores


# ------------------------------------------------------------------------------ S2L
@register("s2l", config=S2LConfig)
class S2LMethod(_CheckpointMethod):
    """S2L (Yang et al. 2024): cluster loss trajectories, sample clusters evenly.

    Trajectory of a record = its token-mean response loss at every checkpoint (oldest
    first; a record with no target token gets loss 0). k-means (seeded, ``n_clusters``
    default ``min(100, n // 10)``) on the trajectories, then :func:`balanced_sample` to
    ``budget``. Scores: sampled records ``2 + u``, others ``u`` with ``u`` a seeded uniform key
    in ``[0, 1)``, so the top ``budget`` is the sample. The target is not used. The paper
    trains the proxy on the whole pool; pass such a run's checkpoints for that (the CLI
    default uses the warmup's).
    """

    name: ClassVar[str] = "s2l"

    def __init__(
        self,
        base_model: Any,
        tokenizer: Any,
        formatter: Any,
        checkpoints: Sequence[Checkpoint | str],
        budget: str | int,
        n_clusters: int | None = None,
        seed: int = 0,
        batch_tokens: int = 4096,
    ) -> None:
        super().__init__(base_model, tokenizer, formatter, checkpoints, seed)
        self.budget, self.n_clusters, self.batch_tokens = budget, n_clusters, int(batch_tokens)

    @classmethod
    def create(cls, config: Any, ctx: MethodContext) -> S2LMethod:
        base, m, ckpts = _base_and_checkpoints(cls.name, config, ctx, 1)
        return cls(
            base,
            m.tokenizer,
            m.formatter,
            ckpts,
            budget=ctx.budget,
            n_clusters=config.n_clusters,
            seed=config.seed,
            batch_tokens=config.batch_tokens,
        )

    def fit(self, target: Sequence[Record]) -> S2LMethod:
        """Task-agnostic: the target is ignored."""
        return self

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        t0 = time.perf_counter()
        records = list(pool)
        traj = np.nan_to_num(self._losses(records, self.batch_tokens), nan=0.0)  # no-grad forwards
        k = _budget(self.budget, len(records))
        labels = kmeans_labels(traj, self.n_clusters or default_clusters(len(records)), self.seed)
        chosen = balanced_sample(labels, k, self.seed)
        scores = np.random.default_rng(self.seed).random(len(records))
        scores[chosen] += 2.0
        self.stats = {"clusters": int(labels.max() + 1) if len(labels) else 0}
        self._account(t0)
        return scores

    def settings(self) -> dict[str, Any]:
        return {
            "checkpoints": [str(c.path) for c in self.checkpoints],
            "budget": str(self.budget),
            "n_clusters": self.n_clusters or "min(100, n//10)",
            "seed": self.seed,
        }


# ------------------------------------------------------------------------------ CLD
@register("cld", config=CLDConfig)
class CLDMethod(_CheckpointMethod):
    """CLD (Nagaraj et al. 2025): correlation of loss differences (see :func:`cld_scores`).

    Needs >= 3 checkpoints (>= 2 differences), else ConfigError. Forward passes only.
    """

    name: ClassVar[str] = "cld"

    def __init__(
        self,
        base_model: Any,
        tokenizer: Any,
        formatter: Any,
        checkpoints: Sequence[Checkpoint | str],
        seed: int = 0,
        batch_tokens: int = 4096,
    ) -> None:
        if len(checkpoints) < 3:
            raise ConfigError(f"cld needs >= 3 checkpoints (>= 2 loss differences), got {len(checkpoints)}")
        super().__init__(base_model, tokenizer, formatter, checkpoints, seed)
        self.batch_tokens = int(batch_tokens)
        self.target_losses: np.ndarray | None = None

    @classmethod
    def create(cls, config: Any, ctx: MethodContext) -> CLDMethod:
        base, m, ckpts = _base_and_checkpoints(cls.name, config, ctx, 3)
        return cls(base, m.tokenizer, m.formatter, ckpts, seed=config.seed, batch_tokens=config.batch_tokens)

    def fit(self, target: Sequence[Record]) -> CLDMethod:
        if not target:
            raise ConfigError("cld needs at least one target example")
        t0 = time.perf_counter()
        self.target_losses = self._losses(target, self.batch_tokens)
        self._account(t0)
        return self

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        if self.target_losses is None:
            raise CoreselectError("CLDMethod.score called before fit")
        t0 = time.perf_counter()
        scores = cld_scores(self._losses(list(pool), self.batch_tokens), self.target_losses)
        self._account(t0)
        return scores

    def settings(self) -> dict[str, Any]:
        return {"checkpoints": [str(c.path) for c in self.checkpoints], "zero_variance_score": 0.0}
