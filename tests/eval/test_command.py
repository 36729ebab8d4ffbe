"""``coreselect eval`` end to end on a tiny random-init Llama: lm-eval YAML user tasks (mc and gen),
``--exclude``, ``--adapter``, ``--heldout``, and equality with a plain ``lm_eval.simple_evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coreselect.__main__ import main
from coreselect.eval.command import default_shots


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


QS = [
    "Where would you find a fox in the wild?",
    "What do people use to cut paper?",
    "Which animal lives in the ocean and has eight arms?",
    "What do you wear on your feet?",
    "Where would you keep milk cold?",
    "What falls from clouds when it rains?",
]


def mc_task(tmp_path: Path, name: str = "toy_mc") -> Path:
    """An lm-eval multiple-choice task over a local JSONL (absolute data_files: lm-eval resolves them
    against the working directory); the first 2 rows are the few-shot split."""
    rows = [
        {"id": f"q{i}", "question": q, "choices": ["forest", "scissors", "octopus"], "answer": i % 3}
        for i, q in enumerate(QS)
    ]
    _write(tmp_path / "mc_train.jsonl", rows[:2])
    _write(tmp_path / "mc_test.jsonl", rows[2:])
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {tmp_path / "mc_train.jsonl"}
    test: {tmp_path / "mc_test.jsonl"}
output_type: multiple_choice
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return path


@pytest.fixture()
def user_tasks(tmp_path) -> tuple[Path, Path]:
    _write(
        tmp_path / "gen.jsonl",
        [{"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}. #### {i + 1}"} for i in range(5)],
    )
    gen = tmp_path / "gen.yaml"
    gen.write_text(f"""task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {tmp_path / "gen.jsonl"}}}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["Question:", "\\n\\n"], do_sample: false}}
