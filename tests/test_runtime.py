"""coreselect.runtime: the pool scan's chat-template check."""

from __future__ import annotations

import json

import pytest
from conftest import system_refusing_model

from coreselect.config import SelectArgs
from coreselect.errors import BadRecordError
from coreselect.models import loading
from coreselect.runtime import scan_pool, template_refusals


def _counting_loads(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = loading.load_tokenizer

    def counted(spec, trust_remote_code=False):
        calls.append(spec.path)
        return real(spec, trust_remote_code)

    monkeypatch.setattr(loading, "load_tokenizer", counted)
    return calls


def test_scan_checks_the_template_once_per_model_and_turn_orders(tiny_model_dir, small_pool, tmp_path, monkeypatch):
    """``compare`` / ``experiment`` scan the same pool once per method: the tokenizer is loaded for
    the first scan only, and a model-free method never loads it."""
    template_refusals.cache_clear()
    calls = _counting_loads(monkeypatch)
    pool, target = small_pool
    args = SelectArgs(pool=[str(pool)], target=[str(target)], model=str(tiny_model_dir), out=str(tmp_path / "o"))
    assert scan_pool(args)[0] == 8
    assert scan_pool(args)[0] == 8
    assert calls == [str(tiny_model_dir)]
    args.method = "bm25"
    assert scan_pool(args)[0] == 8
    assert len(calls) == 1


def test_cached_refusal_still_names_each_pools_first_record(tiny_model_dir, small_pool, tmp_path, monkeypatch):
    """The cache holds the template's answer per turn order, not the records: a second pool with the
    same refused turn order is stopped at its own first such record."""
    template_refusals.cache_clear()
    calls = _counting_loads(monkeypatch)
    model = system_refusing_model(tiny_model_dir, tmp_path / "model", "no system")
    pool, target = small_pool
    lines = pool.read_text().splitlines()
    rec = json.loads(lines[2]) | {"id": "sys"}
    rec["messages"].insert(0, {"role": "system", "content": "Be brief."})
    for at in (3, 6):
        bad = tmp_path / f"sys{at}.jsonl"
        bad.write_text("\n".join([*lines[: at - 1], json.dumps(rec), *lines[at - 1 :]]) + "\n")
        args = SelectArgs(pool=[str(bad)], target=[str(target)], model=str(model), out=str(tmp_path / "o"))
        with pytest.raises(BadRecordError, match=rf"sys{at}\.jsonl:{at}: field 'messages': .*no system"):
            scan_pool(args)
    assert len(calls) == 1
