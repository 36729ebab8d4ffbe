"""TRIM (paper 002): Stage I fingerprints from the target, Stage II scores for the pool.

The equations live in :mod:`coreselect.methods.trim_math` and are re-exported here under
the contract names (``token_saliency``, ``build_fingerprints``, ``score_examples``,
``Fingerprints``). :class:`TrimMethod` wires them to a model through
:class:`coreselect.models.runner.ModelRunner`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from coreselect.data.formatting import Encoded, Formatter, Scope
from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.methods.base import (
    MethodContext,
    ScoreChunk,
    SelectionMethod,
    TargetSets,
    chunk_from_scores,
    record_chunks,
    scores_from_chunks,
)
from coreselect.methods.registry import register
from coreselect.methods.trim_math import (
    FingerprintBuilder,
    Fingerprints,
    NearestClassTable,
    build_fingerprints,
    context_mask,
    pool_scores,
    score_examples,
    token_saliency,
    token_scores,
)
from coreselect.models.runner import ModelRunner, Packed, token_budget_batches
from coreselect.progress import progress_bar

__all__ = [
    "FingerprintBuilder",
    "Fingerprints",
    "TokenScoring",
    "TrimConfig",
    "TrimMethod",
    "build_fingerprints",
    "score_examples",
    "token_saliency",
    "token_scores",
]


@dataclass
class TokenScoring:
    """TRIM's token-level scoring knobs, shared by TRIM and P2D's fingerprint feature.

    Defaults are the paper's (§3, Table 8).

    Attributes:
        scope: tokens fingerprinted and scored: ``all``, ``prompt`` or ``response`` (App. B.1).
        w_row: ``w_Q`` of eq. 7.
        w_col: ``w_K`` of eq. 7.
        oov_penalty: ``lambda`` of eq. 12; ``None`` skips unseen token classes.
        w_mean: ``w_mu`` of eq. 15.
        w_max: ``w_m`` of eq. 15.
        coverage_weight: ``eta`` of eq. 15.
        coverage: what ``kappa(c)`` of eq. 15 measures: ``length`` (default), ``tokens`` or
            ``content`` (``trim_math.coverage_term``).
        batch_tokens: padded-token budget of one forward batch.
        chunk_records: records read, tokenized and length-sorted together while scoring.
    """

    scope: Scope = "all"
    w_row: float = 0.5
    w_col: float = 0.5
    oov_penalty: float | None = 1.0
    w_mean: float = 0.5
    w_max: float = 0.5
    coverage_weight: float = 0.05
    coverage: str = "length"
    #: 4096: on SmolLM2 / 2 CPU cores / 64 real records the bare forward ran 489 tokens/s at
    #: 4096 vs 359 at 8192, padding efficiency 0.986 vs 0.970 (docs/performance.md); GPUs want more
    batch_tokens: int = 4096
    chunk_records: int = 2048

    def __post_init__(self) -> None:
        if self.scope not in ("all", "prompt", "response"):
            raise ConfigError(f"scope must be all, prompt or response, got {self.scope!r}")
        if self.oov_penalty is not None and not 0 < self.oov_penalty <= 1:
            raise ConfigError(f"oov_penalty must be in (0, 1] or none, got {self.oov_penalty}")
        if self.batch_tokens < 1 or self.chunk_records < 1:
            raise ConfigError("batch_tokens and chunk_records must be >= 1")
        if self.coverage not in ("tokens", "content", "length"):
            raise ConfigError(f"coverage must be tokens, content or length, got {self.coverage!r}")

    def pool(
        self, s: torch.Tensor, in_m: torch.Tensor, batch: Any, token_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 13-15 (:func:`~coreselect.methods.trim_math.pool_scores`) with these knobs: one
        place, so that selection and the token views (``explain``, ``report``) cannot drift."""
        return pool_scores(
            s,
            in_m,
            batch.attention_mask,
            w_mean=self.w_mean,
            w_max=self.w_max,
            coverage_weight=self.coverage_weight,
            coverage=self.coverage,
            content=batch.scope_mask(self.scope),
            token_weights=token_weights,
            min_tokens=self.pooled_min_tokens(),
        )

    def pooled_min_tokens(self) -> int:
        """The ``min_tokens`` of :meth:`pool` (0 here: only TRIM has the option)."""
        return 0


