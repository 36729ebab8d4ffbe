"""TRIM wired to a (tiny, random-init) model: invariances, scopes, special tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coreselect.data.formatting import PROMPT, RESPONSE, TEMPLATE, Formatter, scope_mask
from coreselect.data.readers import read_records
from coreselect.methods.trim import TrimConfig, TrimMethod, token_saliency
from coreselect.models.loading import load_model
from coreselect.models.runner import ModelRunner, token_budget_batches


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    return model, tok


def _trim(loaded, **cfg):
    model, tok = loaded
    return TrimMethod(ModelRunner(model, tok), Formatter(tok, 256), TrimConfig(layers=2, **cfg), progress=False)


def _scores_by_id(method, records):
    return {r.id: s for r, s in zip(records, method.score(records))}


def test_scopes_select_the_right_tokens_under_the_chat_template(loaded, small_pool):
    _, tok = loaded
    pool, _ = small_pool
    rec = next(iter(read_records([pool])))
    enc = Formatter(tok, 256).encode(rec)
    decode = lambda m: tok.decode(enc.input_ids[m]).strip()  # noqa: E731
    assert decode(scope_mask(enc.codes, "prompt")) == rec.messages[0].content
    assert decode(scope_mask(enc.codes, "response")) == rec.messages[1].content
    # all = prompt + response, never the template ("<|im_start|>user\n", role names...)
    assert scope_mask(enc.codes, "all").sum() == (enc.codes == PROMPT).sum() + (enc.codes == RESPONSE).sum()
    template_text = tok.decode(enc.input_ids[enc.codes == TEMPLATE])
    assert "<|im_start|>" in template_text and "user" in template_text and "assistant" in template_text


def test_special_tokens_are_never_scored(loaded, small_pool):
    _, tok = loaded
    pool, _ = small_pool
    fmt = Formatter(tok, 256)
    special = set(tok.all_special_ids)
    for rec in read_records([pool]):
        enc = fmt.encode(rec)
        ids = enc.input_ids[scope_mask(enc.codes, "all")]
        assert not special & set(ids.tolist())
        assert {tok.eos_token_id} & set(enc.input_ids.tolist())  # the template does contain them


def test_loss_mask_is_response_plus_end_of_turn(loaded, small_pool):
    _, tok = loaded
    rec = next(iter(read_records([small_pool[0]])))
    enc = Formatter(tok, 256).encode(rec)
    extra = enc.loss_mask & (enc.codes != RESPONSE)
    assert enc.input_ids[extra].tolist() == [tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("scope", ["all", "prompt", "response"])
def test_scores_invariant_to_batch_budget_and_pool_order(loaded, small_pool, scope):
    pool, target = small_pool
    records = list(read_records([pool]))
    tgt = list(read_records([target]))
    ref = _trim(loaded, scope=scope, batch_tokens=10_000).fit(tgt)
    base = _scores_by_id(ref, records)
    for bt, chunk in [(40, 3), (128, 1), (100_000, 100)]:
        m = _trim(loaded, scope=scope, batch_tokens=bt, chunk_records=chunk).fit(tgt)
        torch.testing.assert_close(m.fingerprints.vectors, ref.fingerprints.vectors, atol=1e-5, rtol=0)
        got = _scores_by_id(m, records[::-1])
        assert got.keys() == base.keys()
        np.testing.assert_allclose([got[k] for k in base], [base[k] for k in base], atol=1e-5, rtol=0)


def test_left_and_right_padding_give_the_same_states_and_saliency(loaded, small_pool):
    model, tok = loaded
    runner = ModelRunner(model, tok)
    fmt = Formatter(tok, 256)
    encoded = [fmt.encode(r) for r in read_records([small_pool[0]])]
    positions = list(range(len(encoded)))
    out = {}
    for side in ("left", "right"):
        b = runner.collate(encoded, positions, padding_side=side)
        attns, hidden = runner.attn_hidden(b, 2)
        sal = token_saliency(attns, b.attention_mask)
        m = b.attention_mask.bool()
        out[side] = (hidden[m], sal[m], [a.shape for a in attns])
    torch.testing.assert_close(out["left"][0], out["right"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["left"][1], out["right"][1], atol=1e-5, rtol=0)
    assert len(out["left"][2]) == 2  # only the last L layers' maps are kept


def test_empty_scope_gives_minus_inf_and_empty_target_scope_errors(loaded, tmp_path, small_pool):
    from conftest import write_jsonl

    from coreselect.errors import CoreselectError

    text_pool = write_jsonl(tmp_path / "text.jsonl", [{"id": "t", "text": "7 + 5 = 12. The answer is 12."}])
    tgt = list(read_records([small_pool[1]]))
    m = _trim(loaded, scope="prompt").fit(tgt)
    assert m.score(list(read_records([text_pool])))[0] == float("-inf")  # a text record has no prompt
    with pytest.raises(CoreselectError, match="no scorable token"):
        _trim(loaded, scope="prompt").fit(list(read_records([text_pool])))


def test_token_budget_batches_respect_budget_and_cover_everything():
    lengths = [5, 100, 7, 7, 30, 1, 64]
    batches = token_budget_batches(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 128 or len(b) == 1
    # longest first, so padding stays small
    assert batches[0][0] == 1
