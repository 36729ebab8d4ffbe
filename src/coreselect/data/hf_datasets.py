"""``datasets.Dataset`` / ``IterableDataset`` objects as pool or target inputs.

``coreselect.select(pool=ds, target=[ds_target, "more.jsonl"])`` mixes in-memory Hugging Face
datasets with paths. Each dataset object is wrapped in a :class:`DatasetInput`: a ``str``
subclass whose text is a label such as ``<Dataset alpaca>`` and which carries the object. So
the rest of coreselect, which passes inputs around as strings (``SelectArgs.pool``, ``run.json``
settings), needs no change, and :func:`coreselect.data.readers.read_records` reads it through
:func:`dataset_source`.

How records are named (the same rules as a ``save_to_disk`` folder, which is the same data):

* ``source`` (and the ``id`` fallback ``"<source>:<row>"``): the record's ``dataset`` column,
  else the dataset's name (``ds.info.dataset_name``, e.g. ``alpaca`` for ``tatsu-lab/alpaca``),
  else ``dataset``. Builders that name a file format, not a dataset (``load_dataset("json",
  ...)``), count as unnamed. Two inputs of one list with the same name get ``-2``, ``-3``, ...
  so their ids cannot collide.
* errors name the label and the 0-based row, as ``ds[row]`` indexes it:
  ``<Dataset alpaca>:row 17: field 'messages': empty turn list``.

A ``DatasetDict`` gives its ``train`` split (or its only split). Rows are read as plain Python
objects (any ``with_format("torch")`` is undone). An ``IterableDataset`` is iterated once per
pass (select reads the pool 2-3 times), so it must give the same rows in the same order each
time, as streamed Hub and file datasets do.

In-memory objects cannot be re-read from ``run.json`` later (``coreselect report`` re-reads the
pool): reading a label there fails with a message that says to pass a saved folder instead.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from coreselect.data.sources import Source
from coreselect.errors import CoreselectError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; typing only, so no runtime dependency

__all__ = ["DatasetInput", "as_inputs", "dataset_source", "is_dataset"]

#: builder names that say how the data was stored, not what it is
_FORMAT_BUILDERS = frozenset(
    {
        "json",
        "csv",
        "parquet",
        "text",
        "arrow",
        "generator",
        "pandas",
        "sql",
        "spark",
        "webdataset",
        "imagefolder",
        "audiofolder",
        "videofolder",
        "xml",
        "cache",
        "polars",
    }
)
_LABEL_RE = re.compile(r"^<(?:Iterable)?Dataset [^<>]*>$")


def is_dataset(obj: object) -> bool:
    """True for a ``datasets`` Dataset, IterableDataset or (Iterable)DatasetDict (no import)."""
    if "datasets" not in sys.modules or isinstance(obj, (str, bytes, os.PathLike)):
        return False
    import datasets

    return isinstance(
        obj, (datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict, datasets.IterableDatasetDict)
    )


def _pick_split(obj: Any) -> Any:
    """The dataset to read from a Dataset / IterableDataset / DatasetDict."""
    import datasets

    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" in obj:
            return obj["train"]
        if len(obj) == 1:
            return next(iter(obj.values()))
        raise CoreselectError(f"a DatasetDict with splits {sorted(obj)} and none is 'train': pass ds[split]")
    return obj


def _name(ds: Any) -> str:
    """The dataset's own name, or ``dataset``."""
    info = getattr(ds, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    if not name or str(name).lower() in _FORMAT_BUILDERS:
        return "dataset"
    name = re.sub(r"[^\w.-]+", "-", str(name).rsplit("/", 1)[-1]).strip("-")
    return name or "dataset"


class DatasetInput(str):
    """A dataset object standing in a list of input paths; its ``str`` value is its label.

    Attributes:
        dataset: the wrapped Dataset / IterableDataset (a DatasetDict already resolved to a split).
        stem: the default ``source`` of its records.
    """

    dataset: Any
    stem: str

    def __new__(cls, obj: Any, stem: str | None = None) -> Self:
        ds = _pick_split(obj)
        stem = stem or _name(ds)
        self = super().__new__(cls, f"<{type(ds).__name__} {stem}>")
        self.dataset, self.stem = ds, stem
        return self

    # args are deep-copied (dataclasses.asdict for run.json): share the object, don't copy its data
    def __copy__(self) -> DatasetInput:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> DatasetInput:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (DatasetInput, (self.dataset, self.stem))


def as_inputs(paths: Any) -> list[Any]:
    """Normalize ``paths`` (one path or dataset, or a sequence of them) to a list in which each
    dataset object is a :class:`DatasetInput` with a ``stem`` unique among the list's datasets."""
    if paths is None:
        return []
    if isinstance(paths, (str, bytes, os.PathLike)) or is_dataset(paths):
        paths = [paths]
    out: list[Any] = []
    used: set[str] = set()
    for p in paths:
        if is_dataset(p) or isinstance(p, DatasetInput):
            ds = p.dataset if isinstance(p, DatasetInput) else p
            base = p.stem if isinstance(p, DatasetInput) else _name(_pick_split(ds))
            stem, n = base, 1
            while stem in used:
                n += 1
                stem = f"{base}-{n}"
            used.add(stem)
            p = p if isinstance(p, DatasetInput) and stem == p.stem else DatasetInput(ds, stem)
        elif isinstance(p, os.PathLike):
            p = os.fspath(p)
        out.append(p)
    return out


def _rows(label: str, ds: Any) -> Iterator[tuple[int, Any, None]]:
    """``(row, record, None)`` per row, as plain Python objects."""
    ds = ds.with_format(None)  # undo with_format("torch"/"numpy"/...): plain lists and str
    it = iter(ds)
    row = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise CoreselectError(
                f"{label}: reading the dataset failed at row {row}: {type(e).__name__}: "
                f"{' '.join(str(e).splitlines())[:200]}"
            ) from e
        yield row, item, None
        row += 1


def dataset_source(p: object) -> Any:
    """The reader source of a dataset input, or None when ``p`` is an ordinary path.

    A label string without its object (read back from ``run.json``) raises a clear error.
    """
    if is_dataset(p):
        p = DatasetInput(p)
    if isinstance(p, DatasetInput):
        label, ds = str(p), p.dataset
        return Source(label, p.stem, "row", lambda: _rows(label, ds))
    if isinstance(p, str) and _LABEL_RE.match(p):
        raise CoreselectError(
            f"{p}: an in-memory datasets object passed to coreselect.select() cannot be re-read from run.json; "
            "save it first (ds.save_to_disk(DIR) or ds.to_json(FILE)) and pass that path"
        )
    return None
