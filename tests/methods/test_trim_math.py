"""TRIM's equations on small hand-computed cases (paper 002, eq. 1-15)."""

from __future__ import annotations

import math

import pytest
import torch

from coreselect.methods.trim import (
    FingerprintBuilder,
    Fingerprints,
    build_fingerprints,
    score_examples,
    token_saliency,
)
from coreselect.methods.trim_math import (
    COVERAGE_LENGTH_N0,
    NearestClassTable,
    admissible_keys,
    column_saliency,
    context_mask,
    coverage_term,
    row_saliency,
)

# One causal head, T = 3:
#   row 0 [1, 0, 0]        -> one admissible key            -> q = 1
#   row 1 [.5, .5, 0]      -> H = ln 2, n = 2               -> q = 0
#   row 2 [.5, .25, .25]   -> H = 1.5 ln 2, n = 3           -> q = 1 - 1.5 ln2 / ln3
# columns: k0 = (1+.5+.5)/3 = 2/3, k1 = (.5+.25)/2 = .375, k2 = .25/1 = .25
# min-max: K = [1, (.375-.25)/(2/3-.25), 0] = [1, .3, 0]
A = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.25, 0.25]])
Q = torch.tensor([1.0, 0.0, 1 - 1.5 * math.log(2) / math.log(3)])
K = torch.tensor([1.0, 0.3, 0.0])


def test_saliency_hand_computed():
    alpha = token_saliency([A[None, None]], torch.ones(1, 3))
    torch.testing.assert_close(alpha[0], 0.5 * Q + 0.5 * K, atol=1e-6, rtol=0)


def test_saliency_weights_select_row_or_column():
    torch.testing.assert_close(token_saliency([A[None, None]], torch.ones(1, 3), 1.0, 0.0)[0], Q, atol=1e-6, rtol=0)
    torch.testing.assert_close(token_saliency([A[None, None]], torch.ones(1, 3), 0.0, 1.0)[0], K, atol=1e-6, rtol=0)


