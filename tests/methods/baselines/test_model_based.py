"""RDS, LESS, TAGCOS, S2L and CLD: known answers by construction on a tiny model (r=4 LoRA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coreselect.data.formatting import Formatter
from coreselect.data.records import Message, Record
from coreselect.errors import ConfigError
from coreselect.methods.baselines.gradients import (
    AdapterSwitcher,
    FeatureStats,
    Projector,
    adam_moments,
    gradient_features,
    warmup_checkpoints,
)
from coreselect.methods.baselines.model_based import (
    CLDMethod,
    LESSMethod,
    RDSMethod,
    S2LMethod,
    TAGCOSMethod,
    balanced_sample,
    cld_scores,
    kmeans_labels,
    omp_select,
    proportional_shares,
)


def rec(i: int, user: str, assistant: str) -> Record:
    return Record(
        index=i, id=str(i), source="t", messages=(Message("user", user), Message("assistant", assistant)), raw={}
    )


QA = [
    ("What is 7 plus 5?", "7 + 5 = 12. The answer is 12."),
    ("Write a poem about the sea.", "The sea is wide, the sea is deep."),
    ("How do I bake bread?", "Mix flour, water and yeast, knead, let it rise, bake."),
    ("Translate good morning to French.", "Bonjour."),
    ("What is 48 divided by 2?", "48 / 2 = 24. The answer is 24."),
    ("Summarize: the meeting moved to Friday.", "The meeting is now on Friday."),
]
TARGET = [rec(100, "What is 12 plus 30?", "10 + 30 = 40, plus 2 is 42. The answer is 42.")]


def pool() -> list[Record]:
    """Six records plus (position 6) an exact copy of the target and (7) a copy of record 1."""
    recs = [rec(i, u, a) for i, (u, a) in enumerate(QA)]
    t = TARGET[0].messages
    return recs + [rec(6, t[0].content, t[1].content), rec(7, *QA[1])]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), tok


@pytest.fixture(scope="module")
def warm(tiny_model_dir, tmp_path_factory):
    """Three epoch checkpoints (with AdamW state) of an r=4 LoRA warmup on the pool."""
    from coreselect.train.lora import TrainArgs, train_lora

    model, tok = load(tiny_model_dir)
    args = TrainArgs(
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lr=5e-3,
        epochs=3,
        batch_size=2,
        grad_accum=1,
        max_length=128,
        warmup_ratio=0.0,
        seed=0,
        save_every="epoch",
    )
    res = train_lora(model, tok, pool()[:6], args, tmp_path_factory.mktemp("warm"), progress=False)
    assert len(res.checkpoints) == 3
    return tiny_model_dir, res


def fmt(tok) -> Formatter:
    return Formatter(tok, 128)


def method(cls, warm, **kw):
    model_dir, res = warm
    base, tok = load(model_dir)
    return cls(base, tok, fmt(tok), res.checkpoints, seed=0, **kw)


# ------------------------------------------------------------------------------ pure functions
def test_omp_recovers_planted_sparse_combination():
    g = np.random.default_rng(0).normal(size=(12, 64))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    idx, w = omp_select(g, 0.7 * g[3] + 0.3 * g[8], 2)
    assert sorted(idx.tolist()) == [3, 8]
    assert np.allclose(w[np.argsort(idx)], [0.7, 0.3])


def test_kmeans_and_balanced_sampling_take_equal_shares():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]])
    sizes = [4, 20, 20]
    x = np.concatenate([c + 0.1 * rng.normal(size=(n, 3)) for c, n in zip(centres, sizes)])
    planted = np.repeat([0, 1, 2], sizes)
    labels = kmeans_labels(x, 3, seed=0)
    assert all(len(set(labels[planted == c])) == 1 for c in range(3))  # clusters recovered
    chosen = balanced_sample(labels, 12, seed=0)
    assert len(chosen) == 12 and np.bincount(planted[chosen]).tolist() == [4, 4, 4]
    chosen = balanced_sample(labels, 18, seed=0)  # small cluster taken whole, the rest split evenly
    assert np.bincount(planted[chosen]).tolist() == [4, 7, 7]
    assert np.array_equal(chosen, balanced_sample(labels, 18, seed=0))
    assert proportional_shares(np.array(sizes), 11).tolist() == [1, 5, 5]


def test_cld_correlation_known_answers():
    target = np.array([[4.0, 3.0, 2.5, 2.4], [5.0, 4.0, 3.5, 3.4]])  # mean diffs (-1, -0.5, -0.1)
    d = np.array([-1.0, -0.5, -0.1])
    pool_losses = np.stack(
        [
            np.concatenate([[3.0], 3.0 + np.cumsum(2 * d)]),  # proportional
            np.concatenate([[3.0], 3.0 - np.cumsum(d)]),  # anti-proportional
            np.array([2.0, 1.0, 0.0, -1.0]),  # constant differences: zero variance
            np.array([2.0, np.nan, 1.0, 1.0]),  # no target token
        ]
    )
    s = cld_scores(pool_losses, target)
    assert s.dtype == np.float64
    assert np.allclose(s, [1.0, -1.0, 0.0, 0.0])
    with pytest.raises(ConfigError):
        cld_scores(pool_losses[:, :2], target[:, :2])


def test_projector_is_seeded_and_capped():
    g = torch.randn(3, 50)
    p = Projector(50, 8192, seed=3)
    assert p.k == 50
    assert torch.equal(Projector(50, 16, seed=3, chunk_elems=64)(g), Projector(50, 16, seed=3, chunk_elems=64)(g))
    assert not torch.equal(Projector(50, 16, seed=3)(g), Projector(50, 16, seed=4)(g))


# ------------------------------------------------------------------------------ model methods
def test_rds_ranks_exact_duplicate_first(tiny_model_dir):
    from coreselect.models.runner import ModelRunner

    model, tok = load(tiny_model_dir)
    m = RDSMethod(ModelRunner(model, tok), fmt(tok), batch_tokens=256).fit(TARGET)
    s = m.score(pool())
    assert s.dtype == np.float64 and s.shape == (8,)
    assert int(np.argmax(s)) == 6 and s[6] == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(s, m.score(pool()))
    two = [TARGET[0], rec(101, *QA[2])]
    s_max = RDSMethod(ModelRunner(model, tok), fmt(tok), aggregate="max").fit(two).score(pool())
    assert s_max[6] == pytest.approx(1.0, abs=1e-5) and s_max[2] == pytest.approx(1.0, abs=1e-5)
    assert m.cost.forward_passes == 1 + 16


def test_less_duplicate_features_and_target_copy_first(warm):
    model_dir, res = warm
    base, tok = load(model_dir)
    sw = AdapterSwitcher(base)
    model = sw.activate(res.checkpoints[-1].path)
    moments = adam_moments(res.checkpoints[-1].path, sw.params)
    assert moments is not None  # the trainer saves AdamW moments
    enc = [fmt(tok).encode(r) for r in pool()]
    f = gradient_features(
        model,
        sw.params,
        enc,
        tok.pad_token_id,
        Projector(sum(p.numel() for p in sw.params), 256),
        moments,
        FeatureStats(),
    )
    assert f.shape == (8, 256)
    assert float(f[1] @ f[7]) == pytest.approx(1.0, abs=1e-5)  # duplicated record: cosine 1

    m = method(LESSMethod, warm, proj_dim=256, optimizer="sgd").fit(TARGET)
    s = m.score(pool())
    assert s.dtype == np.float64 and s.shape == (8,)
    assert int(np.argmax(s)) == 6 and s[6] == pytest.approx(1.0, abs=1e-4)
    assert m.cost.backward_passes == 3 * (1 + 8)


def test_less_adam_is_deterministic(warm):
    runs = []
    for _ in range(2):
        m = method(LESSMethod, warm, proj_dim=128).fit(TARGET)
        runs.append(m.score(pool()))
    assert np.array_equal(runs[0], runs[1]) and runs[0].dtype == np.float64
    assert set(m.settings()["pool_gradient"].values()) == {"adam"}
    assert abs(runs[0][1] - runs[0][7]) < 1e-9  # duplicates score the same


def test_tagcos_selects_exactly_the_budget(warm):
    runs = [
        method(TAGCOSMethod, warm, budget=3, n_clusters=2, proj_dim=128).fit(TARGET).score(pool()) for _ in range(2)
    ]
    s = runs[0]
    assert np.array_equal(s, runs[1]) and s.dtype == np.float64 and s.shape == (8,)
    assert int((s > 2).sum()) == 3 and s[s <= 2].max() <= 1.0


def test_s2l_balanced_budget_and_determinism(warm):
    runs = [method(S2LMethod, warm, budget="50%", n_clusters=2).fit(TARGET).score(pool()) for _ in range(2)]
    s = runs[0]
    assert np.array_equal(s, runs[1]) and s.dtype == np.float64 and s.shape == (8,)
    assert int((s >= 2).sum()) == 4


def test_cld_on_checkpoints(warm):
    m = method(CLDMethod, warm).fit(TARGET)
    s = m.score(pool())
    assert s.dtype == np.float64 and s.shape == (8,)
    assert s[6] == pytest.approx(1.0, abs=1e-6)  # the target's copy has the target's trajectory
    assert np.array_equal(s, method(CLDMethod, warm).fit(TARGET).score(pool()))
    assert m.cost.forward_passes == 3 * (1 + 8) and m.cost.backward_passes == 0
    with pytest.raises(ConfigError):
        method(CLDMethod, (warm[0], type(warm[1])(warm[1].adapter_dir, warm[1].checkpoints[:2], [], 0, 0.0, 0)))


def test_warmup_checkpoints_found_beside_reused_adapter(warm):
    _, res = warm
    found = warmup_checkpoints({"mode": "reused", "adapter": str(res.adapter_dir)}, "less", need=3)
    assert [c.step for c in found] == [c.step for c in res.checkpoints]
    assert found[0].lr > 0
    with pytest.raises(ConfigError, match="--warmup auto"):
        warmup_checkpoints({"mode": "none"}, "less")


# ------------------------------------------------------------------------------ several named targets (issue 14 §1)
TARGET_SETS = {"math": TARGET, "misc": [rec(101, *QA[2]), rec(102, "Translate thank you to French.", "Merci.")]}


def old_rds(runner, formatter, target, records, aggregate="mean"):
    """RDSMethod before multi-target support, condensed (the reference for one target)."""
    from coreselect.models.runner import token_budget_batches

    def reps(recs):
        enc = formatter.encode_many(list(recs))
        out = torch.zeros(len(enc), runner.model.config.hidden_size)
        for pos in token_budget_batches([len(e) for e in enc], 256):
            batch = runner.collate(enc, pos, "right")
            h = runner.hidden(batch)
            out[pos] = h[torch.arange(h.shape[0]), batch.attention_mask.sum(1) - 1].float().cpu()
        return torch.nn.functional.normalize(out, dim=1)

    t = reps(target)
    t = torch.nn.functional.normalize(t.mean(0, keepdim=True), dim=1) if aggregate == "mean" else t
    return (reps(records) @ t.T).max(dim=1).values.double().numpy()


def old_less(warm, target, records, optimizer="adam", proj_dim=128):
    """LESSMethod before multi-target support, condensed (the reference for one target)."""
    model_dir, res = warm
    base, tok = load(model_dir)
    sw, f = AdapterSwitcher(base), fmt(tok)

    def feats(ck, recs, adam):
        enc = f.encode_many(list(recs))
        model = sw.activate(ck.path)
        moments = adam_moments(ck.path, sw.params) if adam and optimizer == "adam" else None
        proj = Projector(sum(p.numel() for p in sw.params), proj_dim, 0)
        return gradient_features(model, sw.params, enc, tok.pad_token_id, proj, moments, FeatureStats())

    tfs = [feats(ck, target, False) for ck in res.checkpoints]
    lrs = np.array([c.lr for c in res.checkpoints])
    total = np.zeros(len(records))
    for wc, ck, tf in zip(lrs / lrs.sum(), res.checkpoints, tfs):
        total += wc * (feats(ck, records, True) @ tf.T).mean(dim=1).double().numpy()
    return total


def _same(a, b):
    assert a.dtype == b.dtype == np.float64 and a.tobytes() == b.tobytes()  # bit for bit


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_rds_multi_target_one_pass_columns_equal_single_runs(tiny_model_dir, tmp_path, aggregate):
    from coreselect.models.runner import ModelRunner

    model, tok = load(tiny_model_dir)

    def make():
        return RDSMethod(ModelRunner(model, tok), fmt(tok), aggregate=aggregate, batch_tokens=256, chunk_records=5)

    assert RDSMethod.multi_target
    m = make().fit_targets(TARGET_SETS)
    chunks = list(m.score_chunks(iter(pool())))
    assert [len(c) for c in chunks] == [5, 3] and all(set(c.targets) == set(TARGET_SETS) for c in chunks)
    cols = {n: np.concatenate([c.targets[n] for c in chunks]) for n in TARGET_SETS}
    # each pool record goes through the model once, whatever the number of targets
    assert m.cost.forward_passes == 3 + len(pool())
    for name, target in TARGET_SETS.items():
        single = make().fit_targets({"target": target})
        s_chunks = list(single.score_chunks(iter(pool())))
        s = np.concatenate([c.score for c in s_chunks])
        old = [old_rds(single.runner, single.formatter, target, pool()[i : i + 5], aggregate) for i in (0, 5)]
        _same(s, np.concatenate(old))  # the old path (chunk by chunk: batch shapes move the last bits)
        _same(cols[name], s)  # column k: a single-target run on target k
        for c, sc in zip(chunks, s_chunks):
            assert np.array_equal(c.n_tokens, sc.n_tokens) and np.array_equal(c.n_scored, sc.n_scored)
    assert int(np.argmax(cols["math"])) == 6 and int(np.argmax(cols["misc"])) == 2
    # per-target state files; a fresh instance told the target names restores them all
    written = m.save_state(tmp_path)
    assert sorted(p.name for p in written) == ["rds_targets-math.safetensors", "rds_targets-misc.safetensors"]
    fresh = make()
    fresh.target_names = list(TARGET_SETS)
    assert fresh.load_state(tmp_path)
    again = list(fresh.score_chunks(iter(pool())))
    assert all(np.array_equal(np.concatenate([c.targets[n] for c in again]), cols[n]) for n in TARGET_SETS)
    assert fresh.cost.forward_passes == len(pool())
    with pytest.raises(ConfigError, match="target misc"):
        make().fit_targets({"math": TARGET, "misc": []})


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_less_multi_target_one_pass_columns_equal_single_runs(warm, optimizer):
    assert LESSMethod.multi_target
    m = method(LESSMethod, warm, proj_dim=128, optimizer=optimizer).fit_targets(TARGET_SETS)
    (chunk,) = m.score_chunks(iter(pool()))
    assert set(chunk.targets) == set(TARGET_SETS)
    np.testing.assert_array_equal(chunk.score, chunk.targets["math"])
    # per checkpoint: each target record's gradient once, each pool record's gradient once
    assert m.cost.backward_passes == 3 * (3 + len(pool()))
    for name, target in TARGET_SETS.items():
        single = method(LESSMethod, warm, proj_dim=128, optimizer=optimizer).fit_targets({"target": target})
        s = single.score(pool())
        _same(s, old_less(warm, target, pool(), optimizer))  # the old path
        _same(chunk.targets[name], s)  # column k: a single-target run on target k
        assert single.settings() == m.settings()
    assert int(np.argmax(chunk.targets["math"])) == 6
    with pytest.raises(ConfigError, match="target misc"):
        method(LESSMethod, warm, proj_dim=128).fit_targets({"math": TARGET, "misc": []})


def test_rds_two_named_targets_in_a_select_run(tiny_model_dir, tmp_path):
    """The pipeline writes score_<name> / rank_<name> from the native columns; --resume reloads both centroids."""
    import json

    import pyarrow.parquet as pq
    from tests.conftest import chat, write_jsonl

    from coreselect.__main__ import main

    rows = [chat(i, u, a) for i, (u, a) in enumerate(QA)]
    pool_file = write_jsonl(tmp_path / "pool.jsonl", rows)
    files = {
        n: write_jsonl(tmp_path / f"{n}.jsonl", [chat(r.id, *(m.content for m in r.messages)) for r in recs])
        for n, recs in TARGET_SETS.items()
    }

    def run(out, targets, *extra):
        argv = ["select", "--method", "rds", "--pool", str(pool_file), "--target", *targets, "--out", str(out)]
        argv += ["--model", str(tiny_model_dir), "--warmup", "none", "--budget", "2", "--no-progress", *extra]
        assert main(argv) == 0
        return pq.read_table(out / "scores.parquet"), json.loads((out / "run.json").read_text())

    table, info = run(tmp_path / "multi", [f"{n}={p}" for n, p in files.items()])
    assert info["cost"]["forward_passes"] == 3 + len(QA)  # the pool once
    for n, p in files.items():
        single, _ = run(tmp_path / n, [str(p)])
        _same(table.column(f"score_{n}").to_numpy(), single.column("score").to_numpy())
        assert table.column(f"rank_{n}").to_pylist() == single.column("rank").to_pylist()
    (tmp_path / "multi" / "scores.parquet").unlink()
    import shutil

    shutil.rmtree(tmp_path / "multi" / "shards")
    resumed, info2 = run(tmp_path / "multi", [f"{n}={p}" for n, p in files.items()], "--resume")
    assert resumed.equals(table) and info2["cost"]["forward_passes"] == len(QA)
