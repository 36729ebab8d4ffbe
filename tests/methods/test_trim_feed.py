"""Stage II's feed: batched / parallel encoding, host-side collation, packing, no per-batch
device round trips. Outputs must equal the plain sequential path (issue 14, §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coreselect.data.formatting import EncodePool, Formatter
from coreselect.data.readers import read_records
from coreselect.methods.trim import TrimConfig, TrimMethod
from coreselect.models.loading import load_model
from coreselect.models.runner import ModelRunner, collate, pack_rows, token_budget_batches


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def _records(small_pool):
    pool, target = small_pool
    return list(read_records([str(pool)])), list(read_records([str(target)]))


def _old_collate(encoded, positions, pad_id, padding_side):
    """The collate of commit ed12b8c (torch cumsum position ids), the reference."""
    items = [encoded[p] for p in positions]
    width = max(len(e) for e in items)
    b = len(items)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    codes = np.zeros((b, width), dtype=np.int8)
    loss = np.zeros((b, width), dtype=bool)
    for r, e in enumerate(items):
        n = len(e)
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[r, sl], mask[r, sl], codes[r, sl], loss[r, sl] = e.input_ids, 1, e.codes, e.loss_mask
    mask_t = torch.from_numpy(mask)
    return ids, mask, (mask_t.cumsum(-1) - 1).clamp(min=0).numpy(), codes, loss


def _same_encoded(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.index == y.index and x.n_original == y.n_original
        for f in ("input_ids", "codes", "loss_mask", "offsets"):
            u, v = getattr(x, f), getattr(y, f)
            assert u.dtype == v.dtype and u.tobytes() == v.tobytes(), f


@pytest.mark.parametrize("side", ["right", "left"])
def test_host_collate_is_byte_identical_to_the_old_one(loaded, small_pool, side):
    _, tok = loaded
    pool, _ = _records(small_pool)
    enc = [Formatter(tok, 256).encode(r) for r in pool]
    for positions in ([0], [1, 3, 5], list(range(len(enc)))):
        b = collate(enc, positions, 0, side)
        ref = _old_collate(enc, positions, 0, side)
        got = (b.input_ids, b.attention_mask, b.position_ids, b.codes, b.loss_mask)
        for g, r in zip(got, ref):
            assert g.numpy().dtype == r.dtype and g.numpy().tobytes() == r.tobytes()
        assert b.n_real_tokens == int(b.attention_mask.sum())


def test_batched_and_worker_encoding_give_identical_arrays(loaded, small_pool):
    _, tok = loaded
    pool, target = _records(small_pool)
    records = pool + target
    ref = [Formatter(tok, 24).encode(r) for r in records]  # 24: some records are truncated
    _same_encoded(Formatter(tok, 24).encode_many(records), ref)
    with EncodePool(Formatter(tok, 24), workers=2, chunk=3) as ep:
        _same_encoded(ep.encode(records), ref)


def _trim(loaded, **cfg):
    model, tok = loaded
    return TrimMethod(ModelRunner(model, tok), Formatter(tok, 256), TrimConfig(layers=2, **cfg), progress=False)


def test_stage2_scores_equal_one_record_per_batch(loaded, small_pool):
    pool, target = _records(small_pool)
    one = _trim(loaded, batch_tokens=1).fit(target).score(pool)  # a batch per record
    many = _trim(loaded, batch_tokens=4096).fit(target).score(pool)
    np.testing.assert_allclose(many, one, rtol=0, atol=1e-5)


def test_packing_gives_the_padded_scores(loaded, small_pool):
    pool, target = _records(small_pool)
    padded = _trim(loaded).fit(target).score(pool)
    for budget in (64, 4096):
        packed = _trim(loaded, packing=True, batch_tokens=budget).fit(target).score(pool)
        np.testing.assert_allclose(packed, padded, rtol=0, atol=1e-5)


def test_pack_rows_fills_rows_within_width():
    lengths = [5, 3, 3, 2, 8, 1]
    rows = pack_rows(lengths, 8)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 8 for r in rows)
    assert len(rows) == 3  # 22 tokens in rows of 8


def test_stage2_device_reads_do_not_grow_with_the_number_of_batches(loaded, small_pool, monkeypatch):
    """Per-batch ``.item()`` / ``.cpu()`` / ``.tolist()`` / ``bool(tensor)`` would be a device sync on
    a GPU; count coreselect's own calls on CPU and require the same count for 1 batch and for one
    batch per record. (transformers' SDPA mask code reads the device once per forward itself,
    ``_ignore_causal_mask_sdpa``; the bare forward pass pays that too.)"""
    import sys

    pool, target = _records(small_pool)
    calls = {"n": 0}
    for name in ("item", "cpu", "tolist", "__bool__", "numpy"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            if "coreselect" in sys._getframe(1).f_code.co_filename:
                calls["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = {}
    for budget in (1, 100_000):
        m = _trim(loaded, batch_tokens=budget).fit(target)
        enc = m.formatter.encode_many(pool)
        assert len(token_budget_batches([len(e) for e in enc], budget)) == (len(pool) if budget == 1 else 1)
        calls["n"] = 0
        m._score_encoded(enc)
        counts[budget] = calls["n"]
    assert counts[1] == counts[100_000], counts
