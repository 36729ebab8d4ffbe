"""scripts/answer_loss.py: the letter / rest split adds back up to the held-out loss."""

from __future__ import annotations

import json
import math

import pytest
from conftest import load_script

from coreselect.data.formatting import Formatter
from coreselect.data.readers import read_records
from coreselect.eval.heldout import heldout_loss
from coreselect.models.loading import load_model


@pytest.fixture(scope="module")
def script():
    return load_script("answer_loss")


def _mc(i: int, options: list[str], answer: int) -> dict:
    letters = "ABCDE"
    prompt = "Pick one.\n\n" + "\n".join(f"{letters[j]}. {o}" for j, o in enumerate(options))
    prompt += "\n\nAnswer with the letter of the correct option."
    reply = f"{letters[answer]}. {options[answer]}"
    return {"id": f"q{i}", "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def test_split_sums_to_the_heldout_loss(script, tiny_model_dir, tmp_path):
    """Per example, (letter + (k - 1) * rest) / k is the held-out loss over its k response tokens;
    ln(options) counts the lettered options of the prompt (2 and 3 here)."""
    rows = [_mc(0, ["red apple", "blue sky"], 1), _mc(1, ["cat", "dog", "cow"], 0), _mc(2, ["up", "down"], 0)]
    path = tmp_path / "heldout_toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    fmt = Formatter(tok, 128)
    recs = list(read_records([str(path)]))
    split = [script.example_split(model, fmt, r) for r in recs]
    assert all(s is not None for s in split)
    ref = heldout_loss(model, tok, [str(path)], max_length=128, batch_size=2)["per_example"]
    for (letter, rest, _hit, k, _opts), ex in zip(split, ref):
        assert k == ex["tokens"]
        assert (letter + (k - 1) * rest) / k == pytest.approx(ex["loss"], rel=1e-4)
    assert [s[4] for s in split] == [2, 3, 2]
    agg = script.split_losses(model, fmt, str(path))
    assert agg["n"] == 3 and agg["chance"] == pytest.approx((2 * math.log(2) + math.log(3)) / 3)
    assert agg["letter"] == pytest.approx(sum(s[0] for s in split) / 3)
    assert agg["top1"] == sum(s[2] for s in split) / 3
