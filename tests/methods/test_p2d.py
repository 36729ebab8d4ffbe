"""P2D (paper 003): head localization, head-set files, head-guided selection, AER."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from coreselect.__main__ import main
from coreselect.data.formatting import Formatter
from coreselect.data.readers import read_records
from coreselect.errors import ConfigError, CoreselectError
from coreselect.methods.p2d import (
    HeadGeometry,
    HeadSet,
    P2DConfig,
    P2DMethod,
    attention_importance,
    gradient_importance,
    head_features,
    head_gates,
    localize_heads,
    n_top,
    per_example_loss,
    plot_heatmap,
    random_heads,
    top_heads,
)
from coreselect.methods.p2d.select import head_attentions
from coreselect.methods.p2d.train import alignment_efficiency_ratio
from coreselect.models.loading import load_model
from coreselect.models.runner import ModelRunner


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def runner(loaded):
    return ModelRunner(*loaded)


def _encoded(loaded, path):
    fmt = Formatter(loaded[1], 256)
    return [fmt.encode(r) for r in read_records([path])]


# ------------------------------------------------------------------------------ localization
def test_gate_gradients_match_finite_differences(loaded, small_pool):
    model, tok = loaded
    m64 = copy.deepcopy(model).double()
    r64 = ModelRunner(m64, tok)
    enc = _encoded(loaded, small_pool[1])[:1]
    imp = gradient_importance(r64, enc)
    g = HeadGeometry.of(m64)
    assert imp.shape == (g.n_layers, g.n_heads) and (imp > 0).all()

    batch = r64.collate(enc, [0])

    def loss_at(layer: int, head: int, value: float) -> float:
        gates = torch.ones(g.n_layers, 1, g.n_heads, dtype=torch.float64)
        gates[layer, 0, head] = value
        with torch.no_grad(), head_gates(m64, gates):
            logits = m64(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
        return float(per_example_loss(logits, batch)[0])

    # Llama's RMSNorm computes in float32 even in a float64 model, so a larger step than
    # 1e-5 is needed; central differences are accurate to O(eps^2) here.
    eps = 1e-3
    for layer, head in [(0, 0), (1, 3), (2, 2), (3, 0)]:
        fd = (loss_at(layer, head, 1 + eps) - loss_at(layer, head, 1 - eps)) / (2 * eps)
        assert abs(fd) == pytest.approx(imp[layer, head], rel=2e-3)


def test_gradient_importance_sums_per_example_magnitudes(runner, loaded, small_pool):
    enc = _encoded(loaded, small_pool[1])
    both = gradient_importance(runner, enc)  # one batch, per-example gates
    apart = gradient_importance(runner, enc[:1]) + gradient_importance(runner, enc[1:])
    np.testing.assert_allclose(both, apart, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in runner.model.parameters())


def test_attention_proxy_is_a_bounded_prompt_mass(runner, loaded, small_pool):
    enc = _encoded(loaded, small_pool[1])
    s = attention_importance(runner, enc)
    assert s.shape == (4, 4) and (s >= 0).all() and (s <= len(enc) + 1e-6).all() and s.sum() > 0


def test_attention_proxy_needs_a_prompt(runner, loaded, tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "The sea is wide and deep."}) + "\n")
    with pytest.raises(CoreselectError, match="prompt"):
        attention_importance(runner, _encoded(loaded, p))


def test_localize_heads_keeps_the_top_fraction(runner, loaded, small_pool):
    fmt = Formatter(loaded[1], 256)
    target = list(read_records([small_pool[1]]))
    hs = localize_heads(runner, fmt, target, proxy="gradient", fraction=0.25)
    s = np.asarray(hs.scores)
    assert len(hs.heads) == 4 and (hs.n_layers, hs.n_heads) == (4, 4)
    chosen = {(layer, head) for layer, head in hs.heads}
    rest = [s[i, j] for i in range(4) for j in range(4) if (i, j) not in chosen]
    assert min(s[i, j] for i, j in chosen) >= max(rest)


# ------------------------------------------------------------------------------ head sets
def test_top_heads_ranking_ties_and_at_least_one():
    s = np.array([[0.1, 0.9, 0.3], [0.9, 0.2, 0.0]])
    assert top_heads(s, 0.34) == [(0, 1), (1, 0)]  # round(0.34 * 6) = 2
    assert top_heads(s, 0.01) == [(0, 1)]  # at least 1; tie (0,1)=(1,0) goes to the lower flat index
    assert top_heads(s, 1.0) == [(i, j) for i in range(2) for j in range(3)]
    assert n_top(0.1, 16) == 2 and n_top(0.1, 4) == 1 and n_top(0.1, 270) == 27
    with pytest.raises(ConfigError):
        n_top(0.0, 10)
    with pytest.raises(CoreselectError):
        top_heads(np.array([[np.nan, 1.0]]), 0.5)


def test_random_heads_deterministic_same_count_distinct():
    a, b = random_heads(30, 9, 27, seed=1), random_heads(30, 9, 27, seed=1)
    assert a == b and len(a) == 27 == len(set(a)) and a == sorted(a)
    assert all(0 <= layer < 30 and 0 <= head < 9 for layer, head in a)
    assert random_heads(30, 9, 27, seed=2) != a


def test_heads_json_round_trip_check_and_heatmap(tmp_path):
    scores = [[float(i * 4 + j) for j in range(4)] for i in range(4)]
    hs = HeadSet("m", "gradient", 0.25, [(0, 1), (2, 3)], scores=scores, n_layers=4, n_heads=4)
    hs.save(tmp_path / "heads.json")
    d = json.loads((tmp_path / "heads.json").read_text())
    assert d["heads"] == [[0, 1], [2, 3]] and d["proxy"] == "gradient" and d["fraction"] == 0.25
    assert len(d["scores"]) == 4 and len(d["scores"][0]) == 4
    back = HeadSet.load(tmp_path / "heads.json")
    assert back == hs and back.by_layer() == {0: [1], 2: [3]}
    back.check(HeadGeometry(4, 4, 2, 16))
    with pytest.raises(CoreselectError, match="layers"):
        back.check(HeadGeometry(6, 4, 2, 16))
    png = plot_heatmap(hs, tmp_path / "heads.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ selection
def test_head_features_are_the_o_proj_inputs_of_the_selected_heads(runner, loaded, small_pool):
    enc = _encoded(loaded, small_pool[0])
    batch = runner.collate(enc, list(range(len(enc))))
    by_layer = {1: [0, 3], 2: [2]}
    seen = {}
    hooks = [
        runner.layers[layer].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, layer=layer: seen.__setitem__(layer, a[0].detach().clone())
        )
        for layer in (1, 2)
    ]
    try:
        feats = head_features(runner, batch, by_layer)  # stops after layer 2
    finally:
        for h in hooks:
            h.remove()
    d = 16
    want = torch.cat([seen[1][..., 0:d], seen[1][..., 3 * d : 4 * d], seen[2][..., 2 * d : 3 * d]], -1)
    assert feats.shape == (len(enc), batch.input_ids.shape[1], 3 * d)
    torch.testing.assert_close(feats, want)
    attns = head_attentions(runner, batch, by_layer)  # eager, stops after layer 2's attention
    assert [a.shape[1] for a in attns] == [2, 1]
    every = runner.attentions(batch, runner.num_layers)  # the last L layers = all of them here
    torch.testing.assert_close(attns[0], every[1][:, [0, 3]])
    torch.testing.assert_close(attns[1], every[2][:, [2]])


# ------------------------------------------------------------------------------ TRIM's conventions (issue 11)
def test_p2d_shares_trims_conventions_and_defaults():
    from dataclasses import fields

    from coreselect.methods.trim import TrimConfig

    p2d, trim = P2DConfig(), TrimConfig()
    shared = {f.name for f in fields(TrimConfig)} & {f.name for f in fields(P2DConfig)}
    assert {"coverage", "saliency_minmax", "min_context", "scope", "w_row", "oov_penalty"} <= shared
    assert all(getattr(p2d, n) == getattr(trim, n) for n in shared)
    for bad in ({"coverage": "x"}, {"saliency_minmax": "x"}, {"min_context": -1}):
        with pytest.raises(ConfigError):
            P2DConfig(**bad)


def test_attention_proxy_uses_one_eager_pass(runner, loaded, small_pool, monkeypatch):
    def no(*a, **k):
        raise AssertionError("attn_hidden runs a second (SDPA) pass whose hidden state the proxy discards")

    monkeypatch.setattr(runner, "attn_hidden", no)
    assert attention_importance(runner, _encoded(loaded, small_pool[1])).sum() > 0


def _fit(runner, loaded, small_pool, **kw):
    fmt = Formatter(loaded[1], 256)
    cfg = P2DConfig(heads="random", head_fraction=0.25, batch_tokens=64, aer=False, **kw)
    return P2DMethod(runner, fmt, cfg, progress=False).fit(list(read_records([small_pool[1]])))


def test_fingerprint_fit_uses_layer_windows_and_scope_minmax(runner, loaded, small_pool, monkeypatch):
    """Stage I of the fingerprint feature is TRIM's: per-layer sliding windows in eq. 2 / eq. 4,
    eq. 6's min-max over the fingerprinted positions, features from the scoring kernel."""
    from coreselect.methods.trim_math import FingerprintBuilder, token_saliency
    from coreselect.models.runner import attention_windows

    monkeypatch.setattr(runner.model.config, "sliding_window", 3, raising=False)
    monkeypatch.setattr(runner.model.config, "layer_types", None, raising=False)
    m = _fit(runner, loaded, small_pool, feature="fingerprint", scope="all", min_context=0)
    by_layer = m.head_set.by_layer()
    windows = attention_windows(runner.model.config, sorted(by_layer))
    assert windows == [3] * len(by_layer)
    enc = m._target_encoded
    batch = runner.collate(enc, list(range(len(enc))))
    keep = m.config.scored_positions(batch)

    def built(win, over):
        b = FingerprintBuilder()
        alpha = token_saliency(
            head_attentions(runner, batch, by_layer), batch.attention_mask, 0.5, 0.5, windows=win, minmax_mask=over
        )
        b.add(head_features(runner, batch, by_layer), alpha, batch.input_ids, keep)
        return b.finalize().vectors

    want = built(windows, keep)
    torch.testing.assert_close(m.fingerprints.vectors, want)
    assert not torch.allclose(built(None, keep), want)  # the window changes the fingerprints
    assert not torch.allclose(built(windows, None), want)  # so does where the min-max runs


