"""Token-level views of a TRIM run: Stage I saliency of target examples, Stage II ``s_j`` of pool records.

Nothing here is read from disk caches: the model is reloaded from ``run.json`` (base model
plus the warmup adapter when one was recorded), the fingerprints from the run folder, and
both stages are re-run on the few records shown, one record per forward pass.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coreselect.data.formatting import TEMPLATE, scope_mask
from coreselect.data.records import Record
from coreselect.errors import CoreselectError


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a selection run folder."""
    p = Path(run_dir) / "run.json"
    if not p.is_file():
        raise CoreselectError(f"{run_dir}: no run.json (not a coreselect run folder)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CoreselectError(f"{p}: not a valid run.json ({e})") from None


def run_args(run: dict[str, Any]) -> Any:
    """The run's :class:`~coreselect.config.SelectArgs` (keys this version does not know are dropped)."""
    from coreselect.config import SelectArgs

    return SelectArgs.from_settings(run.get("settings", {}))


def warmup_adapter(run: dict[str, Any]) -> str | None:
    """The adapter folder the run scored with, or None (no warmup)."""
    return ((run.get("model") or {}).get("warmup") or {}).get("adapter")


def read_by_index(paths: Sequence[str], indices: Iterable[int]) -> dict[int, Record]:
    """Pool records by index, numbered exactly as ``select`` numbers them (bad records skipped)."""
    from coreselect.data.readers import pool_records

    want = {int(i) for i in indices}
    got: dict[int, Record] = {}
    if not want:
        return got
    for rec in pool_records(list(paths)):
        if rec.index in want:
            got[rec.index] = rec
            if len(got) == len(want):
                break
    return got


@dataclass
class TargetView:
    """Stage I of one target example: per-token row saliency ``Q``, column ``K`` and ``alpha`` (eq. 3, 5-7)."""

    record: Record
    tokens: list[str]
    codes: np.ndarray
    scored: np.ndarray  # bool: tokens in scope (these feed the fingerprints)
    q: np.ndarray
    k: np.ndarray
    alpha: np.ndarray


@dataclass
class RecordView:
    """Stage II of one pool record: ``s_j`` (eq. 10-12) and the pooled terms (eq. 13-15)."""

    record: Record
    tokens: list[str]
    codes: np.ndarray
    s: np.ndarray
    in_m: np.ndarray  # bool: tokens in M(c)
    direct: np.ndarray  # bool: the token's own class was fingerprinted
    backoff: list[str | None]  # for unseen classes: the nearest fingerprinted class used
    mean: float
    max: float
    coverage: float
    score: float
    n_scored: int

    @property
    def oov(self) -> np.ndarray:
        """Tokens scored through the nearest-class backoff (eq. 11-12)."""
        return self.in_m & ~self.direct


class Explainer:
    """The run's model, formatter and fingerprints, reloaded to recompute token-level views.

    Args:
        run_dir: a TRIM selection run folder (``run.json`` + ``fingerprints.safetensors``).
    """

    def __init__(self, run_dir: str | Path) -> None:
        from coreselect.data.formatting import Formatter
        from coreselect.methods.trim_math import Fingerprints, NearestClassTable
        from coreselect.models.loading import load_model
        from coreselect.models.runner import ModelRunner

        self.dir = Path(run_dir)
        self.run = load_run(self.dir)
        fp_path = self.dir / "fingerprints.safetensors"
        if not fp_path.is_file():
            if any(self.dir.glob("fingerprints-*.safetensors")):
                raise CoreselectError(
                    f"{run_dir}: a multi-target run (one fingerprints-<name>.safetensors per target); "
                    "token views need a single-target TRIM run"
                )
            raise CoreselectError(f"{run_dir}: no fingerprints.safetensors (token views need a TRIM run)")
        self.args = run_args(self.run)
        self.config = self.args.method_config("trim", strict=False).trim_config()
        adapter = warmup_adapter(self.run)
        if adapter and not (Path(adapter) / "adapter_config.json").is_file():
            raise CoreselectError(f"{adapter}: the run's warmup adapter is gone, cannot recompute its scores")
        model, tok = load_model(
            self.args.model,
            dtype=self.args.dtype,
            device=self.args.device,
            trust_remote_code=self.args.trust_remote_code,
            adapter=adapter,
        )
        self.tokenizer = tok
        self.formatter = Formatter(tok, self.args.max_length, self.args.template, template_date=self.args.template_date)
        self.runner = ModelRunner(model, tok)
        self.fingerprints = Fingerprints.load(fp_path)
        if len(self.fingerprints) and self.fingerprints.dim != model.config.hidden_size:
            raise CoreselectError(f"{fp_path}: fingerprints do not match the model's hidden size")
        self.table = NearestClassTable(self.fingerprints, self.runner.embeddings())

    # ------------------------------------------------------------------ helpers
    def token_texts(self, record: Record, n: int) -> list[str]:
        """The text each of the first ``n`` tokens covers (gaps left by offset trimming go to the token before)."""
        text, _ = self.formatter.render(record)
        offsets = self.formatter.encode(record).offsets  # the tokens encode() scores, BOS included
        starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0].copy()
        if len(starts) == 0:
            return []
        starts[0] = 0
        starts = np.maximum.accumulate(starts)
        ends = np.append(starts[1:], len(text))
        return [text[a:b] for a, b in zip(starts[:n], ends[:n])]

    def class_string(self, token_id: int) -> str:
        """Decoded text of one token class."""
        return str(self.tokenizer.decode([int(token_id)]))

    # ------------------------------------------------------------------ Stage I
    def target_views(self, records: Sequence[Record]) -> list[TargetView]:
        """Row / column / combined saliency of each target example (one forward pass each)."""
        from coreselect.methods.trim_math import _minmax, column_saliency, row_saliency

        cfg = self.config
        views = []
        for rec in records:
            enc = self.formatter.encode(rec)
            batch = self.runner.collate([enc], [0])
            attns = self.runner.attentions(batch, cfg.layers)
            mask = batch.attention_mask.bool()
            windows = self.runner.windows(cfg.layers)
            over = cfg.scored_positions(batch) if cfg.saliency_minmax == "scope" else None
            # reduce(torch.add) = sum() without its int 0 start: same floats, and typed as a Tensor
            q = functools.reduce(torch.add, [row_saliency(a, mask, window=w) for a, w in zip(attns, windows)])
            q = q / len(attns)
            k_raw = functools.reduce(torch.add, [column_saliency(a, mask, w) for a, w in zip(attns, windows)])
            k_raw = k_raw / len(attns)
            k = _minmax(k_raw, mask, 1e-12, over)
            alpha = cfg.w_row * q + cfg.w_col * k  # eq. 7, identical to token_saliency
            del attns
            views.append(
                TargetView(
                    record=rec,
                    tokens=self.token_texts(rec, len(enc)),
                    codes=enc.codes,
                    scored=scope_mask(enc.codes, cfg.scope),
                    q=q[0].cpu().numpy(),
                    k=k[0].cpu().numpy(),
                    alpha=alpha[0].cpu().numpy(),
                )
            )
        return views

    # ------------------------------------------------------------------ Stage II
    def record_views(self, records: Sequence[Record], progress: Any = None) -> list[RecordView]:
        """``s_j`` of every token and the pooled score terms of each record (one forward pass each)."""
        from coreselect.methods.trim_math import token_scores

        cfg, fp = self.config, self.fingerprints
        views = []
        for rec in records:
            enc = self.formatter.encode(rec)
            batch = self.runner.collate([enc], [0])
            hidden = self.runner.hidden(batch)
            mask = cfg.scored_positions(batch).to(hidden.device)
            s, in_m, direct = token_scores(
                fp, hidden, batch.input_ids, mask, oov_penalty=cfg.oov_penalty, table=self.table
            )
            weights = self.table.idf_weights(batch.input_ids, in_m) if cfg.token_weighting == "idf" else None
            score, parts = cfg.pool(s, in_m, batch, weights)
            in_m_np, direct_np = in_m[0].cpu().numpy(), direct[0].cpu().numpy()
            backoff: list[str | None] = [None] * len(enc)
            oov_pos = np.nonzero(in_m_np & ~direct_np)[0]
            if oov_pos.size and fp.tokens:
                rows, _ = self.table.rows(batch.input_ids[0, oov_pos].to(self.table.device))
                for p, r in zip(oov_pos.tolist(), rows.tolist()):
                    backoff[p] = self.class_string(int(fp.token_ids[r]))
            views.append(
                RecordView(
                    record=rec,
                    tokens=self.token_texts(rec, len(enc)),
                    codes=enc.codes,
                    s=s[0].cpu().numpy(),
                    in_m=in_m_np,
                    direct=direct_np,
                    backoff=backoff,
                    mean=float(parts["mean"][0]),
                    max=float(parts["max"][0]),
                    coverage=float(parts["coverage"][0]),
                    score=float(score[0]),
                    n_scored=int(parts["n_scored"][0]),
                )
            )
            if progress is not None:
                progress.update(1, tokens=len(enc))
        return views

    def top_classes(self, n: int = 25) -> list[tuple[str, int, float]]:
        """The fingerprint classes with the most total saliency weight: ``(token, count, weight)``."""
        fp = self.fingerprints
        order = torch.argsort(fp.weights, descending=True)[:n].tolist()
        return [(self.class_string(int(fp.token_ids[r])), int(fp.counts[r]), float(fp.weights[r])) for r in order]


def is_template(codes: np.ndarray) -> np.ndarray:
    """Bool mask of template / special tokens (never scored)."""
    return np.asarray(codes) == TEMPLATE