@dataclass
class TrimConfig(TokenScoring):
    """TRIM's knobs: the token scoring ones, the number of attention layers and the three
    conventions the paper leaves open (issue 11, §3; measurements in docs/performance.md).

    Attributes:
        layers: ``L``, attention of the last L layers feeds Stage I (Table 8: 6).
        packing: Stage II packs each token-budget batch's records into rows of the longest
            record's width (no attention mask; the kernel separates records by their position
            ids: block-diagonal under SDPA, varlen under ``flash_attention_2``). Scores equal the
            padded ones within float rounding (1e-5 in fp32, tests/methods/test_trim_feed.py).
            Off by default: on CPU it did not pay (docs/performance.md, "Feeding the model").
        coverage: what ``kappa(c)`` of eq. 15 measures (see ``trim_math.coverage_term``):
            ``length`` (default) = ``|M(c)| / (|M(c)| + 32)``, an explicit length prior that
            does not depend on how long the model's chat template is; ``tokens`` =
            ``|M(c)| / |c|`` over all non-pad tokens, template included (the literal reading);
            ``content`` = ``|M(c)|`` over the in-scope content tokens (constant 1 with the OOV
            backoff, i.e. no coverage term). Measured on SmolLM2 and the demo pool (commit
            36c8125, docs/performance.md): ``length`` and ``tokens`` rank identically there
            (Spearman 1.0000; SmolLM2's template is 30-32 tokens), while dropping the prior
            (``content``, same as η = 0) lowers the target source's AUC on CSQA from 0.9933 to
            0.9916 and the MATH records among the top 21 non-GSM8K picks from 6 to 5.
        saliency_minmax: where eq. 6 takes its min and max: ``scope`` (default) = over the
            positions that are fingerprinted, ``all`` = every non-pad position (the literal
            reading). With ``all`` the attention sink sets the max: on the first GSM8K demo
            target (147 tokens) ``K^raw`` is 0.574 at position 0 (``<|im_start|>``) against a
            content median of 0.0066, so content ``K`` averages 0.016 and ``alpha`` is
            ``0.5 Q`` plus noise; over ``scope`` content ``K`` averages 0.077. Rankings barely
            move (Spearman 0.9999 / 0.9998 on the GSM8K / CSQA demo targets, same top 10%).
        min_context: fingerprint and score only tokens with at least this many content
            tokens before them (the shared-prefix rule, ``trim_math.context_mask``); 0 keeps
            all. Default 1: without it a record's first content token, whose state depends on
            that token alone, matched a target's first token with cosine 1.0000 in 3 of 240
            demo records for GSM8K (deciding the #1 pick, "Lorie earns...", by its first
            letter ``L``) and 31 of 240 for CSQA ("The", "What", "If", 21 of them not CSQA
            records). With 1 no record's max has cosine > 0.9999; the top 10% is unchanged on
            both targets, the target source's AUC moves 0.9956 -> 0.9952 (GSM8K) and
            0.9933 -> 0.9870 (CSQA, whose own records share the targets' first words).
        token_weighting: ``none`` (default, the paper's eq. 13) or ``idf``: eq. 13's mean
            (the only token average in ``S(c)``; max and coverage unchanged) weighted by the
            inverse document frequency of the fingerprint class each token is matched
            against, ``idf(t) = ln((N+1)/(df(t)+1)) + 1`` over the ``N`` target examples:
            ``mu(c) = sum w_j s_j / sum w_j`` (the paper's TF-IDF hint, App. A;
            ``trim_math.idf``). Investigation option (issue 15).
        min_tokens: ``0`` (default, off) or ``n_min``: eq. 13's mean becomes
            ``mu(c) * |M(c)| / max(|M(c)|, n_min)``, so a record with fewer than ``n_min``
            scored tokens has its mean shrunk towards 0 and longer ones keep the paper's score
            (``trim_math.pool_scores``). Investigation option (issue 15): against short
            records (one number or option letter as the answer) whose few tokens all match
            strongly. ``|M(c)|`` counts the scope's tokens: under ``scope: all`` the prompt too.
    """

    layers: int = 6
    packing: bool = False
    saliency_minmax: str = "scope"
    min_context: int = 1
    token_weighting: str = "none"
    min_tokens: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers < 1:
            raise ConfigError(f"layers must be >= 1, got {self.layers}")
        if self.saliency_minmax not in ("scope", "all"):
            raise ConfigError(f"saliency_minmax must be scope or all, got {self.saliency_minmax!r}")
        if self.min_context < 0:
            raise ConfigError(f"min_context must be >= 0, got {self.min_context}")
        if self.token_weighting not in ("none", "idf"):
            raise ConfigError(f"token_weighting must be none or idf, got {self.token_weighting!r}")
        if self.min_tokens < 0:
            raise ConfigError(f"min_tokens must be >= 0, got {self.min_tokens}")

    def pooled_min_tokens(self) -> int:
        return self.min_tokens

    def scored_positions(self, batch: Any) -> torch.Tensor:
        """``[B, T]`` bool: the positions fingerprinted (eq. 8) and scored (eq. 14): in scope,
        not special, not pad, and with at least ``min_context`` content tokens before them."""
        m = batch.scope_mask(self.scope)
        if self.min_context:
            m = m & context_mask(batch.scope_mask("all"), self.min_context)
        return m


