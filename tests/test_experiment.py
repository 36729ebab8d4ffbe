"""``coreselect experiment`` end to end on a tiny random-init Llama and a tiny user task, and resume."""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest

from coreselect import experiment as exp
from coreselect.__main__ import main
from coreselect.errors import ConfigError


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def config(tiny_model_dir, small_pool, tmp_path) -> Path:
    pool, target = small_pool
    qs = [
        "Where would you find a fox in the wild?",
        "What do people use to cut paper?",
        "Which animal lives in the ocean?",
        "What do you wear on your feet?",
        "Where would you keep milk cold?",
    ]
    rows = [
        {"id": f"q{i}", "question": q, "choices": ["forest", "scissors", "octopus"], "answer": i % 3}
        for i, q in enumerate(qs)
    ]
    _write(tmp_path / "mc_train.jsonl", rows[:1])
    _write(tmp_path / "mc_test.jsonl", rows[1:])
    (tmp_path / "toy.yaml").write_text(  # an lm-eval task over local files
        f"task: toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {tmp_path / 'mc_train.jsonl'}\n"
        f"    test: {tmp_path / 'mc_test.jsonl'}\noutput_type: multiple_choice\ntraining_split: train\n"
        'fewshot_split: train\ntest_split: test\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n'
    )
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
model: {tiny_model_dir}
pool: [{pool}]
targets: {{{tmp_path / "toy.yaml"}: {target}}}
methods: [trim, random]
budgets: ["50%"]
seeds: [0, 1]
shots: {{toy: 1}}
heldout: {{{tmp_path / "toy.yaml"}: {target}}}
warmup_fraction: 0.25
warmup_epochs: 1
warmup_batch_size: 2
warmup_grad_accum: 1
select: {{layers: 2, max_length: 128}}
train: {{lora_r: 4, lora_alpha: 8, epochs: 1, batch_size: 2, grad_accum: 1, max_length: 128, lr: 0.01}}
out: {tmp_path / "out"}
progress: false
""")
    return cfg


def _count(monkeypatch) -> dict[str, int]:
    calls = {"warmup": 0, "select": 0, "train": 0, "eval": 0}
    for name, attr in (
        ("warmup", "warmup_model"),
        ("select", "select"),
        ("train", "train"),
        ("eval", "evaluate_command"),
    ):
        real = getattr(exp, attr)

        def wrapped(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(exp, attr, wrapped)
    return calls


def test_experiment_end_to_end_then_resume(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    calls = _count(monkeypatch)
    assert main(["experiment", "--config", str(config)]) == 0
    # one warmup shared by trim; 2 selections; 2 full-data + 2 x 2 coreset trainings; 1 + 2 + 4 evaluations
    assert calls == {"warmup": 1, "select": 2, "train": 6, "eval": 7}
    assert (out / "warmup" / "adapter" / "adapter_config.json").is_file()
    for m in ("trim", "random"):
        assert (out / "toy" / "select" / f"{m}-50pct" / "coreset.jsonl").is_file()
        for s in (0, 1):
            assert (out / "toy" / "train" / f"{m}-50pct-s{s}" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "toy" / "select" / "trim-50pct" / "run.json").read_text())["settings"]["warmup"] == str(
        out / "warmup" / "adapter"
    )

    md = (out / "results.md").read_text()
    assert "| Method | toy | toy loss | Average | Select (s) | Train (s) |" in md and "Held-out loss" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "Method" not in line]
    assert [line.split(" | ")[0][2:] for line in table] == ["Pretrained", "Full-data", "trim", "random"]
    assert re.fullmatch(r"\| Pretrained \| \d+\.\d\d \| \d+\.\d{4} \| \d+\.\d\d \| – \| – \| – \|", table[0])
    for line in table[1:]:
        assert re.match(
            r"\| \S+ \| \d+\.\d\d \(\d+\.\d\d\) \| \d+\.\d{4} \(\d+\.\d{4}\) \| \d+\.\d\d \| "
            r"(–|\d+) \| \d+ \|",
            line,
        ), line
    ev = json.loads((out / "toy" / "eval" / "random-50pct-s0" / "eval.json").read_text())
    assert (
        ev["n"] == 4
        and ev["shots"] == 1
        and ev["heldout"]["n"] == 2
        and (out / "toy" / "eval" / "pretrained" / "lm_eval_results.json").is_file()
    )
    # the cell is the mean (population std) over the seeds of eval.json's accuracy, in %
    accs = [
        100 * json.loads((out / "toy" / "eval" / f"random-50pct-s{s}" / "eval.json").read_text())["acc"] for s in (0, 1)
    ]
    assert f"| random | {statistics.fmean(accs):.2f} ({statistics.pstdev(accs):.2f}) |" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["row"] for r in rows] == ["Pretrained", "Full-data", "trim", "random"]
    assert rows[3]["n_seeds"] == "2" and float(rows[3]["toy_mean"]) == pytest.approx(statistics.fmean(accs), abs=1e-3)
    losses = [
        json.loads((out / "toy" / "eval" / f"random-50pct-s{s}" / "eval.json").read_text())["heldout"]["loss"]
        for s in (0, 1)
    ]
    assert float(rows[3]["toy_loss_mean"]) == pytest.approx(statistics.fmean(losses), abs=1e-4)
    assert "Hardware:" in md and "torch" in json.loads((out / "experiment.json").read_text())["versions"]

    # a re-run does nothing but rebuild the table
    calls.update(dict.fromkeys(calls, 0))
    assert main(["experiment", "--config", str(config)]) == 0
    assert calls == {"warmup": 1, "select": 0, "train": 0, "eval": 0}  # warmup_model returns the cached adapter

    # lose one evaluation and one finished training: only those (and the stale evaluation) are redone
    (out / "toy" / "eval" / "random-50pct-s1" / "eval.json").unlink()
    shutil.rmtree(out / "toy" / "train" / "trim-50pct-s0" / "adapter")
    calls.update(dict.fromkeys(calls, 0))
    capsys.readouterr()
    assert main(["experiment", "--config", str(config)]) == 0
    assert calls == {"warmup": 1, "select": 0, "train": 1, "eval": 2}
    log = capsys.readouterr().out
    assert "train toy/train/trim-50pct-s0: 4 records" in log and "select toy/trim-50pct: cached" in log

    # a re-selected coreset makes its trainings and evaluations stale
    shutil.rmtree(out / "toy" / "select" / "random-50pct")
    calls.update(dict.fromkeys(calls, 0))
    assert main(["experiment", "--config", str(config)]) == 0
    assert calls == {"warmup": 1, "select": 1, "train": 2, "eval": 2}


def test_experiment_p2d_rows_and_aer(config, tmp_path, monkeypatch):
    """P2D / P2D-dagger / P2D-double-dagger rows next to Random, each with an AER."""
    text = config.read_text().replace("methods: [trim, random]", "methods: [p2d, p2d_select, p2d_train, random]")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("heldout:"))  # no loss column
    config.write_text(text.replace("seeds: [0, 1]", "seeds: [0]") + "\ninclude_full_data: false\n")
    out = tmp_path / "out"
    calls = _count(monkeypatch)
    assert main(["experiment", "--config", str(config)]) == 0
    # no warmup (P2D scores with the base model); p2d and random selected once each, shared by the rows
    assert calls == {"warmup": 0, "select": 2, "train": 4, "eval": 5}
    p2d_sel = out / "toy" / "select" / "p2d-50pct"
    assert json.loads((p2d_sel / "run.json").read_text())["settings"]["warmup"] == "none"
    for m in ("p2d", "p2d_train"):  # heads-only: a head delta trained on the task's heads, no LoRA adapter
        run = json.loads((out / "toy" / "train" / f"{m}-50pct-s0" / "run.json").read_text())
        assert run["mode"] == "heads" and run["settings"]["heads"] == str(p2d_sel / "heads.json")
        assert json.loads((out / "toy" / "eval" / f"{m}-50pct-s0" / "eval.json").read_text())["adapter"].endswith(
            "heads_delta.safetensors"
        )
    assert json.loads((out / "toy" / "train" / "p2d_train-50pct-s0" / "run.json").read_text())["settings"]["data"] == [
        str(out / "toy" / "select" / "random-50pct" / "coreset.jsonl")
    ]
    assert (out / "toy" / "train" / "p2d_select-50pct-s0" / "adapter" / "adapter_config.json").is_file()

    md = (out / "results.md").read_text()
    assert "| Method | toy | Average | Select (s) | Train (s) | AER |" in md and "lower is better" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "Method" not in line]
    assert [line.split(" | ")[0][2:] for line in table] == [
        "Pretrained",
        "P2D",
        "P2D† (select only)",
        "P2D‡ (heads only, random data)",
        "random",
    ]
    for line in table[1:]:
        assert re.fullmatch(r"\| .+ \| \d+\.\d\d \(\d+\.\d\d\) \| \d+\.\d\d \| \d+ \| \d+ \| \d+\.\d{3} \|", line), line
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert rows[0]["aer"] == "" and all(float(r["aer"]) > 0 for r in rows[1:])
    info = json.loads((out / "experiment.json").read_text())
    assert info["full_sft"]["measured"] is False and "estimated" in info["full_sft"]["how"]
    assert info["full_sft"]["full_sft_s"] > 0
    # AER = (selection / tasks + training) / full SFT
    p2d = next(r for r in info["rows"] if r["method"] == "p2d")
    assert p2d["aer"] == pytest.approx((p2d["select_s"] + p2d["train_s"]) / info["full_sft"]["full_sft_s"])

    calls.update(dict.fromkeys(calls, 0))  # a re-run reuses everything, the AER denominator included
    assert main(["experiment", "--config", str(config)]) == 0
    assert calls == {"warmup": 0, "select": 0, "train": 0, "eval": 0}
    assert json.loads((out / "experiment.json").read_text())["full_sft"] == info["full_sft"]


def test_bad_configs_fail_early(tmp_path, capsys):
    args = exp.ExperimentArgs(targets={"csqa": "x.jsonl"}, methods=["nope"], out=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown method"):
        args.validate()
    args = exp.ExperimentArgs(targets={"csqa": "x.jsonl"}, train={"model": "other"}, out=str(tmp_path))
    with pytest.raises(ConfigError, match="train: unknown or experiment-owned key"):
        args.validate()
    with pytest.raises(ConfigError, match="targets must map"):
        exp.ExperimentArgs(out=str(tmp_path)).validate()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("targets: {csqa: x.jsonl}\nmodles: [a]\n")
    assert main(["experiment", "--config", str(cfg)]) == 2
    assert "unknown key(s) modles" in capsys.readouterr().err
