"""Read instruction-tuning records from disk or the Hub and normalize them to :class:`Record`.

Inputs, chosen by path:

* ``*.jsonl`` / ``*.ndjson`` / ``*.jsonl.gz``: JSON Lines, streamed line by line in binary mode
  (so a non-UTF-8 line is reported with its number); 1-based line numbers, blank lines skipped.
* ``*.json``: a JSON array of objects (loaded whole); ``line`` is the 1-based array position.
  A ``.json`` file that is really JSON Lines is read line by line instead.
* ``*.parquet``: streamed with ``pyarrow.parquet.ParquetFile.iter_batches``; 0-based rows.
* a directory: ``datasets.load_from_disk`` (memory-mapped Arrow); 0-based rows.
* ``hf:org/name[:split]``, or a missing path that looks like ``org/name``:
  ``datasets.load_dataset(name, split=split or "train", streaming=True)``; 0-based rows.
* a ``datasets.Dataset`` / ``IterableDataset`` object: see :mod:`coreselect.data.hf_datasets`.

Record shapes, in order of precedence: ``messages`` (role/content), ShareGPT ``conversations``
(from/value), ``prompt``/``completion`` (strings or TRL message lists), Alpaca
``instruction``/``input``/``output``, and ``text``. A key whose value is ``null`` counts as
absent (Arrow tables with mixed shapes fill missing columns with nulls).

Text: any string the JSON decoder yields is accepted as is (NUL and other control characters
included: they are valid Unicode, and the tokenizer reads them like any other character),
except one that holds a lone surrogate (``"\\ud800"`` decodes to a ``str`` that is not valid
Unicode): such a record is refused, naming the field, since no tokenizer can read it and it
cannot be written back as UTF-8. Length is not limited here; the formatter bounds the work per
record.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from coreselect.data.formatting import surrogate_error
from coreselect.data.records import Message, OnBadRecord, Record, Role
from coreselect.data.sources import Item, Source
from coreselect.errors import BadRecordError, CoreselectError
from coreselect.io import atomic_path

__all__ = ["RejectLog", "iter_raw", "read_records"]

_MAX_REASON = 200
_NO_TEXT_FIELD = "messages|prompt|instruction|text"
_NO_TEXT_REASON = (
    "no known text field (expected messages, conversations, prompt/completion, instruction/output or text)"
)
_ROLES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
_LINE_SUFFIXES = (".jsonl.gz", ".jsonl", ".ndjson")
_KNOWN_SUFFIXES = (*_LINE_SUFFIXES, ".json", ".parquet")
_HUB_RE = re.compile(r"^(?:hf:)?(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<split>.+))?$")

# One decoded input position: (line or row, decoded value or None, error or None).
_Item = Item


def _one_line(text: str, limit: int = _MAX_REASON) -> str:
    """Collapse line breaks to spaces, escape lone surrogates, truncate to ``limit`` characters."""
    text = " ".join(str(text).splitlines()).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(value: object, limit: int = 60) -> str:
    """A short one-line rendering of a user value for error messages."""
    return _one_line(str(value), limit)


def _tname(value: object) -> str:
    """JSON-ish type name of ``value`` for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _bad(file: str, line: int | None, field: str | None, reason: str, kind: str) -> BadRecordError:
    """Build a one-line :class:`BadRecordError`."""
    return BadRecordError(file, line, field, _one_line(reason), kind=kind)


