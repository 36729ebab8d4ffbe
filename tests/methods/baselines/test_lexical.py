"""Random, BM25 and DSIR baselines on hand-made records with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from coreselect.data.records import Message, Record
from coreselect.data.text import record_text
from coreselect.methods.baselines import LEXICAL, BM25Method, DSIRMethod, RandomMethod


def chat(i: int, user: str, assistant: str, system: str | None = None) -> Record:
    msgs = ([Message("system", system)] if system else []) + [
        Message("user", user),
        Message("assistant", assistant),
    ]
    return Record(index=i, id=str(i), source="t", messages=tuple(msgs), raw={})


def text(i: int, body: str) -> Record:
    return Record(index=i, id=str(i), source="t", messages=(Message("assistant", body),), raw={}, kind="text")


NAMES = ["Tom", "Ann", "Sam", "Lia", "Max", "Eve", "Ben", "Zoe", "Kim", "Raj"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books"]
FOODS = ["onions", "garlic", "carrots", "butter", "flour", "tomatoes"]


def arithmetic(i: int, rng: np.random.Generator) -> Record:
    name, item = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
    a, b = int(rng.integers(2, 50)), int(rng.integers(2, 50))
    return chat(
        i,
        f"{name} has {a} {item} and buys {b} more {item}. How many {item} does {name} have now?",
        f"{name} starts with {a} {item}. Then {name} adds {b}, so {a} + {b} = {a + b}. The answer is {a + b}.",
    )


def cooking(i: int, rng: np.random.Generator) -> Record:
    f1, f2 = FOODS[rng.integers(len(FOODS))], FOODS[rng.integers(len(FOODS))]
    m = int(rng.integers(2, 20))
    return chat(
        i,
        f"Give me a recipe that uses {f1} and {f2}.",
        f"Chop the {f1} finely and melt some butter in a pan. Fry the {f1} until golden, "
        f"stir in the {f2}, season with salt and simmer for {m} minutes before serving.",
    )


@pytest.fixture(scope="module")
def mixed() -> tuple[list[Record], list[Record], np.ndarray]:
    """Targets: arithmetic word problems. Pool: 40 arithmetic + 40 cooking, interleaved."""
    rng = np.random.default_rng(123)
    targets = [arithmetic(1000 + i, rng) for i in range(8)]
    pool, is_math = [], []
    for i in range(80):
        math = i % 2 == 0
        pool.append(arithmetic(i, rng) if math else cooking(i, rng))
        is_math.append(math)
    return targets, pool, np.array(is_math)


# ---------------------------------------------------------------- record_text


def test_record_text_scopes() -> None:
    r = chat(0, "question?", "answer.", system="be nice")
    assert record_text(r) == "be nice\nquestion?\nanswer."
    assert record_text(r, "prompt") == "be nice\nquestion?"
    assert record_text(r, "response") == "answer."
    t = text(1, "plain body")
    assert record_text(t, "all") == "plain body"
    assert record_text(t, "response") == "plain body"
    assert record_text(t, "prompt") == ""
    with pytest.raises(ValueError):
        record_text(r, "bogus")  # type: ignore[arg-type]


# ---------------------------------------------------------------- all methods


@pytest.mark.parametrize("name", sorted(LEXICAL))
def test_float64_pool_length_and_cost(name: str, mixed) -> None:
    targets, pool, _ = mixed
    m = LEXICAL[name]().fit(targets)
    s = m.score(iter(pool))  # pool may be a one-shot iterator
    assert isinstance(s, np.ndarray) and s.dtype == np.float64 and s.shape == (len(pool),)
    assert np.all(np.isfinite(s))
    assert m.cost.wall_s == 0  # the pipeline times fit + score (run.json cost.wall_s)
    assert isinstance(m.settings(), dict) and m.name == name


# ---------------------------------------------------------------- random


def test_random_deterministic_and_seed_dependent() -> None:
    pool = [text(i, f"doc {i}") for i in range(50)]
    a = RandomMethod(seed=3).fit([]).score(pool)
    b = RandomMethod(seed=3).fit([]).score(list(reversed(pool)))  # only length matters
    c = RandomMethod(seed=4).fit([]).score(pool)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_topk_roughly_uniform() -> None:
    n, k, seeds = 20, 5, 2000
    pool = [text(i, "x") for i in range(n)]
    counts = np.zeros(n)
    for seed in range(seeds):
        s = RandomMethod(seed=seed).score(pool)
        counts[np.argsort(-s, kind="stable")[:k]] += 1
    expected = seeds * k / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60  # df=19: mean 19, p(chi2 > 60) ~ 3e-6


# ---------------------------------------------------------------- BM25


def test_bm25_ranks_exact_duplicate_first(mixed) -> None:
    targets, pool, _ = mixed
    dup_at = 17  # a cooking slot, replaced by an exact copy of a target
    pool = list(pool)
    pool[dup_at] = chat(dup_at, *[m.content for m in targets[3].messages])
    s = BM25Method().fit(targets).score(pool)
    assert int(np.argmax(s)) == dup_at


def test_bm25_max_vs_mean() -> None:
    # Doc 0 is target A verbatim and shares nothing with B or C: best under "max".
    # Doc 1 has one word of each target: a partial match to all three, best under "mean".
    targets = [text(100, "zebra giraffe"), text(101, "violin cello"), text(102, "piano drum")]
    pool = [
        text(0, "zebra giraffe"),
        text(1, "zebra violin piano"),
        text(2, "ocean river lake"),
        text(3, "mountain hill valley"),
    ]
    mx = BM25Method(aggregate="max").fit(targets).score(pool)
    mean = BM25Method(aggregate="mean").fit(targets).score(pool)
    assert mx[0] > mx[1] > mx[2] == mx[3] == 0.0
    assert mean[1] > mean[0] > mean[2] == 0.0
    # doc 0 scores 0 on two of the three queries, so its mean is exactly a third of its max
    assert mean[0] == pytest.approx(mx[0] / 3)


def test_bm25_scope_prompt_only() -> None:
    targets = [chat(100, "alpha beta", "gamma delta")]
    pool = [chat(0, "alpha beta", "zzz"), chat(1, "zzz", "gamma delta")]
    s = BM25Method(scope="prompt").fit(targets).score(pool)
    assert s[0] > 0 and s[1] == 0


# ---------------------------------------------------------------- DSIR


def test_dsir_prefers_target_distribution(mixed) -> None:
    targets, pool, is_math = mixed
    m = DSIRMethod(mode="topk", num_buckets=2000).fit(targets)
    w = m.score(pool)
    assert w[is_math].mean() > w[~is_math].mean()
    assert w[is_math].min() > w[~is_math].max()  # well separated by construction


def test_dsir_pool_order_with_workers(mixed) -> None:
    targets, pool, _ = mixed
    one = DSIRMethod(mode="topk", num_buckets=2000).fit(targets).score(pool)
    two = DSIRMethod(mode="topk", num_buckets=2000, num_proc=2).fit(targets).score(pool)
    np.testing.assert_allclose(one, two)
    # a permuted pool gives the permuted weights
    perm = np.random.default_rng(0).permutation(len(pool))
    w = DSIRMethod(mode="topk", num_buckets=2000).fit(targets).score([pool[i] for i in perm])
    np.testing.assert_allclose(w, one[perm])


def test_dsir_topk_is_weights_and_resample_seeded(mixed) -> None:
    targets, pool, is_math = mixed
    topk = DSIRMethod(mode="topk", num_buckets=2000).fit(targets)
    w = topk.score(pool)
    assert topk.log_weights is not None
    np.testing.assert_array_equal(w, topk.log_weights)

    def resample(seed: int) -> DSIRMethod:
        return DSIRMethod(mode="resample", num_buckets=2000, seed=seed).fit(targets)

    r1 = resample(0)
    s1 = r1.score(pool)
    np.testing.assert_allclose(r1.log_weights, w)  # same weights underneath
    s1b = resample(0).score(pool)
    s2 = resample(1).score(pool)
    np.testing.assert_array_equal(s1, s1b)
    assert not np.array_equal(s1, s2)
    # weights are far apart here, so the resampled top-20 is still all arithmetic
    assert is_math[np.argsort(-s1, kind="stable")[:20]].all()


def test_dsir_min_example_length() -> None:
    targets = [text(100, "one two three four five six")]
    pool = [text(0, "one two"), text(1, "one two three four five six seven eight")]
    s = DSIRMethod(mode="topk", min_example_length=5).fit(targets).score(pool)
    assert s[0] == -np.inf and np.isfinite(s[1])


@pytest.mark.parametrize("name", sorted(LEXICAL))
def test_empty_pool_and_empty_texts(name: str) -> None:
    targets = [chat(100, "hello world", "hi")]
    assert LEXICAL[name]().fit(targets).score([]).shape == (0,)
    # scope "prompt" of text records is "": no words in the pool at all
    s = (
        LEXICAL[name](**({} if name == "random" else {"scope": "prompt"}))
        .fit(targets)
        .score([text(0, "hello"), text(1, "world")])
    )
    assert s.shape == (2,) and s.dtype == np.float64 and np.all(np.isfinite(s))


# ---------------------------------------------------------------- several named targets (issue 14 §1)


def old_bm25(target: list[Record], pool: list[Record], aggregate: str = "max") -> np.ndarray:
    """BM25Method.score before multi-target support (the reference for one target)."""
    import bm25s

    texts = [record_text(r) for r in pool]
    corpus = bm25s.tokenize(texts, stopwords=None, return_ids=False, show_progress=False)
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index(corpus, show_progress=False)
    rows = []
    for tokens in bm25s.tokenize(
        [record_text(r) for r in target], stopwords=None, return_ids=False, show_progress=False
    ):
        known = [t for t in tokens if t and t in retriever.vocab_dict]
        rows.append(retriever.get_scores(known) if known else np.zeros(len(texts)))
    matrix = np.asarray(rows, dtype=np.float64)
    return matrix.max(axis=0) if aggregate == "max" else matrix.mean(axis=0)


def old_dsir(target: list[Record], pool: list[Record], min_example_length: int = 0) -> np.ndarray:
    """DSIRMethod(mode="topk").score before multi-target support (the reference for one target)."""
    import tempfile
    from pathlib import Path

    from data_selection import HashedNgramDSIR

    from coreselect.methods.baselines.dsir import _unshard, _wordpunct, _write_jsonl

    n = len(pool)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_jsonl(d / "raw.jsonl", [record_text(r) for r in pool])
        _write_jsonl(d / "target.jsonl", [record_text(r) for r in target])
        dsir = HashedNgramDSIR(
            raw_datasets=[str(d / "raw.jsonl")],
            target_datasets=[str(d / "target.jsonl")],
            cache_dir=str(d / "cache"),
            num_proc=1,
            ngrams=2,
            num_buckets=10000,
            min_example_length=min_example_length,
        )
        dsir.tokenizer = _wordpunct
        with np.errstate(invalid="ignore"):
            dsir.fit_importance_estimator(num_tokens_to_fit="all")
        if not np.all(np.isfinite(dsir.log_diff)):
            return np.zeros(n)
        dsir.compute_importance_weights()
        logw = _unshard(dsir.log_importance_weights_dir, 1, n)
        if min_example_length > 0:
            logw[~dsir.perexample_metadata_filter(_unshard(dsir.perexample_metadata_dir, 1, n))] = -np.inf
        return logw


@pytest.fixture(scope="module")
def target_sets(mixed) -> dict[str, list[Record]]:
    targets, _, _ = mixed
    rng = np.random.default_rng(7)
    return {"math": targets, "cook": [cooking(2000 + i, rng) for i in range(5)]}


def _columns(m, sets, pool) -> dict[str, np.ndarray]:
    """One multi-target scoring pass: the one chunk's per-target columns."""
    chunks = list(m.fit_targets(sets).score_chunks(iter(pool)))
    assert len(chunks) == 1 and set(chunks[0].targets) == set(sets)
    np.testing.assert_array_equal(chunks[0].score, chunks[0].targets[next(iter(sets))])
    return chunks[0].targets


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.float64 and a.tobytes() == b.tobytes()  # bit for bit


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_bm25_multi_target_columns_equal_single_runs(mixed, target_sets, aggregate) -> None:
    _, pool, is_math = mixed
    assert BM25Method.multi_target
    cols = _columns(BM25Method(aggregate=aggregate), target_sets, pool)
    for name, target in target_sets.items():
        single = BM25Method(aggregate=aggregate).fit_targets({"target": target}).score(pool)
        _same(single, old_bm25(target, pool, aggregate))  # one target: the pre-multi-target scores
        _same(cols[name], single)  # column k: a single-target run on target k
    assert is_math[np.argsort(-cols["math"])[:10]].all() and not is_math[np.argsort(-cols["cook"])[:10]].any()
    # no pool words: every column 0
    zeros = _columns(BM25Method(scope="prompt"), target_sets, [text(0, "hello"), text(1, "world")])
    assert all(np.array_equal(c, np.zeros(2)) for c in zeros.values())


