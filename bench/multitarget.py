"""Multi-target cost (issue 14 §1): the whole TRIM ``select`` run, 1 vs 3 named targets.

Same pool, model and settings; only ``--target`` differs: one unnamed target file (``--one``,
default csqa) vs three named ones (``csqa=... siqa=... gsm8k=...``). Stage I grows with the
target tokens, which differ a lot between tasks (csqa's 5 targets are short, gsm8k's long):
the Stage I target tokens of each side are printed. Every run is a fresh
``python -m coreselect select`` process, so each figure includes what a user pays:

* ``wall``: the process wall time (interpreter start, imports, model load, Stage I, Stage II,
  writing the outputs);
* ``total_s``: run.json's ``timings.total_s`` (model load included; interpreter start and
  imports not);
* ``fit_s`` (Stage I: one dictionary per target) and ``score_s`` (Stage II: one forward pass
  over the pool, scored against every dictionary), also from run.json.

Runs alternate (one, three), (three, one), ... over ``--repeats`` pairs, so a change of machine
load hits both sides; the summary ratios are three / one of the per-side medians, and each
pair's own wall ratio is printed too. All ratios are measured in this one run.

Data (default): the first ``--records`` records of the packaged evidence pool
(:func:`coreselect.evidence_pool.build_evidence_pool`: multiple-choice, GSM8K, MATH and
ShareGPT records) and its 5-record CommonsenseQA, SocialIQA and GSM8K targets; the model is
the packaged SmolLM2-135M (``--model smollm2``). ``--smoke`` instead builds a random-init
2-layer Llama and a synthetic pool (seconds; what the test runs).

    python bench/multitarget.py                      # SmolLM2, 120 records, 2 pairs
    python bench/multitarget.py --repeats 3 --json mt.json
    python bench/multitarget.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scoring import build_tiny, synth_records, write_jsonl  # bench/ is on sys.path

TASKS = ("csqa", "siqa", "gsm8k")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def real_data(n: int, tmp: Path) -> tuple[Path, dict[str, Path]]:
    """The first ``n`` records of the packaged evidence pool and its csqa / siqa / gsm8k targets."""
    from coreselect.evidence_pool import SOURCES, build_evidence_pool

    per_source = -(-n // (len(SOURCES) - 2)) + 2  # some sources come up short; take the first n
    folder = tmp / "evidence"
    build_evidence_pool(folder, n_per_source=per_source, n_heldout=5, tasks=TASKS)
    rows = (folder / "pool.jsonl").read_text(encoding="utf-8").splitlines()
    if len(rows) < n:
        raise SystemExit(f"the evidence pool has {len(rows)} records, fewer than --records {n}")
    pool = tmp / "pool.jsonl"
    pool.write_text("".join(r + "\n" for r in rows[:n]), encoding="utf-8")
    return pool, {t: folder / f"target_{t}.jsonl" for t in TASKS}


def smoke_data(n: int, tmp: Path) -> tuple[Path, dict[str, Path]]:
    pool = write_jsonl(tmp / "pool.jsonl", synth_records(n, short=True))
    targets = {t: write_jsonl(tmp / f"target_{t}.jsonl", synth_records(3, seed=10 + i)) for i, t in enumerate(TASKS)}
    return pool, targets


def run_select(side: str, target_spec: list[str], common: list[str], out: Path) -> dict[str, Any]:
    """One fresh ``coreselect select`` process; its wall time and run.json's timings."""
    cmd = [sys.executable, "-m", "coreselect", "select", "--target", *target_spec, "--out", str(out), *common]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise SystemExit(f"select ({side}) failed, rc={proc.returncode}:\n" + "\n".join(tail))
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    tm = info["timings"]
    row = {
        "side": side,
        "wall_s": wall,
        "total_s": tm["total_s"],
        "fit_s": tm["fit_s"],
        "score_s": tm["score_s"],
        "load": os.getloadavg()[0],
        "forward_passes": info["cost"]["forward_passes"],
        "tokens": info["stats"]["stage2"]["tokens"],
        "target_tokens": info["stats"]["stage1"]["tokens"],
    }
    if "targets" in info:
        row["targets"] = {k: info["targets"][k] for k in ("names", "coverage", "overlap")}
    print(
        f"  {side:5s} wall {wall:7.2f}s total {tm['total_s']:7.2f}s fit {tm['fit_s']:6.2f}s "
        f"score {tm['score_s']:7.2f}s target tokens {row['target_tokens']} load {row['load']:.2f}",
        file=sys.stderr,
    )
    return row