def test_coverage_reading_and_min_context_are_wired(runner, loaded, small_pool):
    pool = list(read_records([small_pool[0]]))
    a = _fit(runner, loaded, small_pool, feature="fingerprint").score_batch(pool)
    b = _fit(runner, loaded, small_pool, feature="fingerprint", coverage="tokens").score_batch(pool)
    n, c = a.n_scored.astype(np.float64), a.n_tokens.astype(np.float64)
    # eq. 15: the two readings differ by eta * (kappa_length - kappa_tokens) and nothing else
    np.testing.assert_allclose(a.score - b.score, 0.05 * (n / (n + 32.0) - n / c), rtol=1e-5, atol=1e-6)
    # min_context=1 drops exactly each record's first content token from what is pooled and scored
    p0 = _fit(runner, loaded, small_pool, min_context=0).score_batch(pool)
    p1 = _fit(runner, loaded, small_pool).score_batch(pool)
    assert (p0.n_scored - p1.n_scored == 1).all() and not np.allclose(p0.score, p1.score)


@pytest.mark.parametrize("feature", ["fingerprint", "pooled"])
def test_p2d_scores_are_per_record_and_order_free(runner, loaded, small_pool, feature):
    fmt = Formatter(loaded[1], 256)
    pool = list(read_records([small_pool[0]]))
    m = P2DMethod(runner, fmt, P2DConfig(feature=feature, batch_tokens=64, aer=False), progress=False)
    m.fit(list(read_records([small_pool[1]])))
    a = m.score(pool)
    b = m.score(pool[::-1])[::-1]
    assert a.dtype == np.float64 and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_default_feature_ranks_math_first_on_the_fixture(runner, loaded, small_pool):
    fmt = Formatter(loaded[1], 256)
    pool = list(read_records([small_pool[0]]))
    m = P2DMethod(runner, fmt, P2DConfig(aer=False), progress=False).fit(list(read_records([small_pool[1]])))
    s = m.score(pool)
    top = [pool[i].source for i in np.argsort(-s)[:4]]
    assert top.count("math") >= 3