def test_saliency_averages_heads_and_layers_before_minmax():
    # head 2: uniform causal rows -> q = [1, 0, 0]; columns k = [(1+.5+1/3)/3, (.5+1/3)/2, 1/3]
    u = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])
    k_u = torch.tensor([(1 + 0.5 + 1 / 3) / 3, (0.5 + 1 / 3) / 2, 1 / 3])
    k_a = torch.tensor([2 / 3, 0.375, 0.25])
    q_mean = (Q + torch.tensor([1.0, 0.0, 0.0])) / 2
    k_raw = (k_a + k_u) / 2
    k_scaled = (k_raw - k_raw.min()) / (k_raw.max() - k_raw.min())
    expected = 0.5 * q_mean + 0.5 * k_scaled
    two_heads = torch.stack([A, u])[None]  # [1, 2, 3, 3]
    torch.testing.assert_close(token_saliency([two_heads], torch.ones(1, 3))[0], expected, atol=1e-6, rtol=0)
    # the same maps split over two layers of one head each give the same mean (eq. 3, 5)
    layers = [A[None, None], u[None, None]]
    torch.testing.assert_close(token_saliency(layers, torch.ones(1, 3))[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_saliency_ignores_padding(side):
    # 5 positions, 2 pads; pad rows hold junk that must not count; pad keys have 0 weight.
    T = 5
    full = torch.full((T, T), 0.2)  # junk everywhere
    real = slice(2, 5) if side == "left" else slice(0, 3)
    full[:, real] = 0.0
    full[real, :] = 0.0
    full[real, real] = A
    mask = torch.zeros(1, T)
    mask[0, real] = 1
    alpha = token_saliency([full[None, None]], mask)[0]
    torch.testing.assert_close(alpha[real], 0.5 * Q + 0.5 * K, atol=1e-6, rtol=0)
    assert alpha[mask[0] == 0].eq(0).all()


def test_single_key_row_is_perfectly_sharp_and_unattended_key_has_zero_column():
    # non-causal 2x2 where key 1 is never attended
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    alpha = token_saliency([a[None, None]], torch.ones(1, 2), 1.0, 0.0)
    torch.testing.assert_close(alpha[0], torch.tensor([1.0, 1.0]))
    col = token_saliency([a[None, None]], torch.ones(1, 2), 0.0, 1.0)
    torch.testing.assert_close(col[0], torch.tensor([1.0, 0.0]))


def _fp_case():
    hidden = torch.tensor([[[3.0, 4.0], [0.0, 2.0], [5.0, 5.0], [1.0, 0.0]]])
    sal = torch.tensor([[1.0, 0.5, 0.0, 0.9]])
    ids = torch.tensor([[5, 5, 7, 9]])
    mask = torch.tensor([[True, True, True, False]])
    return hidden, sal, ids, mask


def test_fingerprints_hand_computed():
    fp = build_fingerprints(*_fp_case())
    # class 5: 1 * [.6, .8] + .5 * [0, 1] = [.6, 1.3] -> normalized; class 7 has weight 0 -> dropped;
    # class 9 is masked out.
    assert fp.token_ids.tolist() == [5]
    v = torch.tensor([0.6, 1.3])
    torch.testing.assert_close(fp.vectors[0], v / v.norm())
    assert fp.counts.tolist() == [2]
    torch.testing.assert_close(fp.weights, torch.tensor([1.5]))
    torch.testing.assert_close(fp.vectors.norm(dim=-1), torch.ones(1))


def test_fingerprints_incremental_equals_one_batch():
    hidden, sal, ids, mask = _fp_case()
    whole = build_fingerprints(hidden, sal, ids, mask)
    b = FingerprintBuilder()
    for t in range(4):  # one token per batch
        b.add(hidden[:, t : t + 1], sal[:, t : t + 1], ids[:, t : t + 1], mask[:, t : t + 1])
    inc = b.finalize()
    assert inc.token_ids.tolist() == whole.token_ids.tolist()
    torch.testing.assert_close(inc.vectors, whole.vectors)


def test_fingerprints_save_load_round_trip(tmp_path):
    fp = build_fingerprints(*_fp_case())
    fp.tokens = ["five"]
    fp.settings = {"layers": 6, "scope": "all"}
    path = tmp_path / "fp.safetensors"
    fp.save(path)
    back = Fingerprints.load(path)
    assert back.token_ids.tolist() == fp.token_ids.tolist()
    torch.testing.assert_close(back.vectors, fp.vectors)
    assert back.tokens == ["five"] and back.settings == {"layers": 6, "scope": "all"}
    assert [p.name for p in tmp_path.iterdir()] == ["fp.safetensors"]  # no temp file left


def _score_case():
    fp = Fingerprints(
        token_ids=torch.tensor([1, 2]),
        vectors=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        weights=torch.ones(2),
        counts=torch.ones(2, dtype=torch.int64),
    )
    emb = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.2, 1.0]])  # V = 5
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    ids = torch.tensor([[1, 3, 2]])  # token 3 unseen, nearest class by embedding is 1
    return fp, emb, hidden, ids


def test_score_hand_computed_with_oov_penalty():
    fp, emb, hidden, ids = _score_case()
    s = [1.0, 0.5 * 0.0, 1 / math.sqrt(2)]
    expected = 0.5 * (sum(s) / 3) + 0.5 * max(s) + 0.05 * 1.0
    got = score_examples(fp, hidden, ids, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3), emb, oov_penalty=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_oov_penalty_scales_the_backed_off_token():
    fp, emb, _, ids = _score_case()
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # token 3 matches class 1 exactly
    got = score_examples(
        fp,
        hidden,
        ids,
        torch.ones(1, 3, dtype=torch.bool),
        torch.ones(1, 3),
        emb,
        oov_penalty=0.25,
        w_mean=1.0,
        w_max=0.0,
        coverage_weight=0.0,
    )
    assert got.item() == pytest.approx((1 + 0.25 + 1) / 3, abs=1e-6)


def test_score_oov_none_skips_unseen_and_coverage_counts_all_tokens():
    fp, emb, hidden, ids = _score_case()
    s = [1.0, 1 / math.sqrt(2)]
    expected = 0.5 * (sum(s) / 2) + 0.5 * 1.0 + 0.05 * (2 / 3)
    got = score_examples(fp, hidden, ids, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3), emb, oov_penalty=None)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_coverage_denominator_is_non_pad_tokens():
    fp, emb, hidden, ids = _score_case()
    scored = torch.tensor([[True, False, False]])  # only token 0 scored, s = 1
    got = score_examples(fp, hidden, ids, scored, torch.ones(1, 3), emb, coverage_weight=0.3)
    assert got.item() == pytest.approx(0.5 + 0.5 + 0.3 / 3, abs=1e-6)