metric_list:
  - metric: exact_match
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
""")
    return mc_task(tmp_path), gen


def _eval(model, task, out, *extra):
    return main(["eval", "--model", str(model), "--task", str(task), "--out", str(out), "--no-progress", *extra])


def test_eval_mc_user_task(tiny_model_dir, user_tasks, tmp_path, capsys):
    mc, _ = user_tasks
    assert _eval(tiny_model_dir, mc, tmp_path / "e", "--shots", "1") == 0
    printed = capsys.readouterr().out
    assert "toy_mc: acc " in printed and "95% CI" in printed and "n=4, 1-shot" in printed and "eval.json" in printed
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert res["task"] == "toy_mc" and res["metric"] == "acc" and res["n"] == 4 and res["shots"] == 1
    acc = res["tasks"]["toy_mc"]["metrics"]["acc"]
    assert res["acc"] == acc["value"] and 0 <= acc["value"] <= 1 and "acc_norm" in res["tasks"]["toy_mc"]["metrics"]
    lo, hi = acc["ci95"]
    assert lo == pytest.approx(acc["value"] - 1.959964 * acc["stderr"]) and hi >= acc["value"]
    assert res["adapter"] is None and "torch" in res["versions"] and "lm_eval" in res["versions"]
    lm = json.loads((tmp_path / "e" / "lm_eval_results.json").read_text())
    assert lm["results"]["toy_mc"]["acc,none"] == res["acc"]
    assert len((tmp_path / "e" / "samples_toy_mc.jsonl").read_text().splitlines()) == 4


def test_eval_gen_user_task_with_limit(tiny_model_dir, user_tasks, tmp_path):
    _, gen = user_tasks
    assert _eval(tiny_model_dir, gen, tmp_path / "g", "--limit", "2", "--max-new-tokens", "4") == 0
    res = json.loads((tmp_path / "g" / "eval.json").read_text())
    assert res["metric"] == "exact_match,strict-match" and res["n"] == 2 and res["n_available"] == 5
    assert res["exact_match,strict-match"] == 0.0  # a random-init model does not write "#### n"
    assert res["settings"]["max_new_tokens"] == 4


def test_exclude_drops_target_questions_from_items_and_shots(tiny_model_dir, user_tasks, tmp_path):
    mc, _ = user_tasks
    target = _write(
        tmp_path / "target.jsonl",
        [
            {
                "id": "t1",
                "messages": [
                    {"role": "user", "content": "What do you wear on your feet?\nA. shoes"},
                    {"role": "assistant", "content": "A"},
                ],
            },
            {
                "id": "t2",
                "messages": [
                    {"role": "user", "content": "Where would you find a fox in the wild?"},
                    {"role": "assistant", "content": "forest"},
                ],
            },
        ],
    )
    assert _eval(tiny_model_dir, mc, tmp_path / "x", "--shots", "1", "--exclude", str(target)) == 0
    res = json.loads((tmp_path / "x" / "eval.json").read_text())
    assert res["n"] == 3 and res["dropped_docs"] == {"toy_mc": 1}
    samples = (tmp_path / "x" / "samples_toy_mc.jsonl").read_text().splitlines()
    docs = [json.loads(line)["doc"]["id"] for line in samples]
    assert "q3" not in docs
    prompts = (tmp_path / "x" / "samples_toy_mc.jsonl").read_text()
    assert "fox" not in prompts  # q0 left the few-shot pool: the only exemplar is q1


def test_eval_with_adapter_heldout_and_errors(tiny_model_dir, small_pool, user_tasks, tmp_path, capsys):
    mc, _ = user_tasks
    pool, target = small_pool
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(pool),
                "--out",
                str(tmp_path / "t"),
                "--lora-r",
                "4",
                "--lora-alpha",
                "8",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--grad-accum",
                "1",
                "--max-length",
                "128",
                "--lr",
                "1e-2",
                "--no-progress",
            ]
        )
        == 0
    )
    adapter = str(tmp_path / "t" / "adapter")
    assert (
        _eval(tiny_model_dir, mc, tmp_path / "a", "--adapter", adapter, "--shots", "0", "--heldout", str(target)) == 0
    )
    assert _eval(tiny_model_dir, mc, tmp_path / "b", "--shots", "0", "--heldout", str(target)) == 0
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    b = json.loads((tmp_path / "b" / "eval.json").read_text())
    ra, rb = ((tmp_path / d / "samples_toy_mc.jsonl").read_text().splitlines()[0] for d in "ab")
    assert a["adapter"] == adapter and json.loads(ra)["resps"] != json.loads(rb)["resps"]
    ha, hb = a["heldout"], b["heldout"]
    assert ha["n"] == hb["n"] > 1 and ha["loss"] != hb["loss"] and ha["ci95"][0] < ha["loss"] < ha["ci95"][1]
    assert "held-out loss" in capsys.readouterr().out
    # --heldout alone: the held-out loss is the headline
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--heldout",
                str(target),
                "--out",
                str(tmp_path / "h"),
                "--no-progress",
            ]
        )
        == 0
    )
    h = json.loads((tmp_path / "h" / "eval.json").read_text())
    assert h["metric"] == "heldout_loss" and h["heldout_loss"] == pytest.approx(hb["loss"], rel=1e-5)
    assert len((tmp_path / "h" / "heldout.jsonl").read_text().splitlines()) == h["heldout"]["n"]
    capsys.readouterr()
    assert _eval(tiny_model_dir, mc, tmp_path / "c", "--adapter", str(tmp_path)) == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err
    assert _eval(tiny_model_dir, "nope", tmp_path / "c") == 2
    assert "unknown task(s) nope" in capsys.readouterr().err
    assert _eval(tiny_model_dir, mc, tmp_path / "c", "--exclude", str(tmp_path / "none.jsonl")) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err


def test_default_shots_follow_table_6():
    assert [default_shots(t) for t in ("csqa", "commonsense_qa", "siqa", "hellaswag", "gsm8k", "mine")] == [
        5,
        5,
        0,
        5,
        8,
        0,
    ]


def test_coreselect_eval_equals_lm_eval_simple_evaluate(tiny_model_dir, tmp_path):
    """The same task, model and items through ``coreselect eval`` and a plain ``simple_evaluate``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    mc = mc_task(tmp_path)
    assert _eval(tiny_model_dir, mc, tmp_path / "e", "--limit", "3", "--batch-size", "2") == 0
    ours = json.loads((tmp_path / "e" / "lm_eval_results.json").read_text())
    lm = HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=2)
    theirs = lm_eval.simple_evaluate(
        model=lm,
        tasks=[str(mc)],
        limit=3,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=1000,
    )
    assert ours["results"] == theirs["results"] and ours["n-shot"] == theirs["n-shot"]
    ours_s = [json.loads(line) for line in (tmp_path / "e" / "samples_toy_mc.jsonl").read_text().splitlines()]
    for o, t in zip(ours_s, theirs["samples"]["toy_mc"], strict=True):
        assert o["arguments"] == [list(a) for a in t["arguments"]]
        assert [r[0][0] for r in o["resps"]] == pytest.approx([r[0][0] for r in t["resps"]], abs=1e-4)
