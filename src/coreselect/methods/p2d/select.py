"""P2D stage ii (paper 003, Fig. 2): parameter-guided data selection, P2D-dagger.

**Parameter-guided selection** (:class:`P2DMethod`, the registered ``p2d`` method): a pool record is seen
   only through ``H_T``: the per-head context vectors at the ``o_proj`` input of the
   selected heads, concatenated (``|H_T| * d`` features per token). The forward pass
   stops right after the deepest selected layer. Two scorings:

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

   ``heads="random"`` draws the same number of heads uniformly (seeded): the paper's
   falsification test (task heads vs random heads).

The method contributes three experiment rows (:meth:`P2DMethod.experiment_rows`): P2D,
P2D-dagger and P2D-double-dagger, whose heads-only training is :mod:`coreselect.methods.p2d.train`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from coreselect.data.formatting import Encoded, Formatter
from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.methods.base import (
    ExperimentRow,
    MethodContext,
    ReportFigure,
    ScoreChunk,
    SelectionMethod,
    chunk_from_scores,
    record_chunks,
    scores_from_chunks,
)
from coreselect.methods.p2d.localize import (
    PROXIES,
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
    pool_scores,
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

__all__ = ["FEATURES", "P2DConfig", "P2DMethod", "head_attentions", "head_features"]

FEATURES = ("pooled", "fingerprint")


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


# ------------------------------------------------------------------------------ selection
@dataclass
class P2DConfig(TokenScoring):
    """P2D selection knobs, plus TRIM's token-scoring ones (:class:`~coreselect.methods.trim.TokenScoring`)
    and TRIM's three conventions (issue 11), with TRIM's defaults (:class:`~coreselect.methods.trim.TrimConfig`
    documents the measurements behind them).

    Attributes:
        heads: ``auto`` (locate on the target), ``random`` (same count, seeded) or a ``heads.json`` path.
        proxy: ``gradient`` or ``attention`` (``heads=auto`` only).
        head_fraction: share of all heads kept in ``H_T`` (paper: 10%).
        feature: ``pooled`` (mean-pool cosine to the target, default) or ``fingerprint`` (TRIM
            fingerprints on the head outputs).
        seed: seeds ``heads=random``.
        aer: estimate the Alignment Efficiency Ratio into run.json (times a few training steps).
        aer_epochs: epochs assumed for both trainings in that estimate (Table 7 of paper 002: 4).
        coverage: ``kappa(c)`` of TRIM's eq. 15 for the ``fingerprint`` feature: ``length``
            (default), ``tokens`` or ``content`` (``trim_math.coverage_term``).
        saliency_minmax: where eq. 6's min-max runs for the ``fingerprint`` feature: ``scope``
            (default: the fingerprinted positions) or ``all`` non-pad positions.
        min_context: fingerprint, pool and score only tokens with at least this many content
            tokens before them (``trim_math.context_mask``; both features); 0 keeps all.
    """

    heads: str = "auto"
    proxy: str = "gradient"
    head_fraction: float = 0.1
    feature: str = "pooled"
    seed: int = 0
    aer: bool = True
    aer_epochs: float = 4.0
    coverage: str = "length"
    saliency_minmax: str = "scope"
    min_context: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.coverage not in ("tokens", "content", "length"):
            raise ConfigError(f"coverage must be tokens, content or length, got {self.coverage!r}")
        if self.saliency_minmax not in ("scope", "all"):
            raise ConfigError(f"saliency_minmax must be scope or all, got {self.saliency_minmax!r}")
        if self.min_context < 0:
            raise ConfigError(f"min_context must be >= 0, got {self.min_context}")
        if self.proxy not in PROXIES:
            raise ConfigError(f"proxy must be one of {', '.join(PROXIES)}, got {self.proxy!r}")
        if self.feature not in FEATURES:
            raise ConfigError(f"feature must be one of {', '.join(FEATURES)}, got {self.feature!r}")
        n_top(self.head_fraction, 1)  # validates the range
        if self.heads not in ("auto", "random") and not Path(self.heads).is_file():
            raise CoreselectError(f"{self.heads}: --heads must be auto, random or a heads.json file")

    def scored_positions(self, batch: Batch) -> Tensor:
        """``[B, T]`` bool: the positions pooled / fingerprinted and scored: in scope, not special,
        not pad, with at least ``min_context`` content tokens before them (as ``TrimConfig``)."""
        m = batch.scope_mask(self.scope)
        if self.min_context:
            m = m & context_mask(batch.scope_mask("all"), self.min_context)
        return m


@register("p2d", config=P2DConfig)
class P2DMethod(SelectionMethod):
    """P2D-dagger: score pool records through the task-sensitive heads only (module doc)."""

    name: ClassVar[str] = "p2d"
    needs_model: ClassVar[bool] = True
    uses_warmup: ClassVar[bool] = False  # the experiment never gives P2D the shared warmup
    streaming: ClassVar[bool] = True
    #: the target side of the fit (pooled centre or fingerprints), beside heads.json
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
        self.head_set: HeadSet | None = None
        self.fingerprints: Fingerprints | None = None
        self._table: NearestClassTable | None = None
        self._center: Tensor | None = None
        self._target_encoded: list[Encoded] = []

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
        """The report's summary rows: where ``H_T`` came from, its size, the feature and the AER."""
        st = run.get("settings", {})
        heads = (run.get("stats") or {}).get("heads") or {}
        aer = (run.get("aer") or {}).get("aer") if isinstance(run.get("aer"), dict) else run.get("aer")
        where = f"{heads.get('proxy', st.get('heads'))}, fraction {st.get('head_fraction')}"
        size = f"{heads.get('n', '?')} of {heads.get('of', '?')} ({where}), layers {heads.get('layers', '?')}"
        return [
            ("model", st.get("model", "?")),
            ("heads H_T", size),
            ("feature / scope", f"{st.get('feature')} / {st.get('scope')}"),
            ("min_context / coverage", f"{st.get('min_context')} / {st.get('coverage')}"),
            ("AER (estimated)", None if aer is None else f"{aer:.4g}"),
        ]

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
        return cls(model.runner, model.formatter, config, model_name=ctx.model_name, progress=ctx.progress)

    def settings(self) -> dict[str, Any]:
        return asdict(self.config)

    def save_state(self, out: Path) -> list[Path]:
        """``heads.json`` (+ ``heads.png`` when localized) and the target side of the fit."""
        from safetensors.torch import save_file

        from coreselect.io import atomic_path

        if self.head_set is None:
            return []
        written = [out / "heads.json"]
        self.head_set.save(out / "heads.json")
        if self.head_set.scores:
            written.append(plot_heatmap(self.head_set, out / "heads.png"))
        if self.fingerprints is not None:
            self.fingerprints.save(out / "p2d_fingerprints.safetensors")
            written.append(out / "p2d_fingerprints.safetensors")
        elif self._center is not None:
            with atomic_path(out / self.STATE_FILE) as tmp:
                save_file({"center": self._center.detach().cpu().contiguous()}, str(tmp))
            written.append(out / self.STATE_FILE)
        return written

    def load_state(self, out: Path) -> bool:
        """Restore heads and target side (not the AER estimate's encoded targets: fit again for that)."""
        from safetensors.torch import load_file

        fp, centre = out / "p2d_fingerprints.safetensors", out / self.STATE_FILE
        if not (out / "heads.json").is_file() or not (fp.is_file() or centre.is_file()):
            return False
        hs = HeadSet.load(out / "heads.json")
        hs.check(self.geom)
        self.head_set = hs
        if self.config.feature == "fingerprint":
            if not fp.is_file():
                return False
            self.fingerprints = Fingerprints.load(fp)
            self._table = NearestClassTable(self.fingerprints, self.runner.embeddings())
        else:
            if not centre.is_file():
                return False
            self._center = load_file(str(centre))["center"]
        return True

    # ------------------------------------------------------------ stage 1 + target side
    def resolve_heads(self, target: Sequence[Record]) -> HeadSet:
        cfg, g = self.config, self.geom
        if cfg.heads == "auto":
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
            self.stats["localize_s"] = time.perf_counter() - t0
            self.cost.backward_passes += len(target) if cfg.proxy == "gradient" else 0
        elif cfg.heads == "random":
            k = n_top(cfg.head_fraction, g.n_layers * g.n_heads)
            hs = HeadSet(
                self.model_name,
                "random",
                cfg.head_fraction,
                random_heads(g.n_layers, g.n_heads, k, cfg.seed),
                n_layers=g.n_layers,
                n_heads=g.n_heads,
                extra={"seed": cfg.seed},
            )
        else:
            hs = HeadSet.load(cfg.heads)
        hs.check(g)
        return hs

    def fit(self, target: Sequence[Record]) -> P2DMethod:
        if not target:
            raise CoreselectError("the target set is empty")
        t0 = time.perf_counter()
        hs = self.head_set = self.resolve_heads(target)
        if self.out_dir is not None:
            hs.save(self.out_dir / "heads.json")
            if hs.scores:
                plot_heatmap(hs, self.out_dir / "heads.png")
        cfg = self.config
        encoded = self._target_encoded = [self.formatter.encode(r) for r in target]
        by_layer = hs.by_layer()
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
            fp = builder.finalize(settings={"method": "p2d", "heads": [list(h) for h in hs.heads]})
            if len(fp) == 0:
                raise CoreselectError(f"the target has no scorable token under scope '{cfg.scope}'")
            self.fingerprints = fp
            self._table = NearestClassTable(fp, self.runner.embeddings())
        else:
            if not pooled:
                raise CoreselectError(f"the target has no scorable token under scope '{cfg.scope}'")
            self._center = _unit(torch.stack(pooled).mean(0))
        self.cost.forward_passes += len(target)
        self.stats["fit_s"] = time.perf_counter() - t0
        self.stats["heads"] = {
            "n": len(hs.heads),
            "of": self.geom.n_layers * self.geom.n_heads,
            "proxy": hs.proxy,
            "layers": sorted(by_layer),
            "feature_dim": len(hs.heads) * self.geom.head_dim,
        }
        return self

    # ------------------------------------------------------------ stage 2
    def _score_encoded(self, encoded: list[Encoded]) -> tuple[np.ndarray, np.ndarray]:
        assert self.head_set is not None
        cfg = self.config
        by_layer = self.head_set.by_layer()
        scores = np.empty(len(encoded), dtype=np.float64)
        n_scored = np.zeros(len(encoded), dtype=np.int64)
        for positions in token_budget_batches([len(e) for e in encoded], cfg.batch_tokens):
            batch = self.runner.collate(encoded, positions)
            feats = head_features(self.runner, batch, by_layer)
            mask = cfg.scored_positions(batch)
            if cfg.feature == "fingerprint":
                assert self.fingerprints is not None
                s, in_m, _ = token_scores(
                    self.fingerprints, feats, batch.input_ids, mask, oov_penalty=cfg.oov_penalty, table=self._table
                )
                sc, parts = pool_scores(
                    s,
                    in_m,
                    batch.attention_mask,
                    w_mean=cfg.w_mean,
                    w_max=cfg.w_max,
                    coverage_weight=cfg.coverage_weight,
                    coverage=cfg.coverage,
                    content=batch.scope_mask(cfg.scope),
                )
                n = parts["n_scored"]
            else:
                assert self._center is not None
                v, ok = _mean_pool(feats, mask)
                sc = torch.where(ok, _unit(v) @ self._center.to(v.device), torch.full_like(v[:, 0], float("-inf")))
                n = mask.sum(-1)
            scores[positions] = sc.double().cpu().numpy()
            n_scored[positions] = n.cpu().numpy()
        return scores, n_scored

    def score_chunks(
        self, pool: Iterable[Record], total: int | None = None, chunk_records: int | None = None
    ) -> Iterator[ScoreChunk]:
        if self.head_set is None:
            raise CoreselectError("P2DMethod.score called before fit")
        from coreselect.progress import progress_bar

        t0 = time.perf_counter()
        with progress_bar(total=total, desc="P2D: scoring", enabled=self.progress) as bar:
            for chunk in record_chunks(pool, chunk_records or self.config.chunk_records):
                encoded = self.formatter.encode_many(chunk)
                self.n_truncated += sum(e.truncated for e in encoded)
                scores, n_scored = self._score_encoded(encoded)
                if np.isnan(scores).any():
                    bad = chunk[int(np.isnan(scores).argmax())].id
                    raise CoreselectError(f"non-finite score for pool record id {bad}")
                self.cost.forward_passes += len(chunk)
                bar.update(len(chunk))
                n_tokens = np.array([len(e) for e in encoded])
                yield chunk_from_scores(chunk, scores, n_tokens=n_tokens, n_scored=n_scored)
        self.stats["score_s"] = self.stats.get("score_s", 0.0) + time.perf_counter() - t0

    def score_batch(self, records: Sequence[Record]) -> ScoreChunk:
        """Scores of one slice of the pool (what engines call per chunk)."""
        if self.head_set is None:
            raise CoreselectError("P2DMethod.score called before fit")
        chunk = list(records)
        encoded = self.formatter.encode_many(chunk)
        self.n_truncated += sum(e.truncated for e in encoded)
        scores, n_scored = self._score_encoded(encoded)
        if np.isnan(scores).any():
            raise CoreselectError(f"non-finite score for pool record id {chunk[int(np.isnan(scores).argmax())].id}")
        self.cost.forward_passes += len(chunk)
        return chunk_from_scores(chunk, scores, n_tokens=np.array([len(e) for e in encoded]), n_scored=n_scored)

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        return scores_from_chunks(self.score_chunks(pool))

    # ------------------------------------------------------------ run.json
    def run_info(self, table: Any, info: dict[str, Any]) -> dict[str, Any]:
        """Extra run.json keys: ``aer`` (estimated, see :func:`coreselect.methods.p2d.train.estimate_aer`)."""
        if not self.config.aer or self.head_set is None or not self._target_encoded:
            return {}
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
        return {"aer": aer}


def _mean_pool(feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    m = mask.to(feats.dtype)[..., None]
    n = mask.sum(-1)
    return (feats * m).sum(1) / n.clamp(min=1)[:, None].to(feats.dtype), n > 0


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-30)