def bench(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if a.smoke:
        model = str(build_tiny(tmp / "tiny", hidden=32, layers=2))
        pool, targets = smoke_data(a.records, tmp)
    else:
        model = str(build_tiny(tmp / "tiny")) if a.model == "tiny" else a.model
        pool, targets = real_data(a.records, tmp)
    common = ["--pool", str(pool), "--model", model, "--warmup", "none", "--budget", a.budget]
    common += ["--max-length", str(a.max_length), "--device", a.device, "--no-progress"]
    if a.layers:
        common += ["--layers", str(a.layers)]
    sides = {
        "one": [str(targets[a.one])],
        "three": [f"{t}={p}" for t, p in targets.items()],
    }
    runs: list[dict[str, Any]] = []
    pairs: list[float] = []
    for rep in range(a.repeats):
        order = ("one", "three") if rep % 2 == 0 else ("three", "one")
        got = {s: run_select(s, sides[s], common, tmp / f"out-{s}-{rep}") for s in order}
        runs += [got[s] for s in order]
        pairs.append(got["three"]["wall_s"] / got["one"]["wall_s"])

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["side"] == side)

    ratios = {key: med("three", key) / med("one", key) for key in ("wall_s", "total_s", "fit_s", "score_s")}
    return {
        "model": "tiny-smoke" if a.smoke else a.model,
        "records": a.records,
        "tokens": runs[0]["tokens"],
        "targets": {t: sum(1 for _ in p.open(encoding="utf-8")) for t, p in targets.items()},
        "one_target": a.one,
        "target_tokens": {side: runs[[r["side"] for r in runs].index(side)]["target_tokens"] for side in sides},
        "command_three": "coreselect select --target " + " ".join(sides["three"]) + " " + " ".join(common),
        "runs": runs,
        "pair_wall_ratios": pairs,
        "median": {side: {k: med(side, k) for k in ("wall_s", "total_s", "fit_s", "score_s")} for side in sides},
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (packaged), tiny (random-init), or a model path")
    p.add_argument("--records", type=int, default=120, help="pool records (first N of the evidence pool)")
    p.add_argument("--repeats", type=int, default=2, help="(one, three) pairs, alternating order")
    p.add_argument(
        "--one",
        default=TASKS[0],
        choices=TASKS,
        help="the 1-target run's target (Stage I cost grows with the target tokens: csqa's are short, gsm8k's long)",
    )
    p.add_argument("--budget", default="10%")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--layers", type=int, default=0, help="TRIM --layers (0: the method default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny random-init model, synthetic pool, 1 pair")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.smoke:
        a.records = min(a.records, 24)
        a.repeats = 1 if a.repeats == 2 else a.repeats
        a.layers = a.layers or 2
        a.max_length = min(a.max_length, 128)
        a.device = "cpu"
    import torch

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="coreselect-mt-bench-") as d:
        res = bench(a, Path(d))
    res.update(
        {
            "hardware": f"{cpu_name()}, {os.cpu_count()} logical CPUs, cuda={torch.cuda.is_available()}",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg()[0],
            "bench_wall_s": time.perf_counter() - t0,
        }
    )
    m, r = res["median"], res["ratios"]
    print(
        f"\nmulti-target cost: model={res['model']} records={res['records']} tokens={res['tokens']} "
        f"targets={res['targets']} repeats={a.repeats}\n1 target: {a.one}; Stage I target tokens: "
        f"1 target {res['target_tokens']['one']}, 3 targets {res['target_tokens']['three']}\n"
        f"{res['hardware']}, OMP_NUM_THREADS={res['omp_num_threads']}, "
        f"torch threads {res['torch_threads']}, load {res['loadavg_start']:.2f} -> {res['loadavg_end']:.2f}"
    )
    print(f"{'median (s)':34s} {'1 target':>10s} {'3 targets':>10s} {'ratio':>7s}")
    labels = {
        "wall_s": "process wall (load + imports incl.)",
        "total_s": "run.json total_s (load incl.)",
        "fit_s": "Stage I (fit_s)",
        "score_s": "Stage II (score_s)",
    }
    for key, label in labels.items():
        print(f"{label:34s} {m['one'][key]:10.2f} {m['three'][key]:10.2f} {r[key]:7.3f}")
    print("per-pair wall ratios (3/1): " + ", ".join(f"{x:.3f}" for x in res["pair_wall_ratios"]))
    print(f"whole run 3 targets / 1 target: {r['wall_s']:.3f}x (goal <= 1.15); Stage II: {r['score_s']:.3f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
