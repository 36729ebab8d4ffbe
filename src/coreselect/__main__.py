"""``coreselect COMMAND ...``: each command maps to one function (re-exported by :mod:`coreselect.api`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from coreselect.cli import (
    add_dataclass_args,
    add_method_args,
    build_args,
    chosen_methods,
    run,
)


def _select(ns: argparse.Namespace) -> int:
    from coreselect.config import SelectArgs
    from coreselect.pipeline import select

    info = select(build_args(SelectArgs, ns))
    _summary(info)
    return 0


def _fingerprint(ns: argparse.Namespace) -> int:
    from coreselect.config import SelectArgs
    from coreselect.pipeline import fingerprint

    info = fingerprint(build_args(SelectArgs, ns))
    print(f"wrote {info['settings']['out']}/fingerprints.safetensors ({info['counts']['classes']} token classes)")
    return 0


def _score(ns: argparse.Namespace) -> int:
    from coreselect.config import SelectArgs
    from coreselect.pipeline import select

    args = build_args(SelectArgs, ns)
    args.method = "trim"
    info = select(args)
    _summary(info)
    return 0


def _merge(ns: argparse.Namespace) -> int:
    from coreselect.engine.merge import MergeArgs, merge

    info = merge(build_args(MergeArgs, ns))
    _summary(info)
    return 0


def _compare(ns: argparse.Namespace) -> int:
    from coreselect.compare import CompareArgs, compare

    args = build_args(CompareArgs, ns)
    res = compare(args)
    print(f"compared {', '.join(res['methods'])} -> {args.out}/comparison.md")
    return 0


def _demo(ns: argparse.Namespace) -> int:
    from coreselect.demo import DemoArgs, demo

    demo(build_args(DemoArgs, ns))
    return 0


def _report(ns: argparse.Namespace) -> int:
    from coreselect.report import ReportArgs, report

    print(f"wrote {report(build_args(ReportArgs, ns))}")
    return 0


def _explain(ns: argparse.Namespace) -> int:
    from coreselect.report import ExplainArgs, explain

    explain(build_args(ExplainArgs, ns))
    return 0


def _train(ns: argparse.Namespace) -> int:
    from coreselect.train.command import TrainCommandArgs, train

    info = train(build_args(TrainCommandArgs, ns))
    print(
        f"trained {info['counts']['trained']} records, {info['steps']} steps, loss {info['first_loss']:.4f} -> "
        f"{info['final_loss']:.4f} ({info['timings']['total_s']:.1f} s) -> {info['adapter']}"
    )
    return 0


def _heads(ns: argparse.Namespace) -> int:
    from coreselect.methods.p2d import HeadsArgs, heads_command

    args = build_args(HeadsArgs, ns)
    hs = heads_command(args)
    print(f"{hs.proxy}: {len(hs.heads)} of {hs.n_layers * hs.n_heads} heads -> {args.out}/heads.json, heads.png")
    return 0


def _eval(ns: argparse.Namespace) -> int:
    from coreselect.eval.command import EvalCommandArgs, evaluate_command, headline

    args = build_args(EvalCommandArgs, ns)
    res = evaluate_command(args)
    print(f"{headline(res)} -> {args.out}/eval.json")
    return 0


def _experiment(ns: argparse.Namespace) -> int:
    from coreselect.experiment import ExperimentArgs, experiment

    info = experiment(build_args(ExperimentArgs, ns))
    print((Path(info["settings"]["out"]) / "results.md").read_text(encoding="utf-8"))
    return 0


def _export(ns: argparse.Namespace) -> int:
    from coreselect.export import ExportArgs, export, usage_hint

    info = export(build_args(ExportArgs, ns))
    conv = f"; {info['text_as_chat']} text records as empty-user conversations" if info["text_as_chat"] else ""
    print(f"exported {info['records']} records ({info['format']}, {info['shape']}{conv}) -> {info['data']}")
    print(usage_hint(info))
    return 0


def _summary(info: dict) -> None:
    c = info["counts"]
    out = info["settings"]["out"]
    if "shard" in info:
        sh = info["shard"]
        print(
            f"{info['method']}: shard {sh['shard_index']}/{sh['num_shards']} scored {sh['records']} of "
            f"{c['pool']} records -> {out}/shards (run coreselect merge once every shard is done)"
        )
        return
    print(
        f"{info['method']}: selected {c['selected']} of {c['pool']} records -> {out}/coreset.jsonl "
        f"({info['timings']['total_s']:.1f} s)"
    )
    if c.get("rejected"):
        print(f"{info['method']}: {c['rejected']} bad record(s) skipped -> {out}/rejects.jsonl")


SELECT_EXAMPLE = """example:
  coreselect select --pool pool.jsonl --target target.jsonl --out runs/trim --budget 5%
  coreselect select --method bm25 --k1 1.2 --pool pool.jsonl --target target.jsonl --out runs/bm25

