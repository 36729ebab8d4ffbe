"""``coreselect export``: TRL / LLaMA-Factory / axolotl files, and TRL's SFTTrainer on select's own
``coreset.jsonl`` with no glue code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import chat, write_jsonl

from coreselect.__main__ import main

MIXED = [
    {
        "id": "m1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
        ],
    },
    {"id": "s1", "conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."}]},
    {"id": "p1", "prompt": "Translate good morning to French.", "completion": "Bonjour."},
    {
        "id": "p2",
        "prompt": [{"role": "user", "content": "Name a fox habitat."}],
        "completion": [{"role": "assistant", "content": "The forest."}],
    },
    {
        "id": "a1",
        "instruction": "Summarize the text.",
        "input": "The meeting moved to Friday.",
        "output": "Meeting on Friday.",
    },
    {"id": "a2", "instruction": "Write a poem about the sea.", "input": "", "output": "The sea is wide."},
    {"id": "t1", "text": "How do I bake bread? Mix flour, water, yeast and salt, then bake."},
]
U, A = "user", "assistant"
EXPECTED = {
    "m1": [("system", "Be brief."), (U, "Hi?"), (A, "Hello.")],
    "s1": [(U, "What is 2+2?"), (A, "4.")],
    "p1": [(U, "Translate good morning to French."), (A, "Bonjour.")],
    "p2": [(U, "Name a fox habitat."), (A, "The forest.")],
    "a1": [(U, "Summarize the text.\n\nThe meeting moved to Friday."), (A, "Meeting on Friday.")],
    "a2": [(U, "Write a poem about the sea."), (A, "The sea is wide.")],
    "t1": [(U, ""), (A, "How do I bake bread? Mix flour, water, yeast and salt, then bake.")],
}


def _select(pool, out, *extra, target=None, method="bm25"):
    argv = ["select", "--pool", str(pool), "--out", str(out), "--method", method, "--no-progress", *extra]
    return main(argv + (["--target", str(target)] if target else []))


def _export(run, fmt, *extra):
    return main(["export", str(run), "--format", fmt, "--no-progress", *extra])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def mixed_run(tmp_path) -> Path:
    """A random-method run that selects the whole mixed-shape pool."""
    out = tmp_path / "mixed"
    assert _select(write_jsonl(tmp_path / "mixed.jsonl", MIXED), out, "--budget", "100%", method="random") == 0
    return out


def _sft_two_steps(model_dir: Path, data_file: Path, tmp_path: Path) -> list[float]:
    """TRL's SFTTrainer, 2 steps, on a JSON Lines file exactly as written (no preprocessing)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=str(data_file), split="train", cache_dir=str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(model_dir)  # the tiny tokenizer carries a ChatML chat template
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        train_dataset=dataset,
        processing_class=tok,
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"),
            max_steps=2,
            per_device_train_batch_size=2,
            max_length=64,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        ),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    return losses


def test_sft_trainer_runs_on_select_coreset_as_is(tiny_model_dir, small_pool, tmp_path, one_torch_thread):
    pool, target = small_pool
    run = tmp_path / "run"
    assert _select(pool, run, "--budget", "4", target=target) == 0
    _sft_two_steps(tiny_model_dir, run / "coreset.jsonl", tmp_path / "raw")


def test_sft_trainer_runs_on_trl_export_of_every_shape(tiny_model_dir, mixed_run, tmp_path, one_torch_thread):
    assert _export(mixed_run, "trl") == 0
    _sft_two_steps(tiny_model_dir, mixed_run / "export" / "trl" / "coreset.jsonl", tmp_path / "trl")