def test_cli_heads_then_select_with_saved_random_and_auto_heads(tiny_model_dir, small_pool, tmp_path):
    pool, target = small_pool
    h = tmp_path / "h"
    assert (
        main(
            [
                "heads",
                "--model",
                str(tiny_model_dir),
                "--target",
                str(target),
                "--out",
                str(h),
                "--head-fraction",
                "0.25",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    hs = json.loads((h / "heads.json").read_text())
    assert len(hs["heads"]) == 4 and hs["proxy"] == "gradient" and (h / "heads.png").stat().st_size > 0
    assert (
        main(
            [
                "heads",
                "--model",
                str(tiny_model_dir),
                "--target",
                str(target),
                "--out",
                str(tmp_path / "ha"),
                "--proxy",
                "attention",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert len(json.loads((tmp_path / "ha" / "heads.json").read_text())["heads"]) == 2  # round(0.1 * 16)

    common = [
        "select",
        "--method",
        "p2d",
        "--model",
        str(tiny_model_dir),
        "--pool",
        str(pool),
        "--target",
        str(target),
        "--budget",
        "3",
        "--warmup",
        "none",
        "--device",
        "cpu",
        "--no-progress",
    ]
    runs = {}
    for name, extra in {
        "saved": ["--heads", str(h / "heads.json")],
        "random": ["--heads", "random"],
        "auto": [],
    }.items():
        out = tmp_path / name
        assert main([*common, "--out", str(out), *extra]) == 0
        runs[name] = json.loads((out / "run.json").read_text())
        assert len((out / "coreset.jsonl").read_text().splitlines()) == 3
        assert (out / "heads.json").exists()
    assert json.loads((tmp_path / "saved" / "heads.json").read_text())["heads"] == hs["heads"]
    rnd = json.loads((tmp_path / "random" / "heads.json").read_text())
    assert rnd["proxy"] == "random" and len(rnd["heads"]) == 2 and (tmp_path / "auto" / "heads.png").exists()
    aer = runs["auto"]["aer"]
    assert aer["aer"] == pytest.approx(
        alignment_efficiency_ratio(aer["selection_s"], aer["training_s"], aer["full_sft_s"])
    )
    assert aer["aer"] > 0 and aer["tokens_selected"] < aer["tokens_pool"]
    assert aer["s_per_token_heads"] > 0 and aer["s_per_token_full"] > 0
    assert runs["auto"]["stats"]["heads"]["n"] == 2

    # the report shows P2D's own rows and heat map through the method hooks
    assert main(["report", str(tmp_path / "auto"), "--no-progress"]) == 0
    html = (tmp_path / "auto" / "report.html").read_text()
    assert 'id="p2d-heads"' in html and "heads H_T" in html and "2 of 16" in html
    assert (tmp_path / "auto" / "report" / "p2d-heads.png").is_file()
    assert main(["report", str(tmp_path / "random"), "--no-progress"]) == 0  # no scores: no heat map
    assert 'id="p2d-heads"' not in (tmp_path / "random" / "report.html").read_text()


# ------------------------------------------------------------------------------ AER
def test_alignment_efficiency_ratio_on_hand_values():
    assert alignment_efficiency_ratio(10.0, 20.0, 300.0) == pytest.approx(0.1)
    assert alignment_efficiency_ratio(0.0, 50.0, 50.0) == 1.0
    assert 1 / alignment_efficiency_ratio(5.0, 9.0, 98.0) == pytest.approx(7.0)  # the paper's "7.0x"
    with pytest.raises(ConfigError):
        alignment_efficiency_ratio(1.0, 1.0, 0.0)
    with pytest.raises(ConfigError):
        alignment_efficiency_ratio(-1.0, 1.0, 10.0)
