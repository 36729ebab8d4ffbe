"""``coreselect train`` end to end on a tiny random-init Llama: adapter, run.json, resume, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from coreselect.__main__ import main

FAST = [
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
    "1e-3",
    "--no-progress",
]


def _train(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--out", str(out), *FAST, *extra])


def _adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_train_writes_a_loadable_adapter_and_run_json(tiny_model_dir, small_pool, tmp_path, capsys):
    pool, _ = small_pool
    out = tmp_path / "t"
    assert _train(tiny_model_dir, pool, out) == 0
    assert "trained 8 records, 2 steps, loss" in capsys.readouterr().out
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (
        cfg["r"] == 4
        and cfg["lora_alpha"] == 8
        and set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    )
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "train" and run["steps"] == 2 and run["counts"]["records"] == 8
    assert run["train_args"]["lora_r"] == 4 and run["settings"]["data"] == [str(pool)]
    assert run["final_loss"] > 0 and run["timings"]["train_s"] > 0 and "torch" in run["versions"]
    assert f"peft={out.resolve() / 'adapter'}" in run["lm_eval"]

    # loadable as a PEFT adapter on the base model, and it changes the model's outputs
    from coreselect.models.loading import load_model

    base, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    tuned, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu", adapter=str(out / "adapter"))
    ids = tok("What is 7 plus 5?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits)


def test_adapter_loads_in_lm_eval(tiny_model_dir, small_pool, tmp_path):
    hf = pytest.importorskip("lm_eval.models.huggingface")
    pool, _ = small_pool
    assert _train(tiny_model_dir, pool, tmp_path / "t") == 0
    lm = hf.HFLM(pretrained=str(tiny_model_dir), peft=str(tmp_path / "t" / "adapter"), device="cpu", batch_size=1)
    assert lm.model is not None


def test_existing_output_needs_resume_or_overwrite(tiny_model_dir, small_pool, tmp_path, capsys):
    pool, _ = small_pool
    out = tmp_path / "t"
    assert _train(tiny_model_dir, pool, out) == 0
    assert _train(tiny_model_dir, pool, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _train(tiny_model_dir, pool, out, "--overwrite") == 0
    assert _train(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "m") == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert _train(tiny_model_dir, pool, tmp_path / "x", "--save-every", "often") == 2
    assert "save_every" in capsys.readouterr().err


def test_resume_after_an_interruption_gives_the_same_adapter(tiny_model_dir, small_pool, tmp_path):
    pool, _ = small_pool
    out = tmp_path / "t"
    args = ("--batch-size", "2", "--save-every", "1", "--epochs", "1")
    assert _train(tiny_model_dir, pool, out, *args) == 0  # 4 steps, a checkpoint after each
    ref = _adapter_weights(out / "adapter")
    # as if killed during step 3: no final adapter, no run.json, checkpoints 1-2 only
    shutil.rmtree(out / "adapter")
    (out / "run.json").unlink()
    for step in (3, 4):
        shutil.rmtree(out / f"checkpoint-{step}")
    assert _train(tiny_model_dir, pool, out, *args, "--resume") == 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["resumed_from"] == 2 and state["steps"] == 4
    got = _adapter_weights(out / "adapter")
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_target_modules_packing_and_precision_flags(tiny_model_dir, small_pool, tmp_path):
    pool, _ = small_pool
    out = tmp_path / "t"
    assert (
        _train(
            tiny_model_dir,
            pool,
            out,
            "--lora-target-modules",
            "q_proj,v_proj",
            "--packing",
            "--precision",
            "fp32",
            "--report-to",
            "none",
            "--no-plot",
        )
        == 0
    )
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    run = json.loads((out / "run.json").read_text())
    assert run["train_args"]["packing"] is True and run["loss_plot"] is None and not (out / "loss.png").exists()