def test_empty_scope_scores_minus_inf():
    fp, emb, hidden, ids = _score_case()
    got = score_examples(fp, hidden, ids, torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 3), emb)
    assert got.item() == float("-inf")
    # all tokens unseen and oov skipped -> empty M(c) as well
    got = score_examples(
        fp,
        hidden,
        torch.tensor([[3, 4, 0]]),
        torch.ones(1, 3, dtype=torch.bool),
        torch.ones(1, 3),
        emb,
        oov_penalty=None,
    )
    assert got.item() == float("-inf")


def test_score_ignores_padding_on_either_side():
    fp, emb, hidden, ids = _score_case()
    ref = score_examples(fp, hidden, ids, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3), emb, oov_penalty=0.5)
    pad_h = torch.full((1, 2, 2), 9.0)
    for h, i, m in [
        (
            torch.cat([pad_h, hidden], 1),
            torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1),
            torch.tensor([[0, 0, 1, 1, 1]]),
        ),
        (
            torch.cat([hidden, pad_h], 1),
            torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], 1),
            torch.tensor([[1, 1, 1, 0, 0]]),
        ),
    ]:
        got = score_examples(fp, h, i, m.bool(), m, emb, oov_penalty=0.5)
        torch.testing.assert_close(got, ref)


def test_nearest_class_is_looked_up_only_for_ids_met():
    fp, emb, _, _ = _score_case()
    table = NearestClassTable(fp, emb)
    rows, direct = table.rows(torch.tensor([1, 3, 4]))
    assert direct.tolist() == [True, False, False]
    assert rows.tolist() == [0, 0, 1]  # 3 ~ class 1 (row 0); 4 = [.2, 1] ~ class 2 (row 1)
    assert table._nearest[0].item() == -2  # id 0 never met: never computed


def test_scored_token_outside_the_embedding_table_is_an_error_not_a_clamp():
    from coreselect.errors import CoreselectError

    fp, emb, hidden, _ = _score_case()
    ids = torch.tensor([[1, 99, 2]])  # V = 5
    with pytest.raises(CoreselectError, match="token id 99 is outside"):
        score_examples(fp, hidden, ids, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3), emb)
    # an unscored (e.g. pad) position may hold any id
    got = score_examples(fp, hidden, ids, torch.tensor([[True, False, True]]), torch.ones(1, 3), emb)
    assert torch.isfinite(got).all()


# ---------------------------------------------------------------- admissible keys (eq. 2, eq. 4)


def test_admissible_keys_causal_and_windowed_counts():
    mask = torch.ones(1, 5, dtype=torch.bool)
    full = admissible_keys(mask)
    assert full[0].sum(-1).tolist() == [1, 2, 3, 4, 5]  # row i: i + 1 keys
    assert full[0].sum(-2).tolist() == [5, 4, 3, 2, 1]  # column j: n - j queries
    win = admissible_keys(mask, window=2)
    assert win[0].sum(-1).tolist() == [1, 2, 2, 2, 2]  # min(i + 1, W)
    assert win[0].sum(-2).tolist() == [2, 2, 2, 2, 1]  # min(n - j, W)
    assert not win[0, 3, 1] and win[0, 3, 2]  # i - j < W: query 3 sees keys 2, 3 only


@pytest.mark.parametrize("side", ["left", "right"])
def test_admissible_keys_follow_real_positions_under_padding(side):
    mask = torch.tensor([[0, 0, 1, 1, 1]] if side == "left" else [[1, 1, 1, 0, 0]]).bool()
    ok = admissible_keys(mask, window=2)[0]
    real = mask[0].nonzero().flatten()
    assert ok[real][:, real].sum(-1).tolist() == [1, 2, 2]
    assert ok.sum() == ok[real][:, real].sum()  # nothing admissible on a pad row or column


