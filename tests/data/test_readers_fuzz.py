"""Property tests: the reader yields Records or raises BadRecordError, nothing else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coreselect.data.readers import RejectLog, read_records
from coreselect.data.records import Record
from coreselect.errors import BadRecordError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
ROLES = ["system", "user", "assistant", "human", "gpt", "bot", "model", "tool", "User", "", None]
turn = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(ROLES) | json_values,
        "content": st.sampled_from(["hi", " ", ""]) | json_values,
        "from": st.sampled_from(ROLES),
        "value": st.sampled_from(["hi", " ", ""]) | json_values,
    },
)
turns = st.lists(turn, max_size=5) | json_values
field_value = st.sampled_from(["x", "", "  ", None]) | json_values
recordish = st.fixed_dictionaries(
    {},
    optional={
        "messages": turns,
        "conversations": turns,
        "prompt": turns | field_value,
        "completion": turns | field_value,
        "instruction": field_value,
        "input": field_value,
        "output": field_value,
        "text": field_value,
        "id": st.sampled_from(["a", "b", 1, None, ""]) | json_values,
        "dataset": field_value,
    },
)

# Mostly well-formed records (roles drawn near the valid order) so that many are actually yielded.
content = st.sampled_from(["hi", "a b", "x\ny", " ", ""]) | st.text(max_size=10)
chat_role = st.sampled_from(["user", "assistant", "system", "human", "gpt", "model", "bot", "tool"])


@st.composite
def conversation(draw: st.DrawFn, role_key: str = "role", content_key: str = "content") -> list[dict]:
    n = draw(st.integers(1, 3))
    roles = ["system"] * draw(st.booleans()) + ["user", "assistant"] * n
    if draw(st.integers(0, 3)) == 0:  # sometimes break the order
        roles[draw(st.integers(0, len(roles) - 1))] = draw(chat_role)
    return [{role_key: r, content_key: draw(content)} for r in roles]


wellformed = st.one_of(
    st.builds(lambda m: {"messages": m}, conversation()),
    st.builds(lambda m: {"conversations": m}, conversation("from", "value")),
    st.builds(lambda p, c: {"prompt": p, "completion": c}, content, content),
    st.builds(lambda m: {"prompt": m[:-1], "completion": m[-1:]}, conversation()),
    st.builds(lambda i, x, o: {"instruction": i, "input": x, "output": o}, content, content | st.none(), content),
    st.builds(lambda t: {"text": t}, content),
).flatmap(
    lambda r: st.fixed_dictionaries(
        {}, optional={"id": st.sampled_from(["a", "b", 1, 2]), "dataset": st.sampled_from(["d", "", "e"])}
    ).map(lambda extra: {**r, **extra})
)


def check_record(rec: Record) -> None:
    assert isinstance(rec, Record) and rec.messages
    assert all(isinstance(m.content, str) and m.content.strip() for m in rec.messages)
    if rec.kind == "text":
        assert [m.role for m in rec.messages] == ["assistant"]
        return
    roles = [m.role for m in rec.messages]
    if roles[0] == "system":
        roles = roles[1:]
    assert roles and len(roles) % 2 == 0
    assert roles == ["user", "assistant"] * (len(roles) // 2)


def run_reader(data: bytes, skip: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "fuzz.jsonl"
        f.write_bytes(data)
        log = RejectLog()
        try:
            recs = list(read_records([f], on_bad_record="skip" if skip else "error", rejects=log))
            for rec in recs:
                check_record(rec)
            assert [r.index for r in recs] == list(range(len(recs)))
            assert len({r.id for r in recs}) == len(recs)
        except BadRecordError as e:
            assert not skip
            assert "\n" not in str(e) and "fuzz.jsonl" in str(e)
        if skip:
            out = Path(d) / "rejects.jsonl"
            log.write(out)
            assert len(out.read_text().splitlines()) == log.count


@SETTINGS
@given(st.lists(wellformed | json_values | recordish, max_size=6), st.booleans())
def test_json_values_per_line(values: list[object], skip: bool) -> None:
    run_reader(b"".join(json.dumps(v).encode() + b"\n" for v in values), skip)


@SETTINGS
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=6), st.booleans())
def test_arbitrary_bytes_per_line(lines: list[bytes], skip: bool) -> None:
    run_reader(b"\n".join(lines), skip)