@dataclass
class TrimOptions(TrimConfig):
    """TRIM's ``select`` options: :class:`TrimConfig` plus where Stage I may come from.

    Attributes:
        fingerprints: reuse a fingerprints file (skip Stage I; the target may be omitted).
    """

    fingerprints: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fingerprints and not Path(self.fingerprints).is_file():
            raise CoreselectError(f"{self.fingerprints}: no such fingerprints file")

    def trim_config(self) -> TrimConfig:
        """The scoring knobs alone (what the fingerprints file records)."""
        return TrimConfig(**{f.name: getattr(self, f.name) for f in fields(TrimConfig)})


def _to_host(t: torch.Tensor) -> np.ndarray:
    """One device-to-host copy (pinned, non-blocking on CUDA, then one synchronize)."""
    if t.device.type != "cuda":
        return t.cpu().numpy()
    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    buf.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return buf.numpy()


@register("trim", config=TrimOptions)
class TrimMethod(SelectionMethod):
    """Forward-only, token-level selection (Algorithm 3 minus the warmup)."""

    name: ClassVar[str] = "trim"
    needs_model: ClassVar[bool] = True
    uses_warmup: ClassVar[bool] = True
    streaming: ClassVar[bool] = True
    #: several targets natively: one fingerprint dictionary per target (Stage I per target),
    #: one forward pass per pool batch scored against every dictionary (Stage II)
    multi_target: ClassVar[bool] = True
    #: Stage I's output in the run folder (:meth:`save_state`); several targets:
    #: ``fingerprints-<name>.safetensors`` per target
    STATE_FILE: ClassVar[str] = "fingerprints.safetensors"

    def __init__(
        self, runner: ModelRunner, formatter: Formatter, config: TrimConfig | None = None, *, progress: bool = True
    ) -> None:
        super().__init__()
        self.runner = runner
        self.formatter = formatter
        self.config = config or TrimConfig()
        self.progress = progress
        self.fingerprints: Fingerprints | None = None
        self._table: NearestClassTable | None = None
        self.fingerprints_file: str | None = None  # --fingerprints: fit loads it instead of Stage I
        #: several targets: name -> (fingerprints, nearest-class table); empty for one target
        self.target_fps: dict[str, tuple[Fingerprints, NearestClassTable]] = {}

    @classmethod
    def requires_target(cls, config: Any) -> bool:
        return not getattr(config, "fingerprints", None)

    @classmethod
    def report_summary(cls, run: dict[str, Any]) -> list[tuple[str, object]]:
        st = run.get("settings", {})
        adapter = ((run.get("model") or {}).get("warmup") or {}).get("adapter")
        return [
            ("model", st.get("model", "?")),
            ("warmup adapter", adapter or "none"),
            ("scope", st.get("scope")),
            ("layers L", st.get("layers")),
            ("λ (oov_penalty)", st.get("oov_penalty")),
            ("w_Q / w_K", f"{st.get('w_row')} / {st.get('w_col')}"),
            ("w_μ / w_m / η", f"{st.get('w_mean')} / {st.get('w_max')} / {st.get('coverage_weight')}"),
        ] + [  # issue 15's investigation options, listed only when set
            (label, st.get(key))
            for key, label, off in (("token_weighting", "token weighting", "none"), ("min_tokens", "min_tokens", 0))
            if st.get(key, off) != off
        ]

    @classmethod
    def create(cls, config: Any, ctx: MethodContext) -> TrimMethod:
        model = ctx.require_model(cls.name)
        opts = config if isinstance(config, TrimOptions) else TrimOptions(**asdict(config))
        method = cls(model.runner, model.formatter, opts.trim_config(), progress=ctx.progress)
        method.fingerprints_file = opts.fingerprints
        return method

    def settings(self) -> dict[str, Any]:
        return asdict(self.config)

    @staticmethod
    def target_state_file(name: str) -> str:
        return f"fingerprints-{name}.safetensors"

    def save_state(self, out: Path) -> list[Path]:
        if self.target_fps:
            paths = [out / self.target_state_file(n) for n in self.target_fps]
            for (fp, _), path in zip(self.target_fps.values(), paths, strict=True):
                fp.save(path)
            return paths
        if self.fingerprints is None:
            return []
        self.fingerprints.save(out / self.STATE_FILE)
        return [out / self.STATE_FILE]

    def load_state(self, out: Path) -> bool:
        if len(self.target_names) > 1:
            paths = {n: out / self.target_state_file(n) for n in self.target_names}
            if not all(p.is_file() for p in paths.values()):
                return False
            for name, path in paths.items():
                self.set_fingerprints(Fingerprints.load(path))
                assert self.fingerprints is not None and self._table is not None
                self.target_fps[name] = (self.fingerprints, self._table)
            self._use_first()
            return True
        if not (out / self.STATE_FILE).is_file():
            return False
        self.set_fingerprints(Fingerprints.load(out / self.STATE_FILE))
        return True

    def fit_targets(self, targets: TargetSets) -> TrimMethod:
        """One target: :meth:`fit`. Several: Stage I once per target, one dictionary each."""
        if len(targets) <= 1 or self.fingerprints_file:
            return self.fit(next(iter(targets.values()), []))
        per_stats = {}
        self.target_fps = {}
        for name, records in targets.items():
            self.fit(records)
            assert self.fingerprints is not None and self._table is not None
            self.target_fps[name] = (self.fingerprints, self._table)
            per_stats[name] = self.stats.pop("stage1")
        self.stats["stage1"] = {
            "wall_s": sum(s["wall_s"] for s in per_stats.values()),
            "tokens": sum(s["tokens"] for s in per_stats.values()),
            "n_classes": sum(s["n_classes"] for s in per_stats.values()),
            "per_target": per_stats,
        }
        self._use_first()
        return self

    def _use_first(self) -> None:
        self.fingerprints, self._table = next(iter(self.target_fps.values()))

    # ---------------------------------------------------------------- Stage I
    def fit(self, target: Sequence[Record]) -> TrimMethod:
        """Build the fingerprints (Algorithm 1) from the target examples (or load ``--fingerprints``)."""
        if self.fingerprints_file:
            self.set_fingerprints(Fingerprints.load(self.fingerprints_file))
            return self
        if not target:
            raise CoreselectError("the target set is empty")
        t0 = time.perf_counter()
        cfg = self.config
        encoded = [self.formatter.encode(r) for r in target]
        self.n_truncated += sum(e.truncated for e in encoded)
        builder = FingerprintBuilder()
        n_tokens = 0
        windows = self.runner.windows(cfg.layers)
        for positions in token_budget_batches([len(e) for e in encoded], cfg.batch_tokens):
            batch = self.runner.collate(encoded, positions)
            keep = cfg.scored_positions(batch)
            # eager pass for the probabilities only; the hidden states come from the same
            # kernel that scores the pool in Stage II (issue 11, §2)
            attns = self.runner.attentions(batch, cfg.layers)
            alpha = token_saliency(
                attns,
                batch.attention_mask,
                cfg.w_row,
                cfg.w_col,
                windows=windows,
                minmax_mask=keep if cfg.saliency_minmax == "scope" else None,
            )
            del attns
            hidden = self.runner.hidden(batch)
            real = batch.attention_mask.bool()
            finite = ((torch.isfinite(hidden).all(-1) & torch.isfinite(alpha)) | ~real).all(1)
            if not bool(finite.all()):
                bad = target[positions[int((~finite).nonzero()[0])]]
                raise CoreselectError(
                    f"non-finite hidden states or saliency for target record id {bad.id} "
                    f"in {hidden.dtype} (try --dtype float32 or bfloat16)"
                )
            builder.add(hidden, alpha, batch.input_ids, keep)
            builder.count_documents(batch.input_ids, keep)  # df for token_weighting: idf
            n_tokens += batch.n_real_tokens
        ids = sorted(builder._sums)
        fp = builder.finalize(
            tokens=self.formatter.token_strings(ids) if ids else {},
            settings={"method": "trim", **self.settings(), "n_target": len(target)},
        )
        if len(fp) == 0:
            raise CoreselectError(f"the target has no scorable token under scope '{cfg.scope}'")
        self.set_fingerprints(fp)
        dt = time.perf_counter() - t0
        self.stats["stage1"] = {
            "wall_s": dt,
            "tokens": n_tokens,
            "tokens_per_s": n_tokens / max(dt, 1e-9),
            "n_classes": len(fp),
        }
        self.cost.forward_passes += len(target)
        return self

    def set_fingerprints(self, fp: Fingerprints) -> None:
        """Use existing fingerprints (``coreselect score --fingerprints``)."""
        emb = self.runner.embeddings()
        if len(fp) and fp.dim != self.runner.model.config.hidden_size:
            raise CoreselectError(
                f"fingerprints have dimension {fp.dim} but the model's hidden size is "
                f"{self.runner.model.config.hidden_size}: they were built with another model"
            )
        if self.config.token_weighting == "idf" and fp.doc_freq is None:
            fp.idf()  # raises, naming the cause
        self.fingerprints = fp
        self._table = NearestClassTable(fp, emb)

    # ---------------------------------------------------------------- Stage II
    def _score_encoded(self, encoded: list[Encoded], bar: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores (against the first target's dictionary) and ``|M(c)|``, in the given order."""
        per, n_scored = self._score_encoded_targets(encoded, bar)
        return next(iter(per.values())), n_scored

    def _score_encoded_targets(
        self, encoded: list[Encoded], bar: Any = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Scores per target dictionary (key ``""`` for one target) and ``|M(c)|``, in the given order.

        No device round trip per batch: ids are checked against the embedding table and the
        nearest-class table is filled for the chunk's ids on the host side before the loop;
        per-batch scores, counts and finiteness flags stay on the device and are copied back
        once per chunk (non-blocking, into pinned memory on CUDA). The next batch is collated
        (and its host-to-device copy queued) before the current one is scored.
        """
        assert self.fingerprints is not None and self._table is not None
        cfg = self.config
        runner = self.runner
        n = len(encoded)
        dicts = list(self.target_fps.items()) or [("", (self.fingerprints, self._table))]
        scores = {name: np.empty(n, dtype=np.float64) for name, _ in dicts}
        n_scored = np.zeros(n, dtype=np.int64)
        if not n:
            return scores, n_scored
        ids = np.unique(np.concatenate([e.input_ids for e in encoded] + [np.array([runner.pad_id])]))
        vocab = self._table.vocab
        if ids[0] < 0 or ids[-1] >= vocab:
            bad = int(ids[-1] if ids[-1] >= vocab else ids[0])
            raise CoreselectError(
                f"token id {bad} is outside the model's embedding table (V={vocab}): "
                "the tokenizer does not match the model"
            )
        for _, (_, table) in dicts:
            table.prefill(torch.from_numpy(ids))
        batches = token_budget_batches([len(e) for e in encoded], cfg.batch_tokens)
        collate = runner.collate_packed if cfg.packing else runner.collate
        forward = runner.hidden_packed if cfg.packing else runner.hidden
        outs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        extra: list[list[torch.Tensor]] = []  # scores against the 2nd.. dictionaries, per batch
        nxt = collate(encoded, batches[0])
        for k in range(len(batches)):
            cur = nxt
            hidden = forward(cur)  # type: ignore[arg-type]
            if k + 1 < len(batches):
                nxt = collate(encoded, batches[k + 1])
            batch = cur.batch if isinstance(cur, Packed) else cur
            finite = torch.isfinite(hidden).all(-1).all(-1)
            scored = cfg.scored_positions(batch)
            per_dict: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
            for _, (fp, table) in dicts:  # one forward pass, every target's dictionary
                s, in_m, _ = token_scores(
                    fp,
                    hidden,
                    batch.input_ids,
                    scored,
                    oov_penalty=cfg.oov_penalty,
                    table=table,
                    checked=True,
                )
                weights = (
                    table.idf_weights(batch.input_ids, in_m, filled=True) if cfg.token_weighting == "idf" else None
                )
                per_dict.append(cfg.pool(s, in_m, batch, weights))
                del s, in_m, weights
            sc, parts = per_dict[0]
            outs.append((sc.double(), parts["n_scored"], finite))
            extra.append([d[0].double() for d in per_dict[1:]])
            del hidden, scored
            if bar is not None:
                bar.update(len(batch.positions), tokens=batch.n_real_tokens)
        order = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches])
        sc_all, n_all, ok_all = (_to_host(torch.cat([o[i] for o in outs])) for i in range(3))
        if not ok_all.all():
            bad = int(order[int(np.argmin(ok_all))])
            raise CoreselectError(
                f"non-finite hidden states for pool record index {encoded[bad].index} (try --dtype float32)"
            )
        names = [name for name, _ in dicts]
        scores[names[0]][order] = sc_all
        for j, name in enumerate(names[1:]):
            scores[name][order] = _to_host(torch.cat([e[j] for e in extra]))
        n_scored[order] = n_all
        return scores, n_scored

    def score_chunks(
        self, pool: Iterable[Record], total: int | None = None, chunk_records: int | None = None
    ) -> Iterator[ScoreChunk]:
        """Stage II (Algorithm 2), streaming: ``chunk_records`` records at a time."""
        if self.fingerprints is None:
            raise CoreselectError("TrimMethod.score called before fit (no fingerprints)")
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        tokens0 = self.runner.tokens_seen
        chunks = record_chunks(pool, chunk_records or self.config.chunk_records)

        def read_and_encode() -> tuple[list[Record], list[Encoded]]:
            chunk = next(chunks, [])
            return chunk, self.formatter.encode_many(chunk)

        # While the model scores chunk k, one background thread reads and tokenizes chunk
        # k+1 (the fast tokenizer releases the GIL). Only that thread touches the pool
        # iterator and the tokenizer, one call at a time, so results do not change.
        with (
            progress_bar(total=total, desc="Stage II: scoring", enabled=self.progress) as bar,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="coreselect-tokenize") as ex,
        ):
            pending = ex.submit(read_and_encode)
            while True:
                chunk, encoded = pending.result()
                if not chunk:
                    break
                pending = ex.submit(read_and_encode)
                yield self._chunk(chunk, bar, encoded)
        dt = time.perf_counter() - t0
        toks = self.runner.tokens_seen - tokens0
        self.stats["stage2"] = {"wall_s": dt, "tokens": toks, "tokens_per_s": toks / max(dt, 1e-9)}

    def _chunk(self, records: list[Record], bar: Any, encoded: list[Encoded] | None = None) -> ScoreChunk:
        if encoded is None:
            encoded = self.formatter.encode_many(records)
        self.n_truncated += sum(e.truncated for e in encoded)
        per, n_scored = self._score_encoded_targets(encoded, bar)
        for scores in per.values():
            nan = np.isnan(scores) | (scores == np.inf)
            if nan.any():
                raise CoreselectError(f"non-finite score for pool record id {records[int(nan.argmax())].id}")
        self.cost.forward_passes += len(records)
        first = next(iter(per.values()))
        chunk = chunk_from_scores(records, first, n_tokens=np.array([len(e) for e in encoded]), n_scored=n_scored)
        if self.target_fps:
            chunk.targets = per
        return chunk

    def score_batch(self, records: Sequence[Record]) -> ScoreChunk:
        """Stage II for one slice of the pool (what the Ray engine's actors call)."""
        if self.fingerprints is None:
            raise CoreselectError("TrimMethod.score called before fit (no fingerprints)")
        return self._chunk(list(records), None)

    def score(self, pool: Iterable[Record]) -> np.ndarray:
        """All pool scores in pool order."""
        return scores_from_chunks(self.score_chunks(pool))