@pytest.mark.parametrize("kw", [{"mode": "topk"}, {"mode": "resample", "seed": 3}, {"min_example_length": 42}])
def test_dsir_multi_target_columns_equal_single_runs(mixed, target_sets, kw) -> None:
    _, pool, is_math = mixed
    assert DSIRMethod.multi_target
    kw = {"mode": "topk", **kw}
    m = DSIRMethod(**kw)
    cols = _columns(m, target_sets, pool)
    assert set(m.target_log_weights) == set(target_sets)
    for name, target in target_sets.items():
        single = DSIRMethod(**kw).fit_targets({"target": target})
        s = single.score(pool)
        if kw["mode"] == "topk":  # one target: the pre-multi-target scores
            _same(s, old_dsir(target, pool, kw.get("min_example_length", 0)))
        assert single.log_weights is not None
        _same(m.target_log_weights[name], single.log_weights)  # one importance-weight vector per target
        _same(cols[name], s)  # column k: a single-target run on target k
    if kw.get("min_example_length"):  # the 41-token (arithmetic) records are cut in every column
        assert all(np.all(c[is_math] == -np.inf) and np.all(np.isfinite(c[~is_math])) for c in cols.values())
    else:
        assert m.target_log_weights["math"][is_math].min() > m.target_log_weights["math"][~is_math].max()
        assert m.target_log_weights["cook"][~is_math].min() > m.target_log_weights["cook"][is_math].max()


def test_dsir_multi_target_with_a_wordless_target(mixed, target_sets) -> None:
    """A target with no tokens gets equal (zero) weights, as alone; the others are unaffected."""
    _, pool, _ = mixed
    sets = {**target_sets, "empty": [text(3000, "")]}
    cols = _columns(DSIRMethod(mode="topk", min_example_length=42), sets, pool)
    _same(cols["empty"], DSIRMethod(mode="topk", min_example_length=42).fit([text(3000, "")]).score(pool))
    assert np.array_equal(cols["empty"], np.zeros(len(pool)))
    _same(cols["math"], DSIRMethod(mode="topk", min_example_length=42).fit(target_sets["math"]).score(pool))


@pytest.mark.parametrize("cls", [BM25Method, DSIRMethod])
def test_multi_target_refit_and_empty_target(cls, target_sets, mixed) -> None:
    _, pool, _ = mixed
    m = cls().fit_targets(target_sets)
    assert list(m.fit(target_sets["math"]).score_chunks(pool))[0].targets == {}  # fit: one target again
    with pytest.raises(ValueError, match="target cook"):
        cls().fit_targets({"math": target_sets["math"], "cook": []})
