"""``coreselect COMMAND ...``: each command maps to one function of :mod:`coreselect.api`."""

from __future__ import annotations

import argparse
import logging
import sys

from coreselect.cli import add_dataclass_args, build_args, run


def _select(ns: argparse.Namespace) -> int:
    from coreselect.api import SelectArgs, select

    info = select(build_args(SelectArgs, ns))
    _summary(info)
    return 0


def _fingerprint(ns: argparse.Namespace) -> int:
    from coreselect.api import SelectArgs, fingerprint

    info = fingerprint(build_args(SelectArgs, ns))
    print(f"wrote {info['settings']['out']}/fingerprints.safetensors ({info['counts']['classes']} token classes)")
    return 0


def _score(ns: argparse.Namespace) -> int:
    from coreselect.api import SelectArgs, select

    args = build_args(SelectArgs, ns)
    args.method = "trim"
    info = select(args)
    _summary(info)
    return 0


def _demo(ns: argparse.Namespace) -> int:
    from coreselect.demo import DemoArgs, demo

    demo(build_args(DemoArgs, ns))
    return 0


def _summary(info: dict) -> None:
    c = info["counts"]
    out = info["settings"]["out"]
    print(f"{info['method']}: selected {c['selected']} of {c['pool']} records -> {out}/coreset.jsonl "
          f"({info['timings']['total_s']:.1f} s)")


def parser() -> argparse.ArgumentParser:
    from coreselect import __version__
    from coreselect.api import SelectArgs
    from coreselect.demo import DemoArgs

    p = argparse.ArgumentParser(prog="coreselect", description="Pick the few instruction-tuning examples worth training on.")
    p.add_argument("--version", action="version", version=f"coreselect {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str, func, cls, skip=()) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--config", help="YAML file whose keys are this command's flags (flags override it)")
        add_dataclass_args(sp, cls, skip)
        sp.set_defaults(func=func)
        return sp

    cmd("select", "rank the pool and write the top --budget as a coreset (TRIM, baselines)", _select, SelectArgs)
    cmd("fingerprint", "TRIM Stage I only: build token fingerprints from the target", _fingerprint, SelectArgs,
        skip=("method", "budget", "fingerprints", "shard_records", "on_bad_record"))
    cmd("score", "TRIM Stage II only: score the pool with saved --fingerprints and select", _score, SelectArgs,
        skip=("method", "layers", "w_row", "w_col"))
    cmd("demo", "run TRIM on the packaged default (SmolLM2-135M + a small real pool), offline", _demo, DemoArgs)
    return p


def _main(argv: list[str] | None) -> int:
    ns = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    ns.__dict__.pop("verbose", None)
    return ns.func(ns)


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
