"""``coreselect eval`` end to end on tiny user tasks (mc and gen), with --exclude and --adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coreselect.__main__ import main
from coreselect.eval.command import default_shots


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def user_tasks(tmp_path) -> tuple[Path, Path]:
    qs = ["Where would you find a fox in the wild?", "What do people use to cut paper?",
          "Which animal lives in the ocean and has eight arms?", "What do you wear on your feet?",
          "Where would you keep milk cold?", "What falls from clouds when it rains?"]
    _write(tmp_path / "mc.jsonl", [{"id": f"q{i}", "question": q, "choices": ["forest", "scissors", "octopus"],
                                     "answer": "ABC"[i % 3]} for i, q in enumerate(qs)])
    (tmp_path / "mc.yaml").write_text("path: mc.jsonl\nkind: mc\nquestion_field: question\nchoices_field: choices\n"
                                      "answer_field: answer\nshots_from_head: 2\nname: toy_mc\n")
    _write(tmp_path / "gen.jsonl", [{"id": f"g{i}", "question": f"What is {i} plus 1?", "answer": str(i + 1),
                                      "solution": f"{i} + 1 = {i + 1}. #### {i + 1}"} for i in range(5)])
    (tmp_path / "gen.yaml").write_text("path: gen.jsonl\nkind: gen\nquestion_field: question\nanswer_field: answer\n"
                                       "target_field: solution\nshots_from_head: 2\n")
    return tmp_path / "mc.yaml", tmp_path / "gen.yaml"


def _eval(model, task, out, *extra):
    return main(["eval", "--model", str(model), "--task", str(task), "--out", str(out), "--no-progress", *extra])


def test_eval_mc_user_task(tiny_model_dir, user_tasks, tmp_path, capsys):
    mc, _ = user_tasks
    assert _eval(tiny_model_dir, mc, tmp_path / "e", "--shots", "1") == 0
    printed = capsys.readouterr().out
    assert "toy_mc: acc " in printed and "n=4, 1-shot" in printed and "eval.json" in printed
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert res["kind"] == "mc" and res["metric"] == "acc" and res["n"] == 4 and res["shots"] == 1
    assert 0 <= res["acc"] <= 1 and 0 <= res["acc_norm"] <= 1 and len(res["per_item"]) == 4
    assert res["adapter"] is None and "torch" in res["versions"]


def test_eval_gen_user_task_with_limit(tiny_model_dir, user_tasks, tmp_path):
    _, gen = user_tasks
    assert _eval(tiny_model_dir, gen, tmp_path / "g", "--shots", "2", "--limit", "2", "--max-new-tokens", "4") == 0
    res = json.loads((tmp_path / "g" / "eval.json").read_text())
    assert res["kind"] == "gen" and res["metric"] == "exact_match" and res["n"] == 2 and res["n_available"] == 3
    assert res["exact_match"] == res["acc"] and {"generation", "pred"} <= set(res["per_item"][0])


def test_exclude_drops_target_questions_from_items_and_shots(tiny_model_dir, user_tasks, tmp_path):
    mc, _ = user_tasks
    target = _write(tmp_path / "target.jsonl", [
        {"id": "t1", "messages": [{"role": "user", "content": "What do you wear on your feet?\nA. shoes"},
                                  {"role": "assistant", "content": "A"}]},
        {"id": "t2", "messages": [{"role": "user", "content": "Where would you find a fox in the wild?"},
                                  {"role": "assistant", "content": "forest"}]},
    ])
    assert _eval(tiny_model_dir, mc, tmp_path / "x", "--shots", "1", "--exclude", str(target)) == 0
    res = json.loads((tmp_path / "x" / "eval.json").read_text())
    ids = {r["id"] for r in res["per_item"]}
    assert res["n"] == 3 and "q3" not in ids  # test item excluded
    # the only remaining shot is q1 (q0 was excluded from the shot pool)
    assert res["n_available"] == 3


def test_eval_with_adapter_and_errors(tiny_model_dir, small_pool, user_tasks, tmp_path, capsys):
    mc, _ = user_tasks
    pool, _ = small_pool
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(pool), "--out", str(tmp_path / "t"),
                 "--lora-r", "4", "--lora-alpha", "8", "--epochs", "1", "--batch-size", "4", "--grad-accum", "1",
                 "--max-length", "128", "--lr", "1e-2", "--no-progress"]) == 0
    assert _eval(tiny_model_dir, mc, tmp_path / "a", "--adapter", str(tmp_path / "t" / "adapter"), "--shots", "0") == 0
    base_out = tmp_path / "b"
    assert _eval(tiny_model_dir, mc, base_out, "--shots", "0") == 0
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    b = json.loads((base_out / "eval.json").read_text())
    assert a["adapter"].endswith("adapter") and a["per_item"][0]["logliks"] != b["per_item"][0]["logliks"]
    capsys.readouterr()
    assert _eval(tiny_model_dir, mc, tmp_path / "c", "--adapter", str(tmp_path)) == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err
    assert _eval(tiny_model_dir, "nope", tmp_path / "c") == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert _eval(tiny_model_dir, mc, tmp_path / "c", "--exclude", str(tmp_path / "none.jsonl")) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err


def test_default_shots_follow_table_6():
    assert [default_shots(t) for t in ("csqa", "commonsense_qa", "siqa", "hellaswag", "gsm8k", "mine")] == [
        5, 5, 0, 5, 8, 0]
