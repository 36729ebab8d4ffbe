"""P2D falsification options (issue 15): random heads, the activation score, the perplexity skew, native
multi-target scoring. On the tiny random-init Llama of ``tests/conftest.py`` (4 layers x 4 heads, d = 16)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from coreselect.data.formatting import PROMPT, RESPONSE, TEMPLATE, Formatter
from coreselect.data.readers import read_records
from coreselect.data.records import Message, Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.methods.p2d import HeadSet, P2DConfig, P2DMethod, head_features, per_example_loss
from coreselect.methods.p2d.select import (
    _mean_pool,
    _unit,
    activation_scores,
    encode_with_prompt,
    head_activations,
    head_features_nll,
    in_ppl_sample,
    shared_prefix,
)
from coreselect.models.loading import load_model
from coreselect.models.runner import ModelRunner, token_budget_batches
from coreselect.train.loop import forward

PROMPT_TEXT = "Solve the math word problem step by step."


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    torch.set_num_threads(1)
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def runner(loaded):
    return ModelRunner(*loaded)


@pytest.fixture()
def data(small_pool):
    return list(read_records([small_pool[0]])), list(read_records([small_pool[1]]))


def _method(runner, loaded, **kw):
    kw = {"batch_tokens": 64, "aer": False, **kw}
    return P2DMethod(runner, Formatter(loaded[1], 256), P2DConfig(**kw), progress=False)


def _table(index, selected):
    return pa.table(
        {
            "index": pa.array(index, pa.int64()),
            "selected": pa.array(selected, pa.bool_()),
            "n_tokens": pa.array([10] * len(index), pa.int64()),
        }
    )


# ------------------------------------------------------------------------------ random heads
def test_random_heads_count_seed_and_heads_json(runner, loaded, data, tmp_path):
    pool, target = data
    loc = _method(runner, loaded, head_fraction=0.25).fit(target)
    assert loc.head_set.extra["heads"] == "localized" and P2DConfig(heads="auto").heads == "localized"
    sets = {}
    for seed in (0, 1, 2, 3):
        m = _method(runner, loaded, heads="random", head_seed=seed, head_fraction=0.25).fit(target)
        assert len(m.head_set.heads) == len(loc.head_set.heads) == 4 == len(set(m.head_set.heads))
        again = _method(runner, loaded, heads="random", head_seed=seed, head_fraction=0.25).fit(target)
        assert again.head_set.heads == m.head_set.heads  # reproducible per seed
        sets[seed] = tuple(m.head_set.heads)
    assert len(set(sets.values())) >= 3  # seeds differ
    m.save_state(tmp_path)
    d = json.loads((tmp_path / "heads.json").read_text())
    assert d["proxy"] == "random" and d["extra"]["heads"] == "random" and d["extra"]["head_seed"] == 3
    assert "not kept" in d["extra"]["draw"] and m.stats["heads"]["head_seed"] == 3
    # the run seed no longer picks the random heads
    other = _method(runner, loaded, heads="random", head_seed=3, head_fraction=0.25, seed=7).fit(target)
    assert other.head_set.heads == m.head_set.heads


# ------------------------------------------------------------------------------ default = old scores
def test_default_options_give_the_old_centroid_scores(runner, loaded, data):
    """The pre-issue-15 pooled score, rewritten here from the public pieces, equals the default exactly
    (the NLL pass runs the model further but the captured head outputs are the same)."""
    pool, target = data
    m = _method(runner, loaded).fit(target)
    got = m.score(pool)
    fmt, cfg = m.formatter, m.config
    by_layer = m.head_set.by_layer()
    enc = [fmt.encode(r) for r in target]
    pooled = []
    for pos in token_budget_batches([len(e) for e in enc], cfg.batch_tokens):
        b = runner.collate(enc, pos)
        v, ok = _mean_pool(head_features(runner, b, by_layer), cfg.scored_positions(b))
        pooled.extend(_unit(v[ok]))
    center = _unit(torch.stack(pooled).mean(0))
    enc = fmt.encode_many(pool)
    want = np.empty(len(pool))
    for pos in token_budget_batches([len(e) for e in enc], cfg.batch_tokens):
        b = runner.collate(enc, pos)
        v, ok = _mean_pool(head_features(runner, b, by_layer), cfg.scored_positions(b))
        want[pos] = torch.where(ok, _unit(v) @ center, torch.full_like(v[:, 0], float("-inf"))).double().numpy()
    np.testing.assert_array_equal(got, want)
    assert m.config.ppl == "sample"
    for kw in ({"ppl": "off"}, {"ppl": "all"}, {"ppl_fraction": 0.5}):
        np.testing.assert_array_equal(_method(runner, loaded, **kw).fit(target).score(pool), got)


# ------------------------------------------------------------------------------ activation score
def test_activation_formula_on_a_hand_computed_case():
    # one record, 3 tokens, 2 heads of d = 2: head 0 norms 5, 1, 10; head 1 norms 1, 2, 0; token 3 masked out
    feats = torch.tensor([[[3.0, 4.0, 1.0, 0.0], [0.0, 1.0, 0.0, 2.0], [6.0, 8.0, 0.0, 0.0]]])
    feats = torch.cat([feats, torch.zeros_like(feats)])  # a second record with no scored token
    mask = torch.tensor([[True, True, False], [False, False, False]])
    a, ok = head_activations(feats, mask, 2)
    torch.testing.assert_close(a[0], torch.tensor([3.0, 1.5]))  # (5 + 1) / 2, (1 + 2) / 2
    assert ok.tolist() == [True, False]
    s = activation_scores(a, torch.tensor([2.0, 0.5]))  # mean(3 / 2, 1.5 / 0.5) = 2.25
    assert s.dtype == torch.float64 and s[0].item() == pytest.approx(2.25)


def test_shared_prefix_and_prompted_encoding(loaded):
    def rec(i, user, kind="chat"):
        msgs = (Message("user", user), Message("assistant", "ok")) if kind == "chat" else (Message("assistant", user),)
        return Record(index=i, id=str(i), source="t", messages=msgs, raw={}, kind=kind)

    same = [rec(0, "Answer with a number. What is 2+2?"), rec(1, "Answer with a number. What is 3+5?")]
    assert shared_prefix(same) == "Answer with a number."  # cut at the last whole sentence
    assert shared_prefix([rec(0, "How many apples?"), rec(1, "How many pears?")]) == ""
    assert shared_prefix([rec(0, "What is 2?"), rec(1, "Natalia sold clips")]) == ""
    lines = [rec(0, "Instruction: be brief\nQ: 2+2"), rec(1, "Instruction: be brief\nQ: 3+3")]
    assert shared_prefix(lines) == "Instruction: be brief\nQ:"
    assert shared_prefix(same[:1]) == ""
    fmt = Formatter(loaded[1], 256)
    for r in (rec(5, "What is 7 plus 5?"), rec(6, "The sea is wide.", "text")):
        plain, prompted = fmt.encode(r), encode_with_prompt(fmt, [r], PROMPT_TEXT)[0]
        text = fmt.tokenizer.decode(prompted.input_ids[prompted.codes == TEMPLATE])
        assert "Solve the math word problem step by step" in text
        # the record's own content tokens are unchanged and are the only non-template ones
        own = prompted.codes != TEMPLATE
        assert fmt.tokenizer.decode(prompted.input_ids[own]) == fmt.tokenizer.decode(plain.input_ids[plain.codes != 0])
        assert set(np.unique(prompted.codes[own])) <= {PROMPT, RESPONSE}
    # a record that already starts with the prompt keeps it once
    twice = encode_with_prompt(fmt, [rec(7, PROMPT_TEXT + "\n\nWhat is 1?")], PROMPT_TEXT)[0]
    assert fmt.tokenizer.decode(twice.input_ids).count("Solve the math") == 1


def test_activation_score_matches_a_manual_forward(runner, loaded, data, tmp_path):
    """s(x) = mean_h a_h(x) / mu_h with a_h from the o_proj inputs of a plain forward pass over prompt + x."""
    pool, target = data
    m = _method(runner, loaded, score="activation", task_prompt=PROMPT_TEXT).fit(target)
    got = m.score(pool)
    assert m.stats["task_prompt"] == PROMPT_TEXT and np.isfinite(got).all()
    heads, cfg, d = m.head_set.heads, m.config, 16
    model = runner.model

    def acts(records):
        out = []
        for r in records:
            e = encode_with_prompt(m.formatter, [r], PROMPT_TEXT)[0]
            b = runner.collate([e], [0])
            seen = {}
            hooks = [
                model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
                    lambda _m, a, layer=layer, seen=seen: seen.__setitem__(layer, a[0][0].detach().double().numpy())
                )
                for layer in {h[0] for h in heads}
            ]
            try:
                with torch.no_grad():
                    forward(model, b)
            finally:
                for h in hooks:
                    h.remove()
            keep = cfg.scored_positions(b)[0].numpy()
            out.append([np.linalg.norm(seen[la][keep, hd * d : (hd + 1) * d], axis=1).mean() for la, hd in heads])
        return np.array(out)

    mu = acts(target).mean(0)
    want = (acts(pool) / mu).mean(1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(m.sides["target"].mu.numpy(), mu, rtol=1e-5)
    # state round trip (mu + prompt) into a fresh instance
    m.save_state(tmp_path)
    fresh = _method(runner, loaded, score="activation", task_prompt=PROMPT_TEXT)
    assert fresh.load_state(tmp_path) and fresh.sides["target"].prompt == PROMPT_TEXT
    np.testing.assert_allclose(fresh.score(pool), got, rtol=1e-6)
    with pytest.raises(ConfigError):
        P2DConfig(score="activation", feature="fingerprint")
    with pytest.raises(ConfigError):
        P2DConfig(score="x")


# ------------------------------------------------------------------------------ perplexity skew
def test_nll_is_the_models_response_loss(runner, loaded, data):
    pool, _ = data
    enc = Formatter(loaded[1], 256).encode_many(pool)
    b = runner.collate(enc, list(range(len(enc))))
    _, nll = head_features_nll(runner, b, {1: [0]}, torch.tensor([True] * (len(enc) - 1) + [False]))
    with torch.no_grad():
        want = per_example_loss(forward(runner.model, b), b)
    torch.testing.assert_close(nll[:-1], want[:-1].float(), rtol=1e-5, atol=1e-6)
    assert torch.isnan(nll[-1])


def test_ppl_stats_in_run_info(runner, loaded, data, tmp_path):
    pool, target = data
    m = _method(runner, loaded, ppl="all").fit(target)
    s = m.score(pool)
    sel = s >= np.sort(s)[-3]
    info = m.run_info(_table([r.index for r in pool], sel), {"cost": {"wall_s": 1.0}})["ppl"]
    assert info["mode"] == "all" and info["pool"]["n"] == len(pool) and info["selected"]["n"] == 3
    idx, nll = m.nll_by_index()
    assert (idx == [r.index for r in pool]).all()
    assert info["selected"]["mean_nll"] == pytest.approx(nll[sel].mean())
    assert info["pool"]["ppl"] == pytest.approx(np.exp(nll.mean()))
    assert info["skews_low"] == (info["selected"]["mean_nll"] < info["pool"]["mean_nll"])
    assert info["coverage"] == 1.0 and info["conditioned_on_task_prompt"] is False
    # sample mode: a seeded, score-independent share of the pool, in a pass of its own
    flags = in_ppl_sample(np.arange(20000), 5, 0.1)
    assert 0.09 < flags.mean() < 0.11 and (flags == in_ppl_sample(np.arange(20000), 5, 0.1)).all()
    assert not (flags == in_ppl_sample(np.arange(20000), 6, 0.1)).all()
    sm = _method(runner, loaded, ppl="sample", ppl_fraction=0.5, seed=1).fit(target)
    np.testing.assert_array_equal(sm.score(pool), s)
    picked = in_ppl_sample(np.array([r.index for r in pool]), 1, 0.5)
    si, snll = sm.nll_by_index()
    assert 0 < len(si) < len(pool) and (si == np.array([r.index for r in pool])[picked]).all()
    np.testing.assert_allclose(snll, nll[picked], rtol=1e-5)  # the same NLL as from the scoring pass
    table = _table([r.index for r in pool], sel)
    assert sm.run_info(table, {})["ppl"]["selected_from"] == "sample"  # no run folder
    # with a run folder: every selected record, read back from coreset.jsonl
    (tmp_path / "coreset.jsonl").write_text("".join(json.dumps(r.raw) + "\n" for r, k in zip(pool, sel) if k))
    sm.run_dir = tmp_path
    got = sm.run_info(table, {})["ppl"]
    assert got["selected_from"] == "coreset" and got["selected"]["n"] == 3 and got["pool"]["n"] == len(si)
    assert got["selected"]["mean_nll"] == pytest.approx(info["selected"]["mean_nll"], rel=1e-5)
    assert "ppl" not in _method(runner, loaded, ppl="off").fit(target).run_info(_table([0], [True]), {})


# ------------------------------------------------------------------------------ several targets
def test_native_multi_target_equals_single_fits_in_one_pass(runner, loaded, data, tmp_path):
    pool, target = data
    targets = {"a": target[:1], "b": target[1:]}
    m = _method(runner, loaded, head_fraction=0.25)
    m.fit_targets(targets)
    assert m.head_set.heads == m.sides["a"].head_set.heads
    passes = runner.forward_passes
    chunk = m.score_batch(pool)
    assert runner.forward_passes - passes == len(pool)  # one pass for both targets
    assert m.stats["heads_union"] >= len(m.sides["a"].head_set.heads)
    for name, recs in targets.items():
        single = _method(runner, loaded, head_fraction=0.25).fit(recs)
        assert single.head_set.heads == m.sides[name].head_set.heads
        np.testing.assert_array_equal(chunk.targets[name], single.score(pool))
    m.target_names = list(targets)
    m.save_state(tmp_path)
    assert HeadSet.load(tmp_path / "target-b" / "heads.json").heads == m.sides["b"].head_set.heads
    fresh = _method(runner, loaded, head_fraction=0.25)
    fresh.target_names = list(targets)
    assert fresh.load_state(tmp_path)
    again = fresh.score_batch(pool)
    for name in targets:
        np.testing.assert_array_equal(again.targets[name], chunk.targets[name])
    assert m.stats["localize_s"] == pytest.approx(sum(s["localize_s"] for s in m.stats["per_target"].values()))
    # a refit on one target starts afresh; an empty target set is refused
    m.fit_targets({"target": target})
    assert not m.score_batch(pool).targets and "per_target" not in m.stats and list(m.sides) == ["target"]
    with pytest.raises(CoreselectError, match="empty"):
        m.fit_targets({"a": target, "b": []})


def test_cli_flags_multi_target_activation_and_ppl(tiny_model_dir, small_pool, tmp_path):
    """``--score activation --heads random --head-seed`` through ``select`` with two named targets:
    native multi-target state, the run's ``ppl`` block and the heads files' seed."""
    from coreselect.__main__ import main

    pool, target = small_pool
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["messages"][0]["content"] = f"Task {i}: answer with one number. " + row["messages"][0]["content"]
        (tmp_path / f"t{i}.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": f"x{i}"}) + "\n")
    out = tmp_path / "run"
    argv = ["select", "--method", "p2d", "--model", str(tiny_model_dir), "--pool", str(pool), "--budget", "3"]
    argv += ["--target", f"a={tmp_path / 't0.jsonl'}", f"b={tmp_path / 't1.jsonl'}"]
    argv += ["--score", "activation", "--heads", "random", "--head-seed", "3", "--ppl-fraction", "0.5"]
    argv += ["--warmup", "none", "--device", "cpu", "--no-progress", "--no-aer", "--out", str(out)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["score"] == "activation" and run["settings"]["head_seed"] == 3
    n_sampled = int(in_ppl_sample(np.arange(8), run["settings"]["seed"], 0.5).sum())
    ppl = run["ppl"]
    assert ppl["mode"] == "sample" and ppl["pool"]["n"] == n_sampled and ppl["skews_low"] in (True, False, None)
    assert ppl["selected_from"] == "coreset" and ppl["selected"]["n"] == 3  # read back from coreset.jsonl
    # two derived prompts ("Task 0: ..." / "Task 1: ..."): one pool pass each, + the sample's NLL pass
    assert run["cost"]["forward_passes"] == 2 * 8 + 4 + n_sampled and ppl["selected_nll_s"] > 0
    for name in ("a", "b"):
        hs = json.loads((out / f"target-{name}" / "heads.json").read_text())
        assert hs["proxy"] == "random" and hs["extra"]["head_seed"] == 3
    stats = run["stats"]["per_target"]
    assert set(stats) == {"a", "b"}
