"""Write reference ``scores.parquet`` files for several methods on the tiny test model.

Run before and after a refactor and compare: ``python scripts/reference_scores.py OUT``
writes ``OUT/<method>/scores.parquet``; ``--compare A B`` checks two such folders are equal.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

METHODS = ["random", "bm25", "dsir", "trim", "rds", "p2d"]


def write(out: Path) -> None:
    import torch
    from conftest import CORPUS, chat, make_tiny_model, write_jsonl  # type: ignore[import-not-found]

    from coreselect.__main__ import main

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "config.json").exists():
        make_tiny_model(model)
    rows = [chat(i, t[:40], t[40:], "a" if i % 3 else "b") for i, t in enumerate(CORPUS)]
    pool = write_jsonl(out / "pool.jsonl", rows)
    target = write_jsonl(
        out / "target.jsonl",
        [
            chat(900, "What is 12 plus 30?", "The answer is 42.", "t"),
            chat(901, "Where is a fox?", "In the forest.", "t"),
        ],
    )
    for m in METHODS:
        extra = ["--model", str(model), "--warmup", "none", "--max-length", "128"]
        if m == "trim":
            extra += ["--layers", "2"]  # rds and p2d have no layers option (they ignored it before)
        if m in ("random", "bm25", "dsir"):
            extra = []
        rc = main(
            [
                "select",
                "--method",
                m,
                "--pool",
                str(pool),
                "--target",
                str(target),
                "--out",
                str(out / m),
                "--budget",
                "25%",
                "--no-progress",
                "--overwrite",
                *extra,
            ]
        )
        assert rc == 0, m


def compare(a: Path, b: Path) -> int:
    import pyarrow.parquet as pq

    bad = 0
    for m in METHODS:
        ta, tb = pq.read_table(a / m / "scores.parquet"), pq.read_table(b / m / "scores.parquet")
        same = ta.equals(tb)
        print(f"{m:8s} {'identical' if same else 'DIFFERENT'} ({ta.num_rows} rows)")
        bad += not same
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    write(Path(sys.argv[1]))