The method's own options are flat flags (--layers, --k1); `--method NAME --help` lists them.
"""


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser; ``argv`` picks which method's options ``select`` & co. show."""
    from coreselect import __version__
    from coreselect.compare import CompareArgs
    from coreselect.config import GROUPS, SelectArgs
    from coreselect.demo import DemoArgs
    from coreselect.engine.merge import MergeArgs
    from coreselect.eval.command import EvalCommandArgs
    from coreselect.experiment import ExperimentArgs
    from coreselect.export import ExportArgs
    from coreselect.methods.p2d import HeadsArgs
    from coreselect.report.build import ReportArgs
    from coreselect.report.terminal import ExplainArgs
    from coreselect.train.command import TrainCommandArgs

    p = argparse.ArgumentParser(
        prog="coreselect", description="Pick the few instruction-tuning examples worth training on."
    )
    p.add_argument("--version", action="version", version=f"coreselect {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    argv = sys.argv[1:] if argv is None else argv

    def cmd(name: str, help: str, func, cls, skip=(), methods=None, epilog=None) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name, help=help, description=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        if methods is None:
            add_dataclass_args(sp, cls, skip)
        else:  # by concern: inputs/outputs (required first), the method's own knobs, the rest
            first, *others = GROUPS.items()
            add_dataclass_args(sp, cls, skip, groups=dict([first]), rest=None)
            add_method_args(sp, methods, skip)
            add_dataclass_args(sp, cls, (*skip, *first[1]), groups=dict(others))
        sp.add_argument("--config", help="YAML file whose keys are this command's flags (flags override it)")
        sp.set_defaults(func=func)
        return sp

    cmd(
        "select",
        "rank the pool and write the top --budget as a coreset (TRIM, baselines)",
        _select,
        SelectArgs,
        methods=chosen_methods(argv),
        epilog=SELECT_EXAMPLE,
    )
    cmd(
        "fingerprint",
        "TRIM Stage I only: build token fingerprints from the target",
        _fingerprint,
        SelectArgs,
        skip=("method", "budget", "fingerprints", "shard_records", "on_bad_record"),
        methods=["trim"],
    )
    cmd(
        "score",
        "TRIM Stage II only: score the pool with saved --fingerprints and select",
        _score,
        SelectArgs,
        skip=("method", "layers", "w_row", "w_col"),
        methods=["trim"],
    )
    cmd("merge", "combine the score shards of --num-shards processes and write the selection", _merge, MergeArgs)
    cmd(
        "compare",
        "run several methods on the same pool/target/budget and compare their coresets",
        _compare,
        CompareArgs,
        skip=("method", "fingerprints"),
        methods=chosen_methods(argv, default="trim,random,bm25,dsir") if "compare" in argv else ["trim"],
    )
    cmd("demo", "run TRIM on the packaged default (SmolLM2-135M + a small real pool), offline", _demo, DemoArgs)
    cmd("train", "fine-tune a fresh base model with LoRA on a coreset (paper Table 7 recipe)", _train, TrainCommandArgs)
    cmd(
        "heads",
        "P2D stage 1: locate the task-sensitive attention heads on the target (heads.json + heat map)",
        _heads,
        HeadsArgs,
    )
    cmd(
        "eval",
        "evaluate a model (+ LoRA adapter) with lm-eval-harness and/or its held-out target loss, write eval.json",
        _eval,
        EvalCommandArgs,
    )
    cmd(
        "experiment",
        "select, fine-tune and evaluate every method; write the Table 1 results",
        _experiment,
        ExperimentArgs,
    )
    cmd(
        "report",
        "write DIR/report.html: why each record was (not) selected, token by token",
        _report,
        ReportArgs,
        skip=("dir",),
    ).add_argument("dir", metavar="DIR", help="a selection run folder or a compare folder")
    cmd(
        "export",
        "write a run's coreset for TRL, LLaMA-Factory or axolotl (data file + dataset entry)",
        _export,
        ExportArgs,
        skip=("dir",),
    ).add_argument("dir", metavar="DIR", help="a selection run folder")
    cmd(
        "explain",
        "print one pool record's tokens colored by their match score s_j",
        _explain,
        ExplainArgs,
        skip=("dir",),
    ).add_argument("dir", metavar="DIR", help="a TRIM selection run folder")
    return p


def _main(argv: list[str] | None) -> int:
    ns = parser(argv).parse_args(argv)
    level = logging.DEBUG if ns.verbose else logging.WARNING
    root = logging.getLogger()
    ours = not root.handlers  # basicConfig adds a handler only then (not under an embedding app or pytest)
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    if ours:  # the level on the handler too: bm25s sets its own logger to DEBUG
        for handler in root.handlers:
            handler.setLevel(level)
    ns.__dict__.pop("verbose", None)
    return ns.func(ns)


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
