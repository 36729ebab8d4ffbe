"""TRIM in bf16 and fp16 on CPU with a tiny random-init model (issue 11, §5).

* bf16 ranks like fp32: Spearman >= 0.98 over the pool, the same top 10% within one record.
* fp16 gives finite scores, or a clear error naming the record.
* saliency, cosine, pooling and fingerprint sums accumulate in fp32 (or wider) whatever the
  dtype of the model's tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import chat, write_jsonl

from coreselect.data.formatting import Formatter
from coreselect.data.readers import read_records
from coreselect.errors import CoreselectError
from coreselect.methods.trim import TrimConfig, TrimMethod
from coreselect.methods.trim_math import (
    FingerprintBuilder,
    pool_scores,
    token_saliency,
    token_scores,
)
from coreselect.models.loading import load_model
from coreselect.models.runner import ModelRunner

NAMES = ["Tom", "Ann", "Natalia", "Liam", "Maria", "Ken"]
THINGS = ["apples", "clips", "eggs", "books", "pens"]
OTHER = [
    ("Write a short poem about the sea.", "The sea is wide, the sea is deep, it sings the sailors off to sleep."),
    ("How do I bake bread?", "Mix flour, water, yeast and salt, knead, let it rise, then bake at 220 degrees."),
    ("Translate to French: good morning.", "Bonjour."),
    ("Summarize the text: the meeting was moved to Friday.", "The meeting is now on Friday."),
    ("Where would you find a fox? A) forest B) ocean C) desert.", "The answer is A, the forest."),
    ("What do people use to cut paper? Choices: scissors, spoon, pillow.", "Answer: scissors."),
]


@pytest.fixture(scope="module")
def precision_pool(tmp_path_factory):
    """40 records: 24 templated arithmetic word problems and 16 other instructions."""
    rows = []
    for i in range(24):
        a, b = 3 + (7 * i) % 40, 2 + (5 * i) % 30
        name, thing = NAMES[i % len(NAMES)], THINGS[i % len(THINGS)]
        rows.append(
            chat(
                i,
                f"{name} has {a} {thing} and gets {b} more. How many {thing} now?",
                f"{a} + {b} = {a + b}. {name} has {a + b} {thing}. The answer is {a + b}.",
                "math",
            )
        )
    for i in range(16):
        u, r = OTHER[i % len(OTHER)]
        rows.append(chat(100 + i, u if i < len(OTHER) else f"{u} ({i})", r, "other"))
    target = [
        chat(900, "What is 12 plus 30?", "10 + 30 = 40, plus 2 is 42. The answer is 42.", "gsm8k"),
        chat(901, "Natalia sold 48 clips and half as many later. Total?", "48 / 2 = 24. 48 + 24 = 72.", "gsm8k"),
    ]
    d = tmp_path_factory.mktemp("precision")
    pool = list(read_records([write_jsonl(d / "pool.jsonl", rows)]))
    return pool, list(read_records([write_jsonl(d / "t.jsonl", target)]))


def _scores(model_dir, dtype, pool, target):
    model, tok = load_model(str(model_dir), device="cpu", dtype=dtype)
    m = TrimMethod(
        ModelRunner(model, tok), Formatter(tok, 256), TrimConfig(layers=2, batch_tokens=2048), progress=False
    )
    return m.fit(target).score(pool)


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_bf16_ranks_like_fp32(tiny_model_dir, precision_pool, one_torch_thread):
    pool, target = precision_pool
    s32 = _scores(tiny_model_dir, "float32", pool, target)
    s16 = _scores(tiny_model_dir, "bfloat16", pool, target)
    assert np.isfinite(s32).all() and np.isfinite(s16).all()
    rho = _spearman(s32, s16)
    n_top = max(1, round(0.1 * len(pool)))
    top32 = set(np.argsort(-s32, kind="stable")[:n_top])
    top16 = set(np.argsort(-s16, kind="stable")[:n_top])
    print(
        f"bf16 vs fp32: spearman {rho:.4f}, top-{n_top} overlap {len(top32 & top16)}, "
        f"max |diff| {np.abs(s32 - s16).max():.2e}"
    )
    assert rho >= 0.98
    assert len(top32 - top16) <= 1


def test_fp16_scores_are_finite(tiny_model_dir, precision_pool, one_torch_thread):
    pool, target = precision_pool
    s32 = _scores(tiny_model_dir, "float32", pool, target)
    s16 = _scores(tiny_model_dir, "float16", pool, target)
    assert np.isfinite(s16).all()
    rho = _spearman(s32, s16)
    print(f"fp16 vs fp32: spearman {rho:.4f}, max |diff| {np.abs(s32 - s16).max():.2e}")
    assert rho >= 0.98


def test_non_finite_states_name_the_record(tiny_model_dir, precision_pool, one_torch_thread):
    pool, target = precision_pool
    model, tok = load_model(str(tiny_model_dir), device="cpu", dtype="float16")
    runner = ModelRunner(model, tok)
    real_hidden = runner.hidden

    def overflowing(batch):  # what an fp16 overflow looks like: inf in one record's states
        h = real_hidden(batch).clone()
        h[0, 1] = float("inf")
        return h

    runner.hidden = overflowing  # type: ignore[method-assign]
    m = TrimMethod(runner, Formatter(tok, 256), TrimConfig(layers=2, batch_tokens=64), progress=False)
    with pytest.raises(CoreselectError, match=r"target record id 90[01]"):
        m.fit(target)
    runner.hidden = real_hidden  # type: ignore[method-assign]
    m.fit(target)
    runner.hidden = overflowing  # type: ignore[method-assign]
    with pytest.raises(CoreselectError, match=r"pool record index \d+"):
        m.score(pool)


def test_saliency_cosine_pooling_accumulate_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 12, 12) * 4
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    attn = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    mask = torch.ones(2, 12)
    mask[1, 9:] = 0
    for dt in (torch.bfloat16, torch.float16):
        low = attn.to(dt)
        got = token_saliency([low, low], mask)
        assert got.dtype == torch.float32
        # identical to the fp32 computation on the same (rounded) probabilities: no low-precision sums
        torch.testing.assert_close(got, token_saliency([low.float(), low.float()], mask), atol=1e-6, rtol=0)

        hidden = torch.randn(2, 12, 16).to(dt)
        ids = torch.randint(0, 10, (2, 12))
        b = FingerprintBuilder()
        b.add(hidden, got, ids, mask.bool())
        assert all(v.dtype == torch.float64 for v in b._sums.values())
        fp = b.finalize()
        emb = torch.randn(10, 8)
        s, in_m, _ = token_scores(fp, hidden, ids, mask.bool(), emb)
        s_ref, _, _ = token_scores(fp, hidden.float(), ids, mask.bool(), emb)
        assert s.dtype == torch.float32
        torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
        score, parts = pool_scores(s, in_m, mask)
        assert score.dtype == parts["mean"].dtype == torch.float32
