"""``datasets.Dataset`` / ``IterableDataset`` objects as pool and target inputs."""

from __future__ import annotations

import copy
import json
import pickle

import datasets
import pyarrow.parquet as pq
import pytest
from conftest import chat

import coreselect
from coreselect.data.hf_datasets import DatasetInput, as_inputs
from coreselect.data.readers import RejectLog, read_records
from coreselect.errors import BadRecordError, CoreselectError


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _bm25(tmp_path, name, pool, target, **kw):
    out = tmp_path / name
    info = coreselect.select(pool=pool, target=target, out=str(out), method="bm25", budget="3", progress=False, **kw)
    return out, info


def test_select_on_datasets_equals_select_on_files(small_pool, tmp_path):
    pool, target = small_pool
    pool_ds = datasets.Dataset.from_list(_rows(pool))
    target_ds = datasets.Dataset.from_list(_rows(target))
    files, _ = _bm25(tmp_path, "files", [str(pool)], [str(target)])
    for name, p, t in [
        ("ds", pool_ds, target_ds),
        ("iterable", pool_ds.to_iterable_dataset(), [target_ds]),
        ("dict", datasets.DatasetDict({"train": pool_ds}), target_ds),
    ]:
        out, info = _bm25(tmp_path, name, p, t)
        assert (out / "coreset.jsonl").read_text() == (files / "coreset.jsonl").read_text(), name
        a, b = pq.read_table(out / "scores.parquet"), pq.read_table(files / "scores.parquet")
        assert a.column("id").to_pylist() == b.column("id").to_pylist()
        assert a.column("score").to_pylist() == b.column("score").to_pylist()
        assert info["counts"]["pool"] == 8 and info["counts"]["target"] == 2
        # run.json names the input by its label
        settings = json.loads((out / "run.json").read_text())["settings"]
        assert settings["pool"][0].startswith(("<Dataset dataset>", "<IterableDataset dataset>"))


def test_mixed_paths_and_datasets_get_distinct_sources(small_pool, tmp_path):
    pool, target = small_pool
    rows = [{"messages": r["messages"]} for r in _rows(pool)]  # no id / dataset fields
    a, b = datasets.Dataset.from_list(rows[:4]), datasets.Dataset.from_list(rows[4:])
    out, info = _bm25(tmp_path, "mix", [a, str(pool), b], target)
    table = pq.read_table(out / "scores.parquet")
    assert info["counts"]["pool"] == 16
    assert set(table.column("source").to_pylist()) == {"dataset", "dataset-2", "math", "other"}
    ids = table.column("id").to_pylist()
    assert ids[:4] == ["dataset:0", "dataset:1", "dataset:2", "dataset:3"]
    assert ids[12:] == ["dataset-2:0", "dataset-2:1", "dataset-2:2", "dataset-2:3"]


def test_dataset_names_and_labels():
    named = datasets.Dataset.from_list([chat(1, "q", "a")], info=datasets.DatasetInfo(dataset_name="alpaca"))
    fmt = datasets.Dataset.from_list([chat(1, "q", "a")], info=datasets.DatasetInfo(dataset_name="json"))
    (a, b, c, p) = as_inputs([named, named, fmt, "x.jsonl"])
    assert (str(a), str(b), str(c), p) == ("<Dataset alpaca>", "<Dataset alpaca-2>", "<Dataset dataset>", "x.jsonl")
    assert isinstance(a, DatasetInput) and a.dataset is named and a.stem == "alpaca"
    assert as_inputs(named) == ["<Dataset alpaca>"] and as_inputs("p.jsonl") == ["p.jsonl"]
    # copies (dataclasses.asdict for run.json) share the object; pickling keeps it
    assert copy.deepcopy(a) is a and pickle.loads(pickle.dumps(a)).dataset[0] == named[0]
    rec = next(read_records(named))
    assert (rec.source, rec.file, rec.line) == ("mix", "<Dataset alpaca>", 0)  # the record's dataset field wins
    bare = datasets.Dataset.from_list([{"text": "hello there"}], info=datasets.DatasetInfo(dataset_name="alpaca"))
    rec = next(read_records([bare]))
    assert (rec.id, rec.source, rec.kind) == ("alpaca:0", "alpaca", "text")


def test_rows_are_plain_python_even_with_a_torch_format():
    ds = datasets.Dataset.from_list([{"prompt": "2+2?", "completion": "4", "n": 3}]).with_format("torch")
    rec = next(read_records(ds))
    assert rec.raw == {"prompt": "2+2?", "completion": "4", "n": 3} and type(rec.raw["n"]) is int


def test_bad_rows_name_the_dataset_and_row(tmp_path):
    rows = [chat(1, "q", "a"), {"id": "2", "messages": []}, chat(3, "q3", "a3")]
    ds = datasets.Dataset.from_list(rows, info=datasets.DatasetInfo(dataset_name="mine"))
    with pytest.raises(BadRecordError, match=r"^<Dataset mine>:row 1: field 'messages': empty turn list$"):
        list(read_records(ds))
    rejects = RejectLog()
    assert [r.id for r in read_records(ds, on_bad_record="skip", rejects=rejects)] == ["1", "3"]
    assert rejects.entries[0]["file"] == "<Dataset mine>" and rejects.entries[0]["line"] == 1
    # select: the same, as a one-line error / rejects.jsonl
    out = tmp_path / "run"
    coreselect.select(pool=ds, out=str(out), method="random", budget="1", on_bad_record="skip", progress=False)
    assert json.loads((out / "rejects.jsonl").read_text())["file"] == "<Dataset mine>"


def test_a_dataset_label_cannot_be_reread_from_run_json():
    with pytest.raises(CoreselectError, match=r"<Dataset mine>: an in-memory datasets object .* save it first"):
        list(read_records(["<Dataset mine>"]))


def test_dataset_dict_without_train_split_is_an_error():
    dd = datasets.DatasetDict(
        {"a": datasets.Dataset.from_list([chat(1, "q", "a")]), "b": datasets.Dataset.from_list([chat(2, "q", "a")])}
    )
    with pytest.raises(CoreselectError, match=r"splits \['a', 'b'\] and none is 'train'"):
        list(read_records(dd))
    assert [r.id for r in read_records(datasets.DatasetDict({"test": dd["a"]}))] == ["1"]