def test_trl_export_converts_every_shape(mixed_run, capsys):
    assert _export(mixed_run, "trl") == 0
    out = capsys.readouterr().out
    assert "exported 7 records (trl, messages; 1 text records as empty-user conversations)" in out
    assert 'load_dataset("json"' in out
    d = mixed_run / "export" / "trl"
    rows = _rows(d / "coreset.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(EXPECTED)
    for r in rows:
        assert set(r) == {"messages", "id"}
        assert [(m["role"], m["content"]) for m in r["messages"]] == EXPECTED[r["id"]]
    coreset_ids = [r["id"] for r in _rows(mixed_run / "coreset.jsonl")]
    assert [r["id"] for r in rows] == coreset_ids  # best first, as the coreset
    info = json.loads((d / "coreset.export.json").read_text())
    assert info["shape"] == "messages" and info["records"] == 7 and info["text_as_chat"] == 1
    assert info["input_shapes"] == {"messages": 1, "conversations": 1, "prompt-completion": 2, "alpaca": 2, "text": 1}


def _check_sharegpt(row: dict, tags: dict) -> None:
    """LLaMA-Factory's sharegpt rules: optional leading system turn, then user/assistant alternating,
    an even number of turns (README: human at odd positions, gpt at even ones)."""
    msgs = row["messages"]
    if msgs[0][tags["role_tag"]] == tags["system_tag"]:
        msgs = msgs[1:]
    assert msgs and len(msgs) % 2 == 0
    for i, m in enumerate(msgs):
        assert m[tags["role_tag"]] == (tags["user_tag"] if i % 2 == 0 else tags["assistant_tag"])
        assert isinstance(m[tags["content_tag"]], str)


def test_llamafactory_export(mixed_run, tmp_path):
    lf_data = tmp_path / "LLaMA-Factory" / "data"  # its data folder, with its own dataset_info.json
    lf_data.mkdir(parents=True)
    (lf_data / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    assert _export(mixed_run, "llamafactory", "--out", str(lf_data), "--name", "trim_coreset") == 0
    info = json.loads((lf_data / "dataset_info.json").read_text())
    assert info["alpaca_en_demo"] == {"file_name": "alpaca_en_demo.json"}  # kept
    entry = info["trim_coreset"]
    assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages"}
    tags = entry["tags"]
    assert tags == {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
    }
    data = lf_data / entry["file_name"]  # relative to dataset_dir
    assert data.name == "trim_coreset.jsonl" and data.is_file()
    rows = _rows(data)
    assert len(rows) == 7
    for r in rows:
        _check_sharegpt(r, tags)
    # the same name again: refused, unless --overwrite
    assert _export(mixed_run, "llamafactory", "--out", str(lf_data), "--name", "trim_coreset") == 2
    assert _export(mixed_run, "llamafactory", "--out", str(lf_data), "--name", "trim_coreset", "--overwrite") == 0
    assert set(json.loads((lf_data / "dataset_info.json").read_text())) == {"alpaca_en_demo", "trim_coreset"}
    assert {p.name for p in lf_data.iterdir()} == {
        "dataset_info.json",
        "trim_coreset.jsonl",
        "trim_coreset.export.json",
    }


def test_axolotl_export(mixed_run, capsys):
    assert _export(mixed_run, "axolotl") == 0
    d = mixed_run / "export" / "axolotl"
    text = (d / "axolotl.yaml").read_text()
    assert text.startswith("# axolotl dataset entry")
    cfg = yaml.safe_load(text)
    (entry,) = cfg["datasets"]
    assert entry["type"] == "chat_template" and entry["ds_type"] == "json"
    assert entry["field_messages"] == "messages"
    assert entry["message_property_mappings"] == {"role": "role", "content": "content"}
    assert entry["roles_to_train"] == ["assistant"]
    path = Path(entry["path"])
    assert path.is_absolute() and path == (d / "coreset.jsonl").resolve()
    for r in _rows(path):
        assert all(
            set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
            for m in r[entry["field_messages"]]
        )
    assert "axolotl.yaml" in capsys.readouterr().out


def test_text_only_coreset_exports_plain_text(tmp_path, one_torch_thread):
    texts = [{"text": f"Document {i}: the sea is wide and deep, number {i}."} for i in range(6)]
    run = tmp_path / "run"
    assert _select(write_jsonl(tmp_path / "docs.jsonl", texts), run, "--budget", "3", method="random") == 0
    for fmt in ("trl", "llamafactory", "axolotl"):
        assert _export(run, fmt) == 0
        d = run / "export" / fmt
        rows = _rows(d / "coreset.jsonl")
        assert len(rows) == 3 and all(set(r) == {"text", "id"} for r in rows)
        assert json.loads((d / "coreset.export.json").read_text())["shape"] == "text"
    lf = json.loads((run / "export" / "llamafactory" / "dataset_info.json").read_text())["coreset"]
    assert lf == {"file_name": "coreset.jsonl", "columns": {"prompt": "text"}}
    (ax,) = yaml.safe_load((run / "export" / "axolotl" / "axolotl.yaml").read_text())["datasets"]
    assert ax["type"] == "completion" and ax["field"] == "text"


def test_export_python_api(mixed_run, tmp_path):
    from coreselect.export import export

    info = export(dir=str(mixed_run), format="axolotl", out=str(tmp_path / "ax"), progress=False)
    assert info["records"] == 7 and Path(info["data"]).is_file() and info["entry"]["type"] == "chat_template"


def test_export_errors(mixed_run, tmp_path, capsys):
    def err(*argv) -> str:
        assert main(["export", *argv, "--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert "no such run folder" in err(str(tmp_path / "nope"))
    assert "unknown export format 'jsonl'" in err(str(mixed_run), "--format", "jsonl")
    assert "name must be" in err(str(mixed_run), "--name", "../x")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a finished selection run (no coreset.jsonl)" in err(str(empty))
    assert _export(mixed_run, "trl") == 0
    assert "exists (use --overwrite" in err(str(mixed_run), "--format", "trl")
    assert _export(mixed_run, "trl", "--overwrite") == 0
    # a coreset.jsonl that does not match scores.parquet (two runs mixed in one folder)
    (mixed_run / "coreset.jsonl").write_text(json.dumps(chat(1, "q", "a")) + "\n")
    assert "selects 7" in err(str(mixed_run), "--format", "axolotl")
