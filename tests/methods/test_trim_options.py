"""TRIM's investigation options (issue 15): ``token_weighting: idf``, ``min_tokens`` and the
ablation knobs, reachable from YAML / CLI; defaults keep the paper's scores bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coreselect.data.formatting import Formatter
from coreselect.data.readers import read_records
from coreselect.errors import ConfigError, CoreselectError
from coreselect.methods.trim import TrimConfig, TrimMethod
from coreselect.methods.trim_math import (
    COVERAGE_LENGTH_N0,
    FingerprintBuilder,
    Fingerprints,
    NearestClassTable,
    idf,
    pool_scores,
    score_examples,
)
from coreselect.models.loading import load_model
from coreselect.models.runner import ModelRunner

# --------------------------------------------------------------------------- idf


def _docs_case():
    """3 target examples (rows): class 5 in all three, class 7 twice in row 0 only, class 9
    only at a masked-out position of row 1; row 2 holds class 5 alone."""
    ids = torch.tensor([[5, 7, 7], [5, 9, 0], [0, 0, 5]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, True]])
    return ids, mask


def test_document_frequency_and_idf_hand_computed():
    ids, mask = _docs_case()
    b = FingerprintBuilder()
    b.add(torch.ones(3, 3, 2), torch.ones(3, 3), ids, mask)
    b.count_documents(ids, mask)
    fp = b.finalize()
    assert fp.token_ids.tolist() == [5, 7]
    assert fp.doc_freq is not None and fp.doc_freq.tolist() == [3, 1]  # 7 twice in one row: df 1
    assert fp.n_docs == 3
    # idf = ln((N+1)/(df+1)) + 1
    torch.testing.assert_close(fp.idf(), torch.tensor([1.0, 1.0 + math.log(2.0)]))
    torch.testing.assert_close(idf(torch.tensor([0, 4]), 4), torch.tensor([1.0 + math.log(5.0), 1.0]))


def test_document_frequency_does_not_depend_on_batching():
    ids, mask = _docs_case()
    whole = FingerprintBuilder()
    whole.count_documents(ids, mask)
    split = FingerprintBuilder()
    for r in range(3):  # one example per batch
        split.count_documents(ids[r : r + 1], mask[r : r + 1])
    assert whole._doc_freq == split._doc_freq and whole._n_docs == split._n_docs == 3


def test_doc_freq_round_trips_and_old_files_refuse_idf(tmp_path):
    ids, mask = _docs_case()
    b = FingerprintBuilder()
    b.add(torch.ones(3, 3, 2), torch.ones(3, 3), ids, mask)
    plain = b.finalize()  # count_documents never called (P2D, files from before issue 15)
    assert plain.doc_freq is None
    b.count_documents(ids, mask)
    fp = b.finalize()
    fp.save(tmp_path / "fp.safetensors")
    back = Fingerprints.load(tmp_path / "fp.safetensors")
    assert back.doc_freq is not None and back.doc_freq.tolist() == [3, 1] and back.n_docs == 3
    plain.save(tmp_path / "old.safetensors")
    old = Fingerprints.load(tmp_path / "old.safetensors")
    assert old.doc_freq is None
    with pytest.raises(CoreselectError, match="document frequencies"):
        old.idf()


def _score_case():
    """Classes 1 and 2 (df 2 and 1 of N = 2: idf 1 and 1 + ln 1.5); token 3 is unseen and
    backs off to class 1 by its embedding."""
    fp = Fingerprints(
        token_ids=torch.tensor([1, 2]),
        vectors=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        weights=torch.ones(2),
        counts=torch.ones(2, dtype=torch.int64),
        doc_freq=torch.tensor([2, 1]),
        n_docs=2,
    )
    emb = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.2, 1.0]])  # V = 5
    hidden = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [1.0, 1.0]]])
    ids = torch.tensor([[1, 3, 2]])
    return fp, emb, hidden, ids


def test_idf_weights_follow_the_matched_class():
    fp, emb, _, ids = _score_case()
    table = NearestClassTable(fp, emb)
    in_m = torch.tensor([[True, True, False]])
    w = table.idf_weights(ids, in_m)
    # token 1: own class (idf 1); token 3: backs off to class 1 (idf 1); token 2: outside M -> 0
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0]]))
    w = table.idf_weights(ids, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0 + math.log(1.5)]]))


def test_score_examples_idf_hand_computed():
    fp, emb, hidden, ids = _score_case()
    s = [1.0, 0.6, 1 / math.sqrt(2)]  # cos with class 1, class 1 (backoff, lambda 1), class 2
    w = [1.0, 1.0, 1.0 + math.log(1.5)]
    mean = sum(a * b for a, b in zip(w, s)) / sum(w)
    expected = 0.5 * mean + 0.5 * max(s) + 0.05 * 1.0
    kw = {"scored_mask": torch.ones(1, 3, dtype=torch.bool), "attention_mask": torch.ones(1, 3), "embeddings": emb}
    got = score_examples(fp, hidden, ids, token_weighting="idf", **kw)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    paper = score_examples(fp, hidden, ids, **kw)
    assert paper.item() == pytest.approx(0.5 * sum(s) / 3 + 0.5 * max(s) + 0.05, abs=1e-6)


# --------------------------------------------------------------------------- pool_scores


def _paper_pool_scores(s, in_m, attention_mask, w_mean=0.5, w_max=0.5, coverage_weight=0.05):
    """Eq. 13-15 as pool_scores computed them before issue 15 (``coverage="tokens"``), verbatim."""
    n = in_m.sum(-1)
    mean = torch.where(n > 0, s.sum(-1) / n.clamp(min=1).float(), torch.zeros_like(s[:, 0]))
    mx = torch.where(in_m, s, torch.full_like(s, float("-inf"))).amax(-1)
    kappa = n.float() / attention_mask.bool().sum(-1).clamp(min=1).float()
    score = w_mean * mean + w_max * mx + coverage_weight * kappa
    return torch.where(n > 0, score, torch.full_like(score, float("-inf")))


def _random_case(seed=0, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(b, t, generator=g) * 2 - 1
    in_m = torch.rand(b, t, generator=g) < 0.6
    in_m[0] = False  # a record with M(c) empty
    in_m[1] = True
    s = torch.where(in_m, s, torch.zeros_like(s))
    mask = torch.ones(b, t)
    return s, in_m, mask


def test_default_pool_scores_are_the_paper_bit_for_bit():
    s, in_m, mask = _random_case()
    ref = _paper_pool_scores(s, in_m, mask)
    for kw in ({}, {"token_weights": None, "min_tokens": 0}):
        got, _ = pool_scores(s, in_m, mask, **kw)
        assert torch.equal(got, ref)
    # min_tokens at or below every record's |M(c)| multiplies the mean by exactly 1.0
    n_min = int(in_m.sum(-1)[in_m.any(-1)].min())
    got, _ = pool_scores(s, in_m, mask, min_tokens=n_min)
    assert torch.equal(got, ref)


def test_weighted_mean_hand_computed_and_invariances():
    s = torch.tensor([[1.0, 0.5, 0.2, 0.0]])
    in_m = torch.tensor([[True, True, True, False]])
    mask = torch.ones(1, 4)
    w = torch.tensor([[1.0, 2.0, 1.0, 7.0]])  # the weight outside M(c) is ignored
    score, parts = pool_scores(s, in_m, mask, token_weights=w, coverage="length")
    mean = (1.0 + 1.0 + 0.2) / 4
    assert parts["mean"].item() == pytest.approx(mean)
    assert score.item() == pytest.approx(0.5 * mean + 0.5 * 1.0 + 0.05 * 3 / (3 + COVERAGE_LENGTH_N0))
    # equal weights = the paper's mean; scaling the weights changes nothing
    s, in_m, mask = _random_case(1)
    ref, _ = pool_scores(s, in_m, mask)
    w = torch.rand(s.shape, generator=torch.Generator().manual_seed(2)) + 0.1
    for weights, other in ((torch.full_like(s, 3.0), ref), (w * 5.0, pool_scores(s, in_m, mask, token_weights=w)[0])):
        got, _ = pool_scores(s, in_m, mask, token_weights=weights)
        torch.testing.assert_close(got, other, rtol=0, atol=1e-6)
    assert got[0] == float("-inf")


def test_min_tokens_hand_computed():
    # a short record (2 tokens, both 0.9) and a long one (5 tokens, 0.5 each)
    s = torch.tensor([[0.9, 0.9, 0.0, 0.0, 0.0], [0.5] * 5])
    in_m = torch.tensor([[True, True, False, False, False], [True] * 5])
    mask = torch.ones(2, 5)
    paper, _ = pool_scores(s, in_m, mask, coverage_weight=0.0)
    assert paper[0] > paper[1]  # the short record wins on the mean (and ties on nothing else)
    got, parts = pool_scores(s, in_m, mask, coverage_weight=0.0, min_tokens=4)
    # mean' = mean * n / max(n, n_min): 0.9 * 2 / 4 = 0.45; the long record keeps 0.5
    torch.testing.assert_close(parts["mean"], torch.tensor([0.45, 0.5]))
    torch.testing.assert_close(got, torch.tensor([0.5 * 0.45 + 0.5 * 0.9, 0.5 * 0.5 + 0.5 * 0.5]))
    assert got[1] == paper[1]
    # with weights: the weighted mean, then the same factor
    w = torch.tensor([[1.0, 3.0, 0.0, 0.0, 0.0], [1.0] * 5])
    s2 = torch.tensor([[0.8, 0.4, 0.0, 0.0, 0.0], [0.5] * 5])
    _, parts = pool_scores(s2, in_m, mask, token_weights=w, min_tokens=4)
    assert parts["mean"][0].item() == pytest.approx((0.8 + 1.2) / 4 * 2 / 4)
    with pytest.raises(ValueError):
        pool_scores(s, in_m, mask, min_tokens=-1)


# --------------------------------------------------------------------------- config, YAML, CLI


def test_config_validates_the_new_options():
    assert TrimConfig().token_weighting == "none" and TrimConfig().min_tokens == 0
    with pytest.raises(ConfigError, match="token_weighting"):
        TrimConfig(token_weighting="tfidf")
    with pytest.raises(ConfigError, match="min_tokens"):
        TrimConfig(min_tokens=-2)


ABLATIONS = {
    "token_weighting": "idf",
    "min_tokens": 16,
    "w_max": 0.0,  # mean-only
    "w_mean": 0.0,  # max-only
    "scope": "response",
    "coverage_weight": 0.0,  # coverage off
    "coverage": "tokens",
}


def test_every_ablation_is_reachable_from_yaml_and_the_cli(tmp_path):
    from coreselect.__main__ import parser
    from coreselect.cli import build_args
    from coreselect.config import SelectArgs

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "method: trim\nwarmup: none\n" + "".join(f"{k}: {v}\n" for k, v in ABLATIONS.items()), encoding="utf-8"
    )
    flags: list[str] = []
    for k, v in ABLATIONS.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]

    def select_args(argv: list[str]) -> SelectArgs:
        ns = parser(argv).parse_args(argv)
        ns.__dict__.pop("verbose", None)  # as coreselect.__main__._main does
        return build_args(SelectArgs, ns)

    for argv in (
        ["select", "--config", str(yaml_file), "--pool", "p.jsonl", "--out", "o"],
        ["select", "--method", "trim", "--warmup", "none", "--pool", "p.jsonl", "--out", "o", *flags],
    ):
        args = select_args(argv)
        assert args.warmup == "none"
        cfg = args.method_config()
        for k, v in ABLATIONS.items():
            assert getattr(cfg, k) == v, (argv[1], k)
    auto = select_args(["select", "--pool", "p", "--out", "o"])
    assert auto.warmup == "auto" and auto.method == "trim"  # the paper's warmup stays the default
    assert auto.method_config().token_weighting == "none" and auto.method_config().min_tokens == 0


# --------------------------------------------------------------------------- on a (tiny) model


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def _trim(loaded, **cfg):
    model, tok = loaded
    return TrimMethod(ModelRunner(model, tok), Formatter(tok, 256), TrimConfig(layers=2, **cfg), progress=False)


def test_explicit_defaults_score_like_the_paper_and_idf_batches_alike(loaded, small_pool, one_torch_thread):
    pool, target = small_pool
    records = list(read_records([pool]))
    tgt = list(read_records([target]))
    paper = _trim(loaded).fit(tgt)
    base = paper.score(records)
    fp = paper.fingerprints
    assert fp is not None and fp.doc_freq is not None and fp.n_docs == len(tgt)
    same = _trim(loaded, token_weighting="none", min_tokens=0).fit(tgt).score(records)
    assert base.tobytes() == same.tobytes()
    # min_tokens = 1 never binds (every scored record has |M(c)| >= 1): bit for bit the paper
    assert _trim(loaded, min_tokens=1).fit(tgt).score(records).tobytes() == base.tobytes()
    # a min_tokens above every record's |M(c)| lowers every score
    assert (_trim(loaded, min_tokens=10_000).fit(tgt).score(records) < base).all()
    idf_a = _trim(loaded, token_weighting="idf", batch_tokens=10_000).fit(tgt).score(records)
    idf_b = _trim(loaded, token_weighting="idf", batch_tokens=40, chunk_records=3).fit(tgt).score(records)
    np.testing.assert_allclose(idf_a, idf_b, rtol=0, atol=1e-5)
    packed = _trim(loaded, token_weighting="idf", min_tokens=12, packing=True).fit(tgt).score(records)
    padded = _trim(loaded, token_weighting="idf", min_tokens=12).fit(tgt).score(records)
    np.testing.assert_allclose(packed, padded, rtol=0, atol=1e-5)
    assert not np.allclose(idf_a, base, rtol=0, atol=1e-6)  # the two targets' classes differ in df


def test_idf_with_one_target_example_is_the_paper(loaded, small_pool, one_torch_thread, tmp_path):
    """One target example: every class has df = N = 1, idf 1, and the weighted mean is the mean."""
    pool, target = small_pool
    records = list(read_records([pool]))
    tgt = list(read_records([target]))[:1]
    base = _trim(loaded).fit(tgt).score(records)
    m = _trim(loaded, token_weighting="idf").fit(tgt)
    np.testing.assert_allclose(m.score(records), base, rtol=0, atol=1e-6)
    # fingerprints without document frequencies (an old file) are refused for idf, named
    fp = m.fingerprints
    assert fp is not None
    fp.doc_freq = None
    fp.save(tmp_path / "old.safetensors")
    with pytest.raises(CoreselectError, match="document frequencies"):
        m.set_fingerprints(Fingerprints.load(tmp_path / "old.safetensors"))
