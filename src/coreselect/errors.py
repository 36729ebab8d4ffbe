"""Errors that the CLI turns into a one-line message and a non-zero exit code."""

from __future__ import annotations


class CoreselectError(Exception):
    """Base class: anything the user can fix (bad input, bad flag, missing file)."""


class BadRecordError(CoreselectError):
    """A record that cannot be read or formatted.

    The message names the file, the line (JSONL, 1-based) or row (Parquet/Arrow, 0-based
    row index) and the field, e.g. ``pool.jsonl:17: field 'messages': empty turn list``.
    """

    def __init__(self, file: str, line: int | None, field: str | None, reason: str, *, kind: str = "line"):
        self.file, self.line, self.field, self.reason, self.kind = file, line, field, reason, kind
        where = file if line is None else f"{file}:{kind} {line}" if kind != "line" else f"{file}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {reason}")


class ConfigError(CoreselectError):
    """A bad flag, config key or combination of settings."""
