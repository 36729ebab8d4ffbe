"""TRIM wired to a (tiny, random-init) model: invariances, scopes, special tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coreselect.data.formatting import PROMPT, RESPONSE, TEMPLATE, Formatter, scope_mask
from coreselect.data.readers import read_records
from coreselect.methods.trim import TrimConfig, TrimMethod, token_saliency
from coreselect.methods.trim_math import FingerprintBuilder, admissible_keys, context_mask
from coreselect.models.loading import load_model
from coreselect.models.runner import ModelRunner, attention_windows, token_budget_batches


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

    def decode(m: np.ndarray) -> str:
        return tok.decode(enc.input_ids[m]).strip()

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


# ---------------------------------------------------------------- issue 11: §2, §3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fingerprints_use_the_hidden_pass_not_the_eager_one(tiny_model_dir, small_pool, dtype):
    model, tok = load_model(str(tiny_model_dir), device="cpu", dtype=dtype)
    runner = ModelRunner(model, tok)
    fmt = Formatter(tok, 256)
    tgt = list(read_records([small_pool[1]]))
    cfg = TrimConfig(layers=2, batch_tokens=100_000)
    m = TrimMethod(runner, fmt, cfg, progress=False).fit(tgt)
    encoded = [fmt.encode(r) for r in tgt]
    (positions,) = token_budget_batches([len(e) for e in encoded], cfg.batch_tokens)
    b = runner.collate(encoded, positions)
    keep = cfg.scored_positions(b)
    alpha = token_saliency(runner.attentions(b, 2), b.attention_mask, windows=runner.windows(2), minmax_mask=keep)
    builder = FingerprintBuilder()
    builder.add(runner.hidden(b), alpha, b.input_ids, keep)
    ref = builder.finalize()
    assert torch.equal(m.fingerprints.token_ids, ref.token_ids)
    assert torch.equal(m.fingerprints.vectors, ref.vectors)  # exactly: the same SDPA states
    assert model.config._attn_implementation == "sdpa"  # the eager pass restored the kernel


def test_attention_windows_per_layer_from_the_config():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    assert attention_windows(LlamaConfig(num_hidden_layers=3), [0, 1, 2]) == [None, None, None]
    assert attention_windows(MistralConfig(num_hidden_layers=2, sliding_window=16), [0, 1]) == [16, 16]
    assert attention_windows(MistralConfig(num_hidden_layers=2, sliding_window=None), [0, 1]) == [None, None]
    g = Gemma2Config(num_hidden_layers=4, sliding_window=8)  # alternates sliding / global
    assert attention_windows(g, [0, 1, 2, 3]) == [8 if t == "sliding_attention" else None for t in g.layer_types]
    assert set(attention_windows(g, range(4))) == {8, None}
    assert attention_windows(Qwen2Config(num_hidden_layers=2, sliding_window=8), [0, 1]) == [None, None]
    q = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert attention_windows(q, [0, 1, 2, 3]) == [None, None, 8, 8]


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_admissible_keys_match_the_models_own_masks(tmp_path, small_pool, family, one_torch_thread):
    """With a window shorter than the records, the structural key set of eq. 2/4 is exactly the set
    of keys the model's eager attention gives a non-zero probability (fp32, per layer)."""
    from conftest import make_tokenizer
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    tok = make_tokenizer(tmp_path)
    common = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "sliding_window": 4,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    torch.manual_seed(0)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**common, layer_types=["sliding_attention", "full_attention"]))
    model.eval()  # Gemma 2 has no SDPA path: it stays eager; Mistral's default kernel is SDPA
    runner = ModelRunner(model, tok)
    windows = runner.windows(2)
    assert windows == ([4, 4] if family == "mistral" else [4, None])
    fmt = Formatter(tok, 256)
    encoded = [fmt.encode(r) for r in read_records([small_pool[0]])][:3]
    for side in ("left", "right"):
        b = runner.collate(encoded, [0, 1, 2], padding_side=side)
        attns = runner.attentions(b, 2)
        for a, w in zip(attns, windows):
            ok = admissible_keys(b.attention_mask, w)
            m = b.attention_mask.bool()
            live = (a > 0) & m[:, None, :, None]  # non-pad query rows
            assert torch.equal(live, ok[:, None].expand_as(live))


def test_min_context_drops_each_records_first_content_token(loaded, small_pool):
    tgt = list(read_records([small_pool[1]]))
    pool = list(read_records([small_pool[0]]))
    base = _trim(loaded, min_context=0).fit(tgt)
    k1 = _trim(loaded, min_context=1).fit(tgt)
    assert TrimConfig().min_context == 1  # the default (measurement in TrimConfig's docstring)
    assert int(base.fingerprints.counts.sum()) - int(k1.fingerprints.counts.sum()) == len(tgt)
    n0 = base._score_encoded([base.formatter.encode(r) for r in pool])[1]
    n1 = k1._score_encoded([k1.formatter.encode(r) for r in pool])[1]
    np.testing.assert_array_equal(n0 - n1, np.ones(len(pool), dtype=np.int64))
    b = base.runner.collate([base.formatter.encode(pool[0])], [0])
    first = int(b.scope_mask("all")[0].nonzero()[0])
    assert not context_mask(b.scope_mask("all"), 1)[0, first]


def test_coverage_readings_shift_scores_by_eta_times_kappa(loaded, small_pool):
    tgt = list(read_records([small_pool[1]]))
    pool = list(read_records([small_pool[0]]))
    tokens = _trim(loaded, coverage="tokens", min_context=0).fit(tgt)
    fmt = tokens.formatter
    s_tok = tokens.score(pool)
    s_con = _trim(loaded, coverage="content", min_context=0).fit(tgt).score(pool)
    s_len = _trim(loaded, coverage="length", min_context=0).fit(tgt).score(pool)
    assert TrimConfig().coverage == "length"
    enc = [fmt.encode(r) for r in pool]
    n = np.array([scope_mask(e.codes, "all").sum() for e in enc], dtype=np.float64)
    total = np.array([len(e) for e in enc], dtype=np.float64)
    # with the OOV backoff M(c) is every content token: content-kappa is 1, tokens-kappa n/|c|
    np.testing.assert_allclose(s_con - s_tok, 0.05 * (1 - n / total), atol=1e-6)
    np.testing.assert_allclose(s_len - s_tok, 0.05 * (n / (n + 32) - n / total), atol=1e-6)
    with pytest.raises(Exception, match="coverage"):
        TrimConfig(coverage="bogus")