class _Invalid(Exception):
    """Internal: a validation failure at ``field`` (turned into BadRecordError by the caller)."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


# --------------------------------------------------------------------------- rejects


class RejectLog:
    """Collects records rejected with ``on_bad_record="skip"``; ``write`` dumps them as JSONL."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def add(self, err: BadRecordError, raw: object | None = None) -> None:
        """Remember one rejected record: where, which field, why, and its raw value (or None)."""
        self.entries.append(
            {"file": err.file, "line": err.line, "field": err.field, "reason": err.reason, "record": raw}
        )

    @property
    def count(self) -> int:
        """Number of rejected records."""
        return len(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write ``rejects.jsonl`` atomically (:func:`coreselect.io.atomic_path`).

        Raw values that are not JSON (e.g. Parquet timestamps) are written with ``str()``.
        """
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(json.dumps(entry, default=str) + "\n" for entry in self.entries)


# --------------------------------------------------------------------------- sources


_Source = Source  # the readers' name for it


def _decode_line(file: str, n: int, data: bytes) -> _Item | None:
    """Decode one JSON Lines line; None for a blank line."""
    if not data.strip():
        return None
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return n, None, _bad(file, n, None, f"invalid UTF-8 at byte {e.start}: {e.reason}", "line")
    if n == 1:
        text = text.removeprefix("\ufeff")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        return n, text, _bad(file, n, None, f"invalid JSON: {e}", "line")
    if not isinstance(value, dict):
        return n, value, _bad(file, n, None, f"not a JSON object (got {_tname(value)})", "line")
    return n, value, None


def _iter_lines(file: str, path: Path) -> Iterator[_Item]:
    """Stream a (possibly gzipped) JSON Lines file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    n = 0
    with opener(path, "rb") as fh:
        try:
            for n, data in enumerate(fh, 1):
                item = _decode_line(file, n, data)
                if item is not None:
                    yield item
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            yield n + 1, None, _bad(file, n + 1, None, f"corrupt gzip data: {e}", "line")


def _iter_json(file: str, path: Path) -> Iterator[_Item]:
    """Read a JSON array of objects; fall back to JSON Lines if it is not one."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    if not data.lstrip().startswith(b"["):
        del data
        yield from _iter_lines(file, path)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield line, None, _bad(file, line, None, f"invalid UTF-8 at byte {e.start}: {e.reason}", "line")
        return
    del data
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: JSON Lines named .json
            del text
            yield from _iter_lines(file, path)
        else:
            yield e.lineno, None, _bad(file, e.lineno, None, f"invalid JSON: {e}", "line")
        return
    except (ValueError, RecursionError) as e:
        yield 1, None, _bad(file, 1, None, f"invalid JSON: {e}", "line")
        return
    del text
    for i, item in enumerate(value, 1):
        err = None if isinstance(item, dict) else _bad(file, i, None, f"not a JSON object (got {_tname(item)})", "line")
        yield i, item, err


def _iter_parquet(file: str, path: Path) -> Iterator[_Item]:
    """Stream rows of a Parquet file in batches."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise CoreselectError(f"{file}: cannot read Parquet file: {_one_line(str(e))}") from e
    with pf:  # close the file handle even when the caller stops early
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for item in batch.to_pylist():
                yield row, item, None
                row += 1


def _iter_arrow_dir(file: str, path: Path) -> Iterator[_Item]:
    """Iterate a ``save_to_disk`` folder (a Dataset, or the ``train`` / only split of a DatasetDict)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise CoreselectError(f"{file}: cannot load dataset folder: {_one_line(str(e))}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise CoreselectError(f"{file}: dataset folder has splits {sorted(ds)} and none is 'train'")
    for row, item in enumerate(ds):
        yield row, item, None


def _iter_hub(file: str, name: str, split: str | None) -> Iterator[_Item]:
    """Stream a Hugging Face Hub dataset."""
    import datasets

    try:
        it = iter(datasets.load_dataset(name, split=split or "train", streaming=True))
    except Exception as e:
        raise CoreselectError(
            f"{file}: no such file, and loading it from the Hugging Face Hub failed: "
            f"{type(e).__name__}: {_one_line(str(e))}"
        ) from e
    row = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise CoreselectError(
                f"{file}: reading Hub dataset failed at row {row}: {type(e).__name__}: {_one_line(str(e))}"
            ) from e
        yield row, item, None
        row += 1


def _open_source(p: str | os.PathLike[str]) -> _Source:
    """Decide how to read ``p``; raises CoreselectError for a missing or unsupported path."""
    from coreselect.data.hf_datasets import dataset_source

    if (ds_source := dataset_source(p)) is not None:  # a datasets.Dataset / IterableDataset object
        return ds_source
    file = os.fspath(p)
    file = file.decode() if isinstance(file, bytes) else file
    path = Path(file)
    hub = _HUB_RE.match(file)
    # "org/name" that does not exist is a hub name, unless "org/" is a local folder (then it is a missing path)
    local_parent = hub is not None and not file.startswith("hf:") and path.parent.is_dir() and str(path.parent) != "."
    if file.startswith("hf:") or (
        hub and not path.exists() and not local_parent and not file.lower().endswith(_KNOWN_SUFFIXES)
    ):
        if hub is None:
            raise CoreselectError(f"{file}: not a Hub dataset name (expected hf:org/name[:split])")
        name, split = hub["name"], hub["split"]
        return _Source(file, name.rsplit("/", 1)[-1], "row", lambda: _iter_hub(file, name, split))
    if path.is_dir():
        return _Source(file, path.resolve().name, "row", lambda: _iter_arrow_dir(file, path))
    if not path.exists():
        raise CoreselectError(f"{file}: no such file")
    low = path.name.lower()
    for suffix in _KNOWN_SUFFIXES:
        if low.endswith(suffix):
            stem = path.name[: -len(suffix)] or path.name
            break
    else:
        raise CoreselectError(
            f"{file}: unsupported file type (expected .jsonl, .jsonl.gz, .json, .parquet, "
            "a dataset folder or a Hub name)"
        )
    if suffix == ".parquet":
        return _Source(file, stem, "row", lambda: _iter_parquet(file, path))
    if suffix == ".json":
        return _Source(file, stem, "line", lambda: _iter_json(file, path))
    return _Source(file, stem, "line", lambda: _iter_lines(file, path))


def iter_raw(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """Yield ``(line or row, raw dict)`` per record, or ``(line, BadRecordError)`` where it doesn't decode."""
    for pos, value, err in _open_source(path).rows():
        yield pos, (err if err is not None else value)


# --------------------------------------------------------------------------- normalization

_Turn = tuple[Role, str, str]  # (role, content, field path of the role)


def _text(value: object, field: str) -> str:
    """Check that ``value`` is a non-blank string."""
    if value is None:
        raise _Invalid(field, "missing")
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a string, got {_tname(value)}")
    if not value.strip():
        raise _Invalid(field, "empty content")
    return value


def _turns(value: object, field: str, role_key: str, content_key: str) -> list[_Turn]:
    """Validate a list of ``{role_key, content_key}`` turns (types, roles, non-empty content)."""
    if not isinstance(value, list):
        raise _Invalid(field, f"expected a list of turns, got {_tname(value)}")
    if not value:
        raise _Invalid(field, "empty turn list")
    out: list[_Turn] = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise _Invalid(where, f"expected an object with '{role_key}' and '{content_key}', got {_tname(turn)}")
        role = turn.get(role_key)
        if role is None:
            raise _Invalid(f"{where}.{role_key}", "missing")
        if not isinstance(role, str):
            raise _Invalid(f"{where}.{role_key}", f"expected a string, got {_tname(role)}")
        norm = _ROLES.get(role.strip().lower())
        if norm is None:
            raise _Invalid(f"{where}.{role_key}", f"unknown role '{_short(role)}' (expected system, user or assistant)")
        out.append((norm, _text(turn.get(content_key), f"{where}.{content_key}"), f"{where}.{role_key}"))
    return out


def _check_order(turns: list[_Turn], field: str) -> None:
    """Optional leading system turn, then user/assistant alternating from user, ending with assistant."""
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    if not body:
        raise _Invalid(field, "no user/assistant turns")
    for i, (role, _, where) in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise _Invalid(
                where,
                f"expected role '{want}', got '{role}' (order: optional system, then user/assistant "
                "alternating from user, ending with assistant)",
            )
    if body[-1][0] != "assistant":
        raise _Invalid(field, "conversation must end with an assistant turn")


def _normalize(raw: dict[str, Any]) -> tuple[tuple[Message, ...], Literal["chat", "text"]]:
    """Turn one raw record into messages; raises _Invalid naming the bad field."""

    def has(key: str) -> bool:
        return raw.get(key) is not None

    if has("messages") or has("conversations"):
        field, role_key, content_key = (
            ("messages", "role", "content") if has("messages") else ("conversations", "from", "value")
        )
        turns = _turns(raw[field], field, role_key, content_key)
        _check_order(turns, field)
    elif has("prompt"):
        prompt, completion = raw["prompt"], raw.get("completion")
        if completion is None:
            raise _Invalid("completion", "missing (required with 'prompt')")
        if isinstance(prompt, str) and isinstance(completion, str):
            turns = [
                ("user", _text(prompt, "prompt"), "prompt"),
                ("assistant", _text(completion, "completion"), "completion"),
            ]
        elif isinstance(prompt, list) and isinstance(completion, list):
            turns = _turns(prompt, "prompt", "role", "content") + _turns(completion, "completion", "role", "content")
            _check_order(turns, "completion")
        elif not isinstance(prompt, (str, list)):
            raise _Invalid("prompt", f"expected a string or a list of messages, got {_tname(prompt)}")
        else:
            raise _Invalid(
                "completion",
                f"expected a {'string' if isinstance(prompt, str) else 'list of messages'} "
                f"like 'prompt', got {_tname(completion)}",
            )
    elif has("instruction"):
        instruction = _text(raw["instruction"], "instruction")
        extra = raw.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _Invalid("input", f"expected a string, got {_tname(extra)}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        turns = [("user", user, "instruction"), ("assistant", _text(raw.get("output"), "output"), "output")]
    elif has("text"):
        return (Message("assistant", _text(raw["text"], "text")),), "text"
    else:
        raise _Invalid(_NO_TEXT_FIELD, _NO_TEXT_REASON)
    return tuple(Message(role, content) for role, content, _ in turns), "chat"


def _check_unicode(raw: dict[str, Any]) -> None:
    """Refuse a record holding a lone surrogate anywhere (a key or a string value, at any depth).

    The JSON decoder accepts ``"\\ud800"`` and yields a ``str`` that is not valid Unicode: no
    tokenizer can read it and it cannot be written back as UTF-8 (``coreset.jsonl``), so the
    whole record is refused, naming the field. NUL and other control characters are valid
    Unicode and pass. Iterative, so deep nesting cannot overflow the stack.
    """

    def name(key: object) -> str:  # a field name fit for a one-line, UTF-8 error message
        return str(key).encode("utf-8", "backslashreplace").decode("utf-8")

    stack: list[tuple[str, object]] = []

    def push(prefix: str, value: dict[Any, Any]) -> None:
        for key, item in reversed(list(value.items())):
            where = f"{prefix}{name(key)}"
            reason = surrogate_error(key) if isinstance(key, str) else None
            if reason:
                raise _Invalid(where, f"field name: {reason}")
            stack.append((where, item))

    push("", raw)
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            reason = surrogate_error(value)
            if reason:
                raise _Invalid(where, reason)
        elif isinstance(value, dict):
            push(f"{where}.", value)
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))


