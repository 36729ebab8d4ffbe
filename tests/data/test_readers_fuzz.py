"""Property tests: the reader yields Records or raises BadRecordError, nothing else."""

from __future__ import annotations

import json
import re
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


# --------------------------------------------------------------------------- reader -> Formatter.encode

# Pieces that stress a tokenizer and the span logic: control characters, NUL, lone surrogates (the
# JSON decoder yields them from "\ud800"), separators Python's strip() removes, special-token and
# role-tag spellings, template words.
HOSTILE_PIECES = [
    "\x00",
    "\x01",
    "\x1b[0m",
    "\x7f",
    "\ud800",
    "\udfff",
    "\ud83d\ude00",
    "\u2028",
    "\x85",
    "\ufeff",
    "\u200b",
    "\u202e",
    "e\u0301",
    "漢字",
    "\r\n",
    "\t",
    " ",
    "\n",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|user|>",
    "<|assistant|>\n",
    "user",
    "assistant",
    "system",
    "the cat",
    "Ġ",
    "▁",
]
hostile_text = st.lists(st.sampled_from(HOSTILE_PIECES) | st.text(max_size=6), min_size=1, max_size=8).map("".join)


@st.composite
def hostile_record(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["messages", "text", "alpaca"]))
    if kind == "text":
        return {"text": draw(hostile_text)}
    if kind == "alpaca":
        return {"instruction": draw(hostile_text), "output": draw(hostile_text)}
    roles = ["system"] * draw(st.booleans()) + ["user", "assistant"] * draw(st.integers(1, 2))
    return {"messages": [{"role": r, "content": draw(hostile_text)} for r in roles]}


def _formatters(smol: object) -> list:
    """SmolLM2's real tokenizer (ChatML template, no BOS) and a tiny BOS-adding one (plain and chat)."""
    from coreselect.data.formatting import Formatter
    from data.conftest import make_bos_tokenizer

    bos = make_bos_tokenizer(
        chat_template=(
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}"
            "{% endfor %}"
        )
    )
    return [Formatter(smol, 48), Formatter(smol, 48, "plain"), Formatter(bos, 48), Formatter(bos, 48, "plain")]


_FORMATTERS: list = []


def check_encoded(fmt, rec) -> None:
    """Invariants of one encoded record (see coreselect.data.formatting)."""
    from coreselect.data.formatting import TEMPLATE

    enc = fmt.encode(rec)
    ids = enc.input_ids.tolist()
    assert 0 < len(ids) <= fmt.max_length and len(enc.codes) == len(enc.loss_mask) == len(ids)
    assert enc.n_original >= len(ids)
    special = set(fmt.special_ids.tolist())
    assert all(enc.codes[i] == TEMPLATE for i, t in enumerate(ids) if t in special)
    assert set(enc.codes.tolist()) <= {0, 1, 2}
    rendered, spans = fmt.render(rec)
    bos = fmt.tokenizer.bos_token_id
    if fmt.added_prefix and (rec.kind == "text" or not fmt.use_chat) and not enc.truncated:
        # tokenizer(text) adds BOS: once, plus one per "<s>" the content spells out
        assert ids[0] == bos and ids.count(bos) == 1 + rendered.count(fmt.tokenizer.bos_token)
    # every content character a token covers is covered by tokens of its message's code only (or by
    # a special token the content spelled out). Characters no token claims are skipped: byte-level
    # tokenizers missing a byte (SmolLM2 and U+40000) shift the offsets of the following tokens.
    offsets = enc.offsets.tolist()
    for s, e, code in spans:
        for ch in range(s, e):
            cover = [i for i, (a, b) in enumerate(offsets) if a <= ch < b]
            assert all(enc.codes[i] == code or ids[i] in special for i in cover), (rendered, ch)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_record(), min_size=1, max_size=4), st.booleans())
def test_reader_to_encode_never_tracebacks(smollm2_tokenizer, rows: list[dict], skip: bool) -> None:
    """Every record the reader yields encodes under each formatter; the rest are refused one line each."""
    if not _FORMATTERS:
        _FORMATTERS.extend(_formatters(smollm2_tokenizer))
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "hostile.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="ascii")  # "\ud800" escapes: valid JSON
        log = RejectLog()
        try:
            recs = list(read_records([f], on_bad_record="skip" if skip else "error", rejects=log))
        except BadRecordError as e:
            assert not skip and "\n" not in str(e) and "hostile.jsonl:" in str(e)
            str(e).encode("utf-8")  # printable: no lone surrogate in the message
            return
        for entry in log.entries:
            assert entry["field"] and entry["line"] >= 1
        surrogate = any(re.search("[\ud800-\udfff]", json.dumps(r, ensure_ascii=False)) for r in rows)
        for rec in recs:
            assert not any(0xD800 <= ord(c) <= 0xDFFF for m in rec.messages for c in m.content)
            for fmt in _FORMATTERS:
                check_encoded(fmt, rec)
        # only surrogates and blank content are refused; control characters, NUL and the rest pass
        assert all("lone surrogate" in e["reason"] or "empty content" in e["reason"] for e in log.entries)
        assert surrogate or all("empty content" in e["reason"] for e in log.entries)
