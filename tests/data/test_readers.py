"""Tests for coreselect.data.readers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from coreselect.data.readers import RejectLog, iter_raw, read_records
from coreselect.data.records import Message, Record
from coreselect.errors import BadRecordError, CoreselectError


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def roles_contents(rec: Record) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in rec.messages]


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("raw", "expected", "kind"),
    [
        (
            {
                "messages": [
                    {"role": "system", "content": "be nice"},
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a2"},
                ]
            },
            [("system", "be nice"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")],
            "chat",
        ),
        (
            {"messages": [{"role": "human", "content": "q"}, {"role": "model", "content": "a"}]},
            [("user", "q"), ("assistant", "a")],
            "chat",
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "sys"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            [("system", "sys"), ("user", "q"), ("assistant", "a")],
            "chat",
        ),
        (
            {"conversations": [{"from": "user", "value": "q"}, {"from": "bot", "value": "a"}]},
            [("user", "q"), ("assistant", "a")],
            "chat",
        ),
        ({"prompt": "P", "completion": "C"}, [("user", "P"), ("assistant", "C")], "chat"),
        (
            {
                "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "P"}],
                "completion": [{"role": "assistant", "content": "C"}],
            },
            [("system", "s"), ("user", "P"), ("assistant", "C")],
            "chat",
        ),
        (
            {"instruction": "Do X", "input": "with Y", "output": "done"},
            [("user", "Do X\n\nwith Y"), ("assistant", "done")],
            "chat",
        ),
        ({"instruction": "Do X", "input": "", "output": "done"}, [("user", "Do X"), ("assistant", "done")], "chat"),
        ({"instruction": "Do X", "output": "done"}, [("user", "Do X"), ("assistant", "done")], "chat"),
        ({"instruction": "Do X", "input": None, "output": "done"}, [("user", "Do X"), ("assistant", "done")], "chat"),
        ({"text": "just text"}, [("assistant", "just text")], "text"),
    ],
)
def test_shapes_normalize(tmp_path: Path, raw: dict, expected: list, kind: str) -> None:
    f = write_jsonl(tmp_path / "pool.jsonl", [raw])
    (rec,) = list(read_records([f]))
    assert roles_contents(rec) == expected
    assert rec.kind == kind
    assert rec.raw == raw
    assert all(isinstance(m, Message) for m in rec.messages)


def test_precedence(tmp_path: Path) -> None:
    rows = [
        {
            **CHAT,
            "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
            "prompt": "p",
            "completion": "c",
            "instruction": "i",
            "output": "o",
            "text": "t",
        },
        {
            "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
            "prompt": "p",
            "completion": "c",
            "text": "t",
        },
        {"prompt": "p", "completion": "c", "instruction": "i", "output": "o", "text": "t"},
        {"instruction": "i", "output": "o", "text": "t"},
        {"messages": None, "text": "t"},  # null counts as absent
    ]
    recs = list(read_records([write_jsonl(tmp_path / "p.jsonl", rows)]))
    assert [r.messages[0].content for r in recs] == ["hi", "x", "p", "i", "t"]
    assert recs[-1].kind == "text"


def test_ids_sources_indices_across_files(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "alpha.jsonl", [CHAT, {**CHAT, "id": 7}, {**CHAT, "dataset": "flan"}])
    b = tmp_path / "beta.jsonl"
    b.write_text("\n" + json.dumps(CHAT) + "\n\n" + json.dumps({**CHAT, "id": "x", "dataset": "cot"}) + "\n")
    recs = list(read_records([a, str(b)], start_index=10))
    assert [r.index for r in recs] == [10, 11, 12, 13, 14]
    assert [r.id for r in recs] == ["alpha:1", "7", "flan:3", "beta:2", "x"]
    assert [r.source for r in recs] == ["alpha", "alpha", "flan", "beta", "cot"]
    assert [r.line for r in recs] == [1, 2, 3, 2, 4]
    assert [r.file for r in recs] == [str(a)] * 3 + [str(b)] * 2


def test_single_path_accepted(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "one.jsonl", [CHAT])
    assert len(list(read_records(f))) == 1  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- bad records

BAD_CASES = [
    ({"messages": "hi"}, "messages", "expected a list"),
    ({"messages": []}, "messages", "empty turn list"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
        "messages[1].content",
        "expected a string",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}]},
        "messages[1].content",
        "empty content",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]},
        "messages[1].role",
        "unknown role",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q"},
                {"role": "user", "content": "a"},
            ]
        },
        "messages[3].role",
        "expected role 'assistant'",
    ),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "messages[0].role", "expected role 'user'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "end with an assistant"),
    ({"messages": [{"role": "system", "content": "s"}]}, "messages", "no user/assistant"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
        "messages[1].role",
        "expected role 'assistant'",
    ),
    ({"messages": ["hi"]}, "messages[0]", "expected an object"),
    ({"messages": [{"content": "q"}]}, "messages[0].role", "missing"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "conversations[1].value", "missing"),
    ({"prompt": "p"}, "completion", "missing"),
    ({"prompt": "p", "completion": ["c"]}, "completion", "expected a string"),
    ({"prompt": 5, "completion": "c"}, "prompt", "expected a string or a list"),
    ({"prompt": "", "completion": "c"}, "prompt", "empty content"),
    ({"instruction": "i"}, "output", "missing"),
    ({"instruction": "i", "input": 3, "output": "o"}, "input", "expected a string"),
    ({"instruction": ["i"], "output": "o"}, "instruction", "expected a string"),
    ({"text": 42}, "text", "expected a string"),
    ({"foo": "bar"}, "messages|prompt|instruction|text", "no known text field"),
]


@pytest.mark.parametrize(("raw", "field", "reason"), BAD_CASES)
def test_bad_records_raise(tmp_path: Path, raw: dict, field: str, reason: str) -> None:
    f = write_jsonl(tmp_path / "bad.jsonl", [CHAT, CHAT, raw])
    with pytest.raises(BadRecordError) as info:
        list(read_records([f]))
    err = info.value
    assert (err.line, err.field) == (3, field)
    assert reason in err.reason
    assert "bad.jsonl:3" in str(err) and f"field '{field}'" in str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"a string"', "not a JSON object"),
        (b'{"text": "caf\xe9"}', "invalid UTF-8"),
    ],
)
def test_undecodable_lines(tmp_path: Path, line: bytes, reason: str) -> None:
    f = tmp_path / "raw.jsonl"
    f.write_bytes(json.dumps(CHAT).encode() + b"\n\n" + line + b"\n")
    with pytest.raises(BadRecordError) as info:
        list(read_records([f]))
    assert info.value.line == 3 and info.value.field is None
    assert reason in str(info.value) and "raw.jsonl:3" in str(info.value)


def test_duplicate_ids(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{**CHAT, "id": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{**CHAT, "id": "y"}, {**CHAT, "id": "x"}])
    with pytest.raises(BadRecordError) as info:
        list(read_records([a, b]))
    assert info.value.field == "id" and info.value.line == 2
    assert info.value.reason == f"duplicate id 'x' (first seen at {a}:1)"
    assert "b.jsonl:2" in str(info.value)
    assert len(list(read_records([a, b], check_duplicate_ids=False))) == 3


def test_long_reason_is_one_truncated_line(tmp_path: Path) -> None:
    role = "x\n" * 500
    f = write_jsonl(tmp_path / "l.jsonl", [{"messages": [{"role": role, "content": "c"}]}])
    with pytest.raises(BadRecordError) as info:
        list(read_records([f]))
    assert "\n" not in str(info.value) and len(info.value.reason) <= 200


def test_missing_file_and_bad_option(tmp_path: Path) -> None:
    with pytest.raises(CoreselectError, match="no such file"):
        read_records([tmp_path / "nope.jsonl"])
    with pytest.raises(CoreselectError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("hi")
        read_records([tmp_path / "x.txt"])
    with pytest.raises(CoreselectError, match="on_bad_record"):
        read_records([], on_bad_record="ignore")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- skip mode


def test_skip_mode_and_reject_log(tmp_path: Path) -> None:
    f = tmp_path / "mix.jsonl"
    f.write_bytes(
        b"\n".join(
            [
                json.dumps({**CHAT, "id": "a"}).encode(),
                b"{broken",
                json.dumps({"foo": 1}).encode(),
                b"\xff\xfe",
                json.dumps({**CHAT, "id": "a"}).encode(),
                json.dumps({"text": "ok"}).encode(),
            ]
        )
        + b"\n"
    )
    log = RejectLog()
    recs = list(read_records([f], on_bad_record="skip", rejects=log, start_index=5))
    assert [(r.index, r.line) for r in recs] == [(5, 1), (6, 6)]
    assert log.count == 4
    out = tmp_path / "rejects.jsonl"
    log.write(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [2, 3, 4, 5]
    assert [r["field"] for r in rows] == [None, "messages|prompt|instruction|text", None, "id"]
    assert rows[0]["record"] == "{broken" and rows[1]["record"] == {"foo": 1} and rows[2]["record"] is None
    assert all(set(r) == {"file", "line", "field", "reason", "record"} for r in rows)
    assert all(r["file"] == str(f) for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.jsonl", "rejects.jsonl"]  # no temp left


def test_reject_log_write_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "rejects.jsonl"
    out.write_text("old\n")
    log = RejectLog()
    log.add(BadRecordError("f", 1, None, "r"), object())  # not JSON-serializable -> str() fallback
    log.write(out)
    assert json.loads(out.read_text())["line"] == 1
    empty = RejectLog()
    empty.write(out)
    assert out.read_text() == "" and empty.count == 0
    assert [p.name for p in tmp_path.iterdir()] == ["rejects.jsonl"]


def test_skip_without_log(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "s.jsonl", [{"foo": 1}, CHAT])
    assert [r.index for r in read_records([f], on_bad_record="skip")] == [0]


# ----------------------------------------------------------------------------- formats


def test_jsonl_gz(tmp_path: Path) -> None:
    f = tmp_path / "pool.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(CHAT) + "\n" + json.dumps({"text": "t"}) + "\n")
    recs = list(read_records([f]))
    assert [r.id for r in recs] == ["pool:1", "pool:2"]


def test_corrupt_gzip(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl.gz"
    f.write_bytes(gzip.compress((json.dumps(CHAT) + "\n").encode() * 100)[:-20])
    with pytest.raises(BadRecordError, match="gzip"):
        list(read_records([f]))


def test_json_array_and_fallback(tmp_path: Path) -> None:
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([CHAT, {"text": "t"}], indent=2))
    recs = list(read_records([arr]))
    assert [(r.id, r.line) for r in recs] == [("arr:1", 1), ("arr:2", 2)]
    jl = write_jsonl(tmp_path / "lines.json", [CHAT, {"text": "t"}])
    assert [r.line for r in read_records([jl])] == [1, 2]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([CHAT, 5]))
    with pytest.raises(BadRecordError, match=r"bad.json:2: not a JSON object"):
        list(read_records([bad]))
    broken = tmp_path / "broken.json"
    broken.write_text("[\n" + json.dumps(CHAT) + ",\n{oops\n]")
    with pytest.raises(BadRecordError, match=r"broken.json:3: invalid JSON"):
        list(read_records([broken]))


def test_parquet_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "pq.parquet"
    table = pa.Table.from_pylist(
        [
            {"instruction": "i0", "input": "", "output": "o0", "text": None},
            {"instruction": None, "input": None, "output": None, "text": "t1"},
            {"instruction": "i2", "input": "x", "output": None, "text": None},
        ]
    )
    pq.write_table(table, f, row_group_size=2)
    it = read_records([f])
    r0, r1 = next(it), next(it)
    assert (r0.line, r0.id, roles_contents(r0)) == (0, "pq:0", [("user", "i0"), ("assistant", "o0")])
    assert (r1.line, r1.kind, r1.messages[0].content) == (1, "text", "t1")
    with pytest.raises(BadRecordError) as info:
        next(it)
    assert str(info.value).startswith(f"{f}:row 2: field 'output'")


def test_load_from_disk_folder(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "arrowpool"
    datasets.Dataset.from_list(
        [
            {"messages": CHAT["messages"], "id": "m0"},
            {"messages": [{"role": "user", "content": "only"}], "id": "m1"},
        ]
    ).save_to_disk(str(folder))
    log = RejectLog()
    recs = list(read_records([folder], on_bad_record="skip", rejects=log))
    assert [(r.id, r.line, r.source) for r in recs] == [("m0", 0, "arrowpool")]
    assert log.entries[0]["line"] == 1 and log.entries[0]["record"]["id"] == "m1"
    with pytest.raises(BadRecordError, match=r"arrowpool:row 1: field 'messages'"):
        list(read_records([folder]))
    assert [pos for pos, _ in iter_raw(folder)] == [0, 1]


def test_laziness(tmp_path: Path) -> None:
    f = tmp_path / "lazy.jsonl"
    f.write_bytes(json.dumps(CHAT).encode() + b"\n" + b"\xff garbage {{{\n" * 1000)
    rec = next(iter(read_records([f])))
    assert rec.messages[1].content == "hello"


def test_iter_raw(tmp_path: Path) -> None:
    f = tmp_path / "r.jsonl"
    f.write_bytes(b'{"a": 1}\n\nnope\n')
    items = list(iter_raw(f))
    assert items[0] == (1, {"a": 1})
    assert items[1][0] == 3 and isinstance(items[1][1], BadRecordError)


def test_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load(name, split=None, streaming=False):
        calls.append((name, split, streaming))
        return iter([{"prompt": "p", "completion": "c"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    (rec,) = list(read_records(["hf:org/myset:test"]))
    assert calls == [("org/myset", "test", True)]
    assert (rec.source, rec.id, rec.line) == ("myset", "myset:0", 0)
    list(read_records(["org/other"]))
    assert calls[-1] == ("org/other", "train", True)

    def offline(*a, **k):
        raise ConnectionError("no network\nat all")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CoreselectError) as info:
        list(read_records(["org/other"]))
    assert "org/other" in str(info.value) and "\n" not in str(info.value)


def test_missing_path_under_a_local_folder_is_not_a_hub_name(tmp_path, monkeypatch):
    import datasets

    def no_hub(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("tried the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(CoreselectError, match="no such file"):
        list(read_records(["data/pool"]))
