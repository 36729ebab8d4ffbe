"""``coreselect export DIR --format trl|llamafactory|axolotl``: hand a coreset to a training tool.

Each format writes the coreset (best first) as JSON Lines plus the dataset entry the tool reads:

========================= ========================================== ==================================
format                    files in ``--out``                         use it with
========================= ========================================== ==================================
``trl``                   ``coreset.jsonl``                          ``SFTTrainer(train_dataset=
                                                                     load_dataset("json", data_files=
                                                                     ".../coreset.jsonl", split="train"))``
``llamafactory``          ``coreset.jsonl`` + ``dataset_info.json``  ``dataset_dir: OUT``, ``dataset: coreset``
                          (an existing one is updated, not replaced)
``axolotl``               ``coreset.jsonl`` + ``axolotl.yaml``       paste its ``datasets:`` entry into
                                                                     the axolotl config
========================= ========================================== ==================================

Every format also gets ``coreset.export.json`` (``NAME.export.json``: what was converted, from
which run).

**Conversion.** Records are written in the shape coreselect itself scored them
(:func:`coreselect.data.readers.read_records`), as OpenAI-style ``messages`` (``role`` / ``content``,
roles ``system`` / ``user`` / ``assistant``):

* ``messages``: as they are (roles normalized to lower case);
* ShareGPT ``conversations`` (``from``/``value``, ``human``/``gpt``): renamed to ``messages``;
* ``prompt``/``completion`` strings: one ``user`` and one ``assistant`` turn; TRL's
  conversational ``prompt``/``completion`` lists: concatenated into one conversation;
* Alpaca ``instruction``/``input``/``output``: ``user`` = instruction, a blank line, input
  (instruction only when input is empty), ``assistant`` = output;
* ``text``: when *every* coreset record is plain text, the export is a plain-text (language
  modeling / pre-training) dataset instead: ``{"text": ...}`` rows, TRL's language-modeling
  format, LLaMA-Factory's ``columns: {prompt: text}`` (``stage: pt``), axolotl's
  ``type: completion``. In a coreset that mixes text with chat records, a text record becomes a
  conversation with an empty ``user`` turn and the text as the ``assistant`` turn (the loss stays
  on the whole text, as in coreselect's own training), and the command says how many.

Each row also carries ``id``: the record's pool id (its ``id`` field, else ``<source>:<line>``),
which every tool ignores and which ties a training example back to ``scores.parquet``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coreselect.errors import ConfigError, CoreselectError
from coreselect.io import atomic_path, write_json, write_jsonl

__all__ = ["FORMATS", "ExportArgs", "export"]

FORMATS = ("trl", "llamafactory", "axolotl")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass
class ExportArgs:
    """Arguments of ``coreselect export``.

    Attributes:
        dir: a finished selection run folder (``coreset.jsonl`` + ``scores.parquet``).
        format: ``trl``, ``llamafactory`` or ``axolotl``.
        out: export folder (default: DIR/export/FORMAT). For LLaMA-Factory this may be its data
            folder, whose dataset_info.json then gets the entry added.
        name: dataset name: the data file is NAME.jsonl and the LLaMA-Factory entry is NAME.
        overwrite: replace an earlier export of the same name in the export folder.
        progress: show a progress bar.
    """

    dir: str = ""
    format: str = "trl"
    out: str = ""
    name: str = "coreset"
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.dir:
            raise ConfigError("no run folder given (coreselect export DIR --format FORMAT)")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown export format {self.format!r} (expected {', '.join(FORMATS)})")
        if not self.name or not set(self.name) <= _NAME_CHARS or self.name.startswith("."):
            raise ConfigError(f"name must be letters, digits, '_', '-' or '.', got {self.name!r}")


def _messages(rec: Any) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in rec.messages]


def convert(records: list[Any]) -> tuple[str, list[dict[str, Any]], dict[str, int]]:
    """``(shape, rows, counts)``: ``shape`` is ``messages`` or ``text``; ``rows`` the converted
    records; ``counts`` how many records of each input shape were converted."""
    counts: dict[str, int] = {}
    for rec in records:
        raw = rec.raw
        shape = (
            "text"
            if rec.kind == "text"
            else "messages"
            if raw.get("messages") is not None
            else "conversations"
            if raw.get("conversations") is not None
            else "prompt-completion"
            if raw.get("prompt") is not None
            else "alpaca"
        )
        counts[shape] = counts.get(shape, 0) + 1
    if records and counts.get("text", 0) == len(records):
        return "text", [{"text": rec.messages[0].content} for rec in records], counts
    rows = []
    for rec in records:
        if rec.kind == "text":
            msgs = [{"role": "user", "content": ""}, {"role": "assistant", "content": rec.messages[0].content}]
        else:
            msgs = _messages(rec)
        rows.append({"messages": msgs})
    return "messages", rows, counts


def _llamafactory_entry(shape: str, file_name: str) -> dict[str, Any]:
    if shape == "text":  # pre-training format (stage: pt)
        return {"file_name": file_name, "columns": {"prompt": "text"}}
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }


def _axolotl_entry(shape: str, data: Path) -> dict[str, Any]:
    if shape == "text":
        return {"path": str(data), "ds_type": "json", "type": "completion", "field": "text"}
    return {
        "path": str(data),
        "ds_type": "json",
        "type": "chat_template",
        "field_messages": "messages",
        "message_property_mappings": {"role": "role", "content": "content"},
        "roles_to_train": ["assistant"],
    }


def _check_free(paths: list[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for p in paths:
        if p.exists():
            raise CoreselectError(f"{p}: exists (use --overwrite or another --name / --out)")


def export(args: ExportArgs | None = None, /, **kwargs: Any) -> dict[str, Any]:
    """Write the coreset of run folder ``args.dir`` for ``args.format``; return the manifest's dict.

    Call it with an :class:`ExportArgs` or with its fields as keywords
    (``export(dir="runs/x", format="trl")``).
    """
    from coreselect.config import args_from_dict
    from coreselect.coreset import selected_rows
    from coreselect.data.readers import read_records
    from coreselect.progress import progress_bar

    if args is None:
        args = args_from_dict(ExportArgs, kwargs, source="coreselect.export()")
    elif kwargs:
        raise ConfigError("pass either an ExportArgs or keyword arguments to export(), not both")
    args.validate()
    run = Path(args.dir)
    scores = selected_rows(run)  # also: one-line errors for a folder that holds no finished run
    out = Path(args.out) if args.out else run / "export" / args.format
    data = out / f"{args.name}.jsonl"
    manifest = out / f"{args.name}.export.json"
    info_files = {"trl": manifest, "llamafactory": out / "dataset_info.json", "axolotl": out / "axolotl.yaml"}
    info_file = info_files[args.format]
    existing: dict[str, Any] = {}
    if args.format == "llamafactory" and info_file.is_file():  # maybe LLaMA-Factory's own data/ folder
        try:
            existing = json.loads(info_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CoreselectError(f"{info_file}: invalid JSON: {e}") from None
        if not isinstance(existing, dict):
            raise CoreselectError(f"{info_file}: not a JSON object of dataset entries")
        if args.name in existing and not args.overwrite:
            raise CoreselectError(f"{info_file}: already has a dataset {args.name!r} (use --name or --overwrite)")
        _check_free([data], args.overwrite)
    else:
        _check_free([data] + ([info_file] if args.format != "trl" else []), args.overwrite)

    records = []
    with progress_bar(len(scores), f"export {args.format}", enabled=args.progress) as bar:
        for rec in read_records([run / "coreset.jsonl"], check_duplicate_ids=False):
            records.append(rec)
            bar.update(1)
    if len(records) != len(scores):
        raise CoreselectError(
            f"{run}: coreset.jsonl has {len(records)} records but scores.parquet selects "
            f"{len(scores)} (the folder mixes two runs; rerun select with --overwrite)"
        )
    shape, rows, counts = convert(records)
    for row, sc in zip(rows, scores, strict=True):
        row["id"] = sc["id"]
    n_text_as_chat = counts.get("text", 0) if shape == "messages" else 0

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(data, rows)
    entry: Any = None
    if args.format == "llamafactory":
        entry = _llamafactory_entry(shape, data.name)
        write_json(info_file, {**existing, args.name: entry})
    elif args.format == "axolotl":
        import yaml

        entry = _axolotl_entry(shape, data.resolve())
        head = (
            f"# axolotl dataset entry for the coreselect coreset of {run.resolve()}\n"
            f"# ({len(rows)} records, best first; {'plain text' if shape == 'text' else 'chat messages'}).\n"
            "# Merge this datasets: list into your axolotl config.\n"
        )
        with atomic_path(info_file) as tmp:
            tmp.write_text(head + yaml.safe_dump({"datasets": [entry]}, sort_keys=False), encoding="utf-8")
    info = {
        "command": "export",
        "format": args.format,
        "run": str(run.resolve()),
        "data": str(data.resolve()),
        "entry_file": None if args.format == "trl" else str(info_file.resolve()),
        "name": args.name,
        "manifest": str(manifest.resolve()),
        "records": len(rows),
        "shape": shape,
        "input_shapes": counts,
        "text_as_chat": n_text_as_chat,
        "entry": entry,
    }
    write_json(manifest, info)
    return info


def _show(path: str | Path) -> str:
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def usage_hint(info: dict[str, Any]) -> str:
    """One line that says how the tool picks the export up."""
    data = _show(info["data"])
    if info["format"] == "trl":
        return f'use: SFTTrainer(..., train_dataset=load_dataset("json", data_files="{data}", split="train"))'
    if info["format"] == "llamafactory":
        return f"use: dataset_dir: {_show(Path(info['entry_file']).parent)}, dataset: {info['name']}" + (
            ", stage: pt" if info["shape"] == "text" else ""
        )
    return f"use: merge the datasets: entry of {_show(info['entry_file'])} into your axolotl config"
