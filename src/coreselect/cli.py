"""Command-line plumbing: flags generated from the args dataclasses, YAML configs, errors.

Precedence: dataclass defaults < ``--config FILE.yaml`` < flags given on the command line.
Config keys are the flag names with ``_`` or ``-`` (``batch_tokens`` == ``batch-tokens``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from coreselect.errors import CoreselectError


def _field_help(cls: type) -> dict[str, str]:
    """Parse ``name: text`` lines of the Attributes sections of the dataclass and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(_doc_attributes(klass.__dict__.get("__doc__") or ""))
    return out


def _doc_attributes(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        m = re.match(r"\s{8}([a-z0-9_, ]+):\s+(.*)", line)
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2).strip()
            current = names
        elif current and line.startswith(" " * 12) and line.strip():
            for n in current:
                out[n] += " " + line.strip()
        else:
            current = None
    return out


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, is_optional) of an annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null") else float(text)


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: Sequence[str] = (),
    groups: dict[str, tuple[str, ...]] | None = None,
    rest: str | None = "run control",
) -> None:
    """Add one ``--flag`` per dataclass field; defaults are SUPPRESSed so only given flags are set.

    With ``groups`` (title -> field names, in order) the flags are shown by concern, the
    groups first and every other field under ``rest`` (``None``: left out).
    """
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    if not groups:
        _add_fields(parser, list(by_name.values()), helps, hints, skip)
        return
    listed = [n for names in groups.values() for n in names]
    todo = list(groups.items())
    if rest:
        todo.append((rest, tuple(n for n in by_name if n not in listed and n not in skip)))
    for title, names in todo:
        chosen = [by_name[n] for n in names if n in by_name and n not in skip]
        if chosen:
            _add_fields(parser.add_argument_group(title), chosen, helps, hints, skip)


def add_method_args(parser: argparse.ArgumentParser, methods: Sequence[str], skip: Sequence[str] = ()) -> None:
    """One group per method with its config's options as flat flags (``--k1``, ``--layers``).

    A flag shared by several methods (``--scope``) appears once, under the first one.
    """
    from coreselect.methods import registry

    seen = set(skip)
    for name in methods:
        spec = registry.get(name)
        opts = [f for f in dataclasses.fields(spec.config) if f.name in spec.option_names() and f.name not in seen]
        seen |= {f.name for f in opts}
        if opts:
            group = parser.add_argument_group(f"{name} options", f"the {name} method's own knobs")
            _add_fields(group, opts, _field_help(spec.config), typing.get_type_hints(spec.config), ())


def _add_fields(
    parser: Any, fields: Sequence[dataclasses.Field], helps: dict[str, str], hints: dict[str, Any], skip: Sequence[str]
) -> None:
    for f in fields:
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _base_type(hints[f.name])
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        h = helps.get(f.name, "")
        if default not in (None, [], {}, ""):
            h += f" (default: {default})"
        # argparse %-formats help strings: escape once
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": h.replace("%", "%%")}
        origin = typing.get_origin(tp)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif origin is list:
            parser.add_argument(flag, nargs="+", metavar=f.name.upper(), **kw)
        elif tp is int and optional:
            parser.add_argument(flag, type=_optional_int, metavar="INT|none", **kw)
        elif origin is dict:
            continue
        elif tp is float and optional:
            parser.add_argument(flag, type=_optional_float, metavar="FLOAT|none", **kw)
        elif tp in (int, float):
            parser.add_argument(flag, type=tp, **kw)
        else:
            parser.add_argument(flag, type=str, **kw)


def chosen_methods(argv: Sequence[str], default: str = "trim") -> list[str]:
    """The method(s) a command line asks for (``--method``, ``--methods``, or its ``--config``),
    read before the full parse so ``--help`` and the flags show only their options."""
    from coreselect.methods import registry

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--methods")
    pre.add_argument("--config")
    ns, _ = pre.parse_known_args(list(argv))
    data: dict[str, Any] = {}
    if ns.config and Path(ns.config).is_file():
        try:
            data = load_yaml(ns.config)
        except CoreselectError:
            data = {}  # the real parse reports it
    text = ns.methods or ns.method or data.get("methods") or data.get("method") or default
    names = [m.strip() for m in str(text).split(",") if m.strip()]
    return [m for m in names if m in registry.names()] or [default]


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CoreselectError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise CoreselectError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise CoreselectError(f"{path}: a config must be a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_args(cls: type, ns: argparse.Namespace) -> Any:
    """Merge defaults < YAML config < flags into a ``cls`` instance."""
    from coreselect.config import args_from_dict

    given = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "func")}
    # unknown keys can only come from the YAML file; args_from_dict rejects them naming it
    data: dict[str, Any] = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    data.update(given)
    return args_from_dict(cls, data, source=getattr(ns, "config", None) or "flags")


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command; a user error prints one line and exits 2."""
    try:
        return main(argv)
    except CoreselectError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"coreselect: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("coreselect: interrupted", file=sys.stderr)
        return 130
