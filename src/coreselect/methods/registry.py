"""The method registry: ``@register("bm25", config=BM25Config)`` on a method class.

A :class:`MethodSpec` is everything the pipeline, the CLI and the experiment runner need to
know about a method: its class, its config dataclass (whose fields become the method's
flags and YAML keys), and three capabilities (``needs_model``, ``uses_warmup``,
``streaming``) read from the class. Lookups import the method's module lazily through
:data:`coreselect.methods.catalog.MODULES`.

Run-level settings that some methods share are *inherited*: a config field named in
:data:`INHERITED` takes the run's value (``SelectArgs.seed``, ``SelectArgs.shard_records``)
unless the method's options set it. That is the only place a run setting reaches a config.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from coreselect.errors import ConfigError
from coreselect.methods.catalog import MODULES

if TYPE_CHECKING:
    from coreselect.methods.base import SelectionMethod

#: config field -> the ``SelectArgs`` field it is inherited from
INHERITED: dict[str, str] = {"seed": "seed", "chunk_records": "shard_records"}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: the ``--method`` name.
        cls: the :class:`~coreselect.methods.base.SelectionMethod` subclass.
        config: its config dataclass (documented, validated in ``__post_init__``).
    """

    name: str
    cls: type[SelectionMethod]
    config: type

    @property
    def needs_model(self) -> bool:
        return bool(self.cls.needs_model)

    @property
    def uses_warmup(self) -> bool:
        return bool(self.cls.uses_warmup)

    @property
    def streaming(self) -> bool:
        return bool(self.cls.streaming)

    def option_names(self) -> list[str]:
        """Config fields a user sets (``--flag`` / YAML key); inherited ones come from the run."""
        return [f.name for f in dataclasses.fields(self.config) if f.name not in INHERITED]

    def make_config(self, options: Mapping[str, Any], run: Mapping[str, Any] | None = None) -> Any:
        """The config from the user's ``options`` (+ inherited run settings); unknown keys fail."""
        names = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(unknown)}: neither a run setting nor an option of "
                f"{self.name} (its options: {', '.join(self.option_names()) or 'none'})"
            )
        values = {k: v for k, v in (run or {}).items() if k in names}
        values.update(options)
        return self.config(**values)


C = TypeVar("C", bound=type)
_SPECS: dict[str, MethodSpec] = {}


def register(name: str, *, config: type) -> Callable[[C], C]:
    """Class decorator: make ``cls`` the method ``name`` with options ``config``."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{name}: config must be a dataclass, got {config!r}")

    def deco(cls: C) -> C:
        if not isinstance(cls, type):  # e.g. a helper inserted between the decorator and its class
            raise TypeError(f"@register({name!r}) must decorate a SelectionMethod class, not {cls!r}")
        old = _SPECS.get(name)
        if old is not None and old.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} registered twice ({old.cls.__qualname__}, {cls.__qualname__})")
        cls.name = name  # type: ignore[attr-defined]  # C is any class here; SelectionMethod declares `name`
        _SPECS[name] = MethodSpec(name, cls, config)
        return cls

    return deco


def names() -> list[str]:
    """Every known method name (no import needed)."""
    return sorted(set(MODULES) | set(_SPECS))


def get(name: str) -> MethodSpec:
    """The spec of ``name``, importing its module on first use."""
    if name not in _SPECS:
        if name not in MODULES:
            raise ConfigError(f"unknown method {name!r} (known: {', '.join(names())})")
        importlib.import_module(MODULES[name])
        if name not in _SPECS:
            raise ConfigError(f"{MODULES[name]} does not register method {name!r}")
    return _SPECS[name]


def specs() -> dict[str, MethodSpec]:
    """Every spec (imports every method module)."""
    return {n: get(n) for n in names()}


def experiment_rows() -> dict[str, Any]:
    """Every ``methods:`` entry of ``coreselect experiment``: ``{key: ExperimentRow}``, from all methods."""
    rows: dict[str, Any] = {}
    for spec in specs().values():
        for row in spec.cls.experiment_rows():
            if row.key in rows and rows[row.key] != row:
                raise ValueError(f"experiment row {row.key!r} contributed twice")
            rows[row.key] = row
    return rows