def _label(raw: dict[str, Any], key: str) -> str | None:
    """``str(raw[key])`` when present and non-empty, else None."""
    value = raw.get(key)
    if value is None:
        return None
    try:
        text = str(value)
    except (ValueError, RecursionError) as e:
        raise _Invalid(key, f"cannot be turned into a string: {e}") from None
    return text if text.strip() else None


# --------------------------------------------------------------------------- main entry point


def read_records(
    paths: Sequence[str | os.PathLike[str]],
    *,
    on_bad_record: OnBadRecord = "error",
    rejects: RejectLog | None = None,
    start_index: int = 0,
    check_duplicate_ids: bool = True,
) -> Iterator[Record]:
    """Lazily read and normalize records from ``paths``, in order.

    Args:
        paths: files, dataset folders, Hub names or ``datasets.Dataset`` / ``IterableDataset``
            objects (:mod:`coreselect.data.hf_datasets`); a single one is accepted too.
        on_bad_record: ``"error"`` raises the first :class:`BadRecordError`; ``"skip"`` passes it
            to ``rejects.add(err, raw)`` (raw: the decoded value, the undecodable text, or None)
            and goes on.
        rejects: where skipped records go (may be None: skipped silently).
        start_index: ``index`` of the first record yielded; rejected records take no index.
        check_duplicate_ids: reject a record whose ``id`` was already seen in this read.

    Missing or unsupported paths raise :class:`CoreselectError` at call time.
    """
    if on_bad_record not in ("error", "skip"):
        raise CoreselectError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    from coreselect.data.hf_datasets import as_inputs

    paths = as_inputs(paths)  # one path or a list; datasets.Dataset objects are wrapped
    sources = [_open_source(p) for p in paths]
    return _read(sources, on_bad_record, rejects, start_index, check_duplicate_ids)