def test_row_saliency_counts_do_not_depend_on_dtype():
    # row 2 = [.5, .5, 1e-9]: fp16 rounds 1e-9 to 0. Counting A > 0 would give n = 2 and
    # q = 1 - ln2/ln2 = 0 in fp16 but n = 3, q = 1 - ln2/ln3 in fp32. Structurally n = 3.
    a = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.5, 0.5 - 1e-9, 1e-9]])[None, None]
    assert (a.half() > 0).sum() == 5 and (a > 0).sum() == 6
    mask = torch.ones(1, 3, dtype=torch.bool)
    q32, q16 = row_saliency(a, mask), row_saliency(a.half(), mask)
    expected = torch.tensor([1.0, 0.0, 1 - math.log(2) / math.log(3)])
    torch.testing.assert_close(q32[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(q16[0], expected, atol=1e-3, rtol=0)  # fp16 rounding of A only
    # column 2 is admissible for query 2 alone in both dtypes: k2 = A_22 / 1
    k32, k16 = column_saliency(a, mask), column_saliency(a.half(), mask)
    torch.testing.assert_close(k32[0], torch.tensor([2 / 3, (0.5 + 0.5 - 1e-9) / 2, 1e-9]), atol=1e-7, rtol=0)
    torch.testing.assert_close(k16[0], k32[0], atol=1e-3, rtol=0)
    assert q16.dtype == k16.dtype == torch.float32


def test_windowed_saliency_hand_computed():
    # W = 2: query 2 sees keys 1, 2 only. Row 2 = [0, .5, .5] -> n = 2, H = ln 2, q = 0
    # (the full causal count would give 1 - ln2/ln3). Column 0 is admissible for queries
    # 0 and 1 only: k0 = (1 + .5) / 2; k1 = (.5 + .5) / 2; k2 = .5 / 1.
    a = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.0, 0.5, 0.5]])[None, None]
    mask = torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(row_saliency(a, mask, window=2)[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(column_saliency(a, mask, window=2)[0], torch.tensor([0.75, 0.5, 0.5]), atol=1e-6, rtol=0)
    full_q = row_saliency(a, mask)[0]
    assert abs(float(full_q[2]) - (1 - math.log(2) / math.log(3))) < 1e-6
    # token_saliency takes one window per layer: a full and a windowed layer average
    alpha = token_saliency([a, a], mask, 1.0, 0.0, windows=[None, 2])[0]
    torch.testing.assert_close(alpha, (full_q + torch.tensor([1.0, 0.0, 0.0])) / 2, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="windows"):
        token_saliency([a], mask, windows=[None, 2])


def test_minmax_over_scope_ignores_the_sink():
    # column 0 is a sink (every query puts .7 there); the scope is positions 1..3.
    a = torch.tensor([[1.0, 0, 0, 0], [0.7, 0.3, 0, 0], [0.7, 0.2, 0.1, 0], [0.7, 0.1, 0.1, 0.1]])[None, None]
    mask = torch.ones(1, 4, dtype=torch.bool)
    k_raw = torch.tensor([(1 + 2.1) / 4, 0.6 / 3, 0.2 / 2, 0.1])  # eq. 4

    def col(over: torch.Tensor | None) -> torch.Tensor:
        return token_saliency([a], mask, 0.0, 1.0, minmax_mask=over)[0]

    # literal: the sink sets the max, every content K is squeezed below (k1 - k3)/(k0 - k3)
    lit = (k_raw - k_raw.min()) / (k_raw.max() - k_raw.min())
    torch.testing.assert_close(col(None), lit, atol=1e-6, rtol=0)
    assert float(lit[1:].max()) < 0.16
    scope = torch.tensor([[False, True, True, True]])
    sc = k_raw[1:]
    expected = torch.cat([torch.ones(1), (sc - sc.min()) / (sc.max() - sc.min())])  # sink clipped to 1
    torch.testing.assert_close(col(scope), expected, atol=1e-6, rtol=0)
    # an empty scope falls back to the non-pad positions
    torch.testing.assert_close(col(torch.zeros(1, 4, dtype=torch.bool)), lit, atol=1e-6, rtol=0)


def test_context_mask_counts_content_tokens_before():
    content = torch.tensor([[False, False, True, True, False, True, True]])  # template, content...
    assert context_mask(content, 0).all()
    assert context_mask(content, 1)[0].tolist() == [False, False, False, True, True, True, True]
    assert context_mask(content, 2)[0].tolist() == [False, False, False, False, True, True, True]
    with pytest.raises(ValueError):
        context_mask(content, -1)


def test_coverage_term_readings():
    n = torch.tensor([3, 8])
    am = torch.tensor([[1] * 10 + [0] * 2, [1] * 12])
    content = torch.zeros(2, 12, dtype=torch.bool)
    content[0, 4:8] = True
    content[1, 2:10] = True
    torch.testing.assert_close(coverage_term(n, am, "tokens"), torch.tensor([0.3, 8 / 12]))
    torch.testing.assert_close(coverage_term(n, am, "content", content), torch.tensor([0.75, 1.0]))
    torch.testing.assert_close(
        coverage_term(n, am, "length"), torch.tensor([3 / (3 + COVERAGE_LENGTH_N0), 8 / (8 + COVERAGE_LENGTH_N0)])
    )
    with pytest.raises(ValueError):
        coverage_term(n, am, "content")
    with pytest.raises(ValueError):
        coverage_term(n, am, "bogus")
