"""Which TRIM variant keeps the target's kind of record on top? (issue 15)

For one pool (records with a ``dataset`` field) and one target file, scores the pool with
each TRIM variant (a set of TRIM options) and prints, per variant, the share of the top
``--top`` fraction whose ``dataset`` is one of ``--own`` (default: the target records'
own ``dataset``; on a transfer pool without the target's source, name the nearest one,
e.g. ``--own math``), with the median response length of the top records.

    python scripts/trim_probe.py --pool pool.jsonl --target target_gsm8k.jsonl --own math \\
        --sample 200 --model smollm2 --warmup none
    python scripts/trim_probe.py ... --variant paper: --variant idf:token_weighting=idf \\
        --variant short:min_tokens=64,w_max=0

A variant is ``NAME:key=value,key=value`` (TRIM's YAML keys; ``NAME:`` alone = defaults).
Without ``--variant`` the issue's ablations and the two investigation options run
(:data:`DEFAULT_VARIANTS`). The model is loaded once (``coreselect.api.load_context``);
each variant is a TRIM method built by ``coreselect.api.make_method``, fitted on the
target and scored on the (sampled) pool: one Stage II forward pass per variant, so keep
the pool small on a CPU (``--sample``).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: name -> TRIM options: the paper, the issue's ablations, and the issue 15 options
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "mean_only": {"w_max": 0.0},
    "max_only": {"w_mean": 0.0},
    "no_coverage": {"coverage_weight": 0.0},
    "scope_response": {"scope": "response"},
    "idf": {"token_weighting": "idf"},
    "min_tokens64": {"min_tokens": 64},
    "idf_min_tokens64": {"token_weighting": "idf", "min_tokens": 64},
}


def parse_value(text: str) -> Any:
    """YAML's reading of one value (``0`` -> int, ``0.5`` -> float, ``none`` -> None...)."""
    import yaml

    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    return yaml.safe_load(text)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` -> (name, options)."""
    name, _, rest = text.partition(":")
    if not name:
        raise SystemExit(f"--variant {text!r}: needs a name before ':'")
    opts: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variant {text!r}: {item!r} is not key=value")
        opts[key.strip().replace("-", "_")] = parse_value(value)
    return name, opts


def sample_pool(path: str, n: int | None, seed: int, out: Path) -> Path:
    """A seeded sample of ``n`` records (all if ``n`` is None), written to ``out``, file order kept."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if n is not None and n < len(lines):
        keep = sorted(random.Random(seed).sample(range(len(lines)), n))
        lines = [lines[i] for i in keep]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def top_share(scores: list[float], sources: list[str], own: set[str], frac: float) -> tuple[int, float, list[int]]:
    """(k, share of ``own`` among the top k, the top k's indices); ties broken by pool order."""
    k = max(1, math.ceil(frac * len(scores)))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return k, sum(sources[i] in own for i in order) / k, order


def _ranks(x: Any) -> Any:
    """Average ranks (ties share their mean rank)."""
    import numpy as np

    order = np.argsort(x, kind="stable")
    xs = np.asarray(x)[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or xs[end] != xs[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman's rho of two score vectors (-inf allowed: it ranks lowest)."""
    import numpy as np

    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def response_chars(record: Any) -> int:
    return sum(len(m.content) for m in record.messages if m.role == "assistant")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", required=True, help="pool JSONL, records with a 'dataset' field")
    p.add_argument("--target", required=True, help="target JSONL")
    p.add_argument("--own", help="comma-separated sources counted as the target's own (default: the target's)")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    p.add_argument("--top", type=float, default=0.10, help="top fraction (default 0.10)")
    p.add_argument("--sample", type=int, help="score a seeded sample of this many pool records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--warmup", default="none", help="none or a saved adapter folder (auto trains one)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--layers", type=int, help="TRIM's L for every variant (default: TRIM's 6)")
    p.add_argument("--batch-tokens", type=int, help="TRIM's batch_tokens for every variant")
    p.add_argument("--json", help="also write one JSON line per variant here")
    ns = p.parse_args(argv)

    import numpy as np

    from coreselect.api import SelectArgs, load_context, make_method, read_target
    from coreselect.data.readers import read_records

    variants = dict(parse_variant(v) for v in ns.variant) if ns.variant else dict(DEFAULT_VARIANTS)
    common: dict[str, Any] = {}
    if ns.layers is not None:
        common["layers"] = ns.layers
    if ns.batch_tokens is not None:
        common["batch_tokens"] = ns.batch_tokens

    with tempfile.TemporaryDirectory(prefix="trim-probe-") as tmp:
        pool_path = sample_pool(ns.pool, ns.sample, ns.seed, Path(tmp) / "pool.jsonl")
        records = list(read_records([str(pool_path)]))
        sources = [r.source for r in records]
        base = {
            "pool": [str(pool_path)],
            "target": [ns.target],
            "out": str(Path(tmp) / "run"),
            "method": "trim",
            "model": ns.model,
            "warmup": ns.warmup,
            "max_length": ns.max_length,
            "dtype": ns.dtype,
            "device": ns.device,
            "seed": ns.seed,
            "progress": False,
        }
        args0 = SelectArgs(**base, **common)
        target = read_target(args0)
        own = set(ns.own.split(",")) if ns.own else {r.source for r in target}
        counts = collections.Counter(sources)
        print(
            f"pool {len(records)} records ({', '.join(f'{s} {c}' for s, c in counts.most_common())}); "
            f"target {len(target)}; own = {sorted(own)} ({sum(counts[s] for s in own)} in the pool)",
            flush=True,
        )
        t0 = time.perf_counter()
        ctx = load_context(args0, Path(tmp) / "run", len(records))
        print(f"model {ns.model} loaded in {time.perf_counter() - t0:.1f}s", flush=True)
        rows = []
        paper_scores = None
        for name, opts in variants.items():
            t0 = time.perf_counter()
            args = SelectArgs(**base, **{**common, **opts})
            method = make_method(args, ctx)
            method.fit(target)
            scores = np.asarray(method.score(records), dtype=np.float64)
            k, share, top = top_share(scores.tolist(), sources, own, ns.top)
            med = float(np.median([response_chars(records[i]) for i in top]))
            row: dict[str, Any] = {
                "variant": name,
                "options": opts,
                "k": k,
                "own_share": share,
                "top_sources": dict(collections.Counter(sources[i] for i in top).most_common(4)),
                "median_response_chars": med,
                "wall_s": round(time.perf_counter() - t0, 1),
            }
            if paper_scores is None and not opts:
                paper_scores = scores
            if paper_scores is not None:
                row["spearman_vs_paper"] = spearman(scores, paper_scores)
            rows.append(row)
            extra = f"  spearman vs paper {row['spearman_vs_paper']:.4f}" if "spearman_vs_paper" in row else ""
            print(
                f"{name:20s} own share {share:6.1%} of top {k}  median response {med:7.0f} chars  "
                f"top sources {row['top_sources']}{extra}  ({row['wall_s']}s)",
                flush=True,
            )
        if ns.json:
            Path(ns.json).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