def pool_records(paths: Sequence[str | os.PathLike[str]]) -> Iterator[Record]:
    """The pool numbered exactly as ``select`` numbers it: every record :func:`read_records`
    would reject (a bad record, or an ``id`` seen before) is skipped and takes no index.

    Use it wherever a record's ``index`` must match a selection's ``scores.parquet``.
    """
    return read_records(paths, on_bad_record="skip")


def _read(
    sources: list[_Source],
    on_bad_record: OnBadRecord,
    rejects: RejectLog | None,
    index: int,
    check_duplicate_ids: bool,
) -> Iterator[Record]:
    """The generator behind :func:`read_records`."""
    seen: dict[str, tuple[str, int]] = {}
    for src in sources:
        for pos, value, err in src.rows():
            if err is None:
                try:
                    messages, kind = _normalize(value)
                    _check_unicode(value)
                    source = _label(value, "dataset") or src.stem
                    rid = _label(value, "id") or f"{source}:{pos}"
                except _Invalid as e:
                    err = _bad(src.file, pos, e.field, e.reason, src.kind)
                else:
                    first = seen.get(rid) if check_duplicate_ids else None
                    if first is not None:
                        reason = f"duplicate id '{_short(rid)}' (first seen at {first[0]}:{first[1]})"
                        err = _bad(src.file, pos, "id", reason, src.kind)
                    else:
                        if check_duplicate_ids:
                            seen[rid] = (src.file, pos)
                        yield Record(index, rid, source, messages, value, src.file, pos, kind)
                        index += 1
                        continue
            if on_bad_record == "error":
                raise err
            if rejects is not None:
                rejects.add(err, value)
