"""LoRA training on transformers.Trainer: loss masking, learning, adapters, checkpoints, safe exact resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from coreselect.data.formatting import PROMPT, RESPONSE, TEMPLATE, Formatter
from coreselect.data.records import Message, Record
from coreselect.errors import ConfigError
from coreselect.models.runner import collate
from coreselect.train.lora import (
    TrainArgs,
    collate_for_lm,
    eval_loss,
    lm_features,
    make_labels,
    masked_lm_loss,
    train_lora,
    warmup_subset,
)

PAIRS = [
    ("What is 7 plus 5?", "7 + 5 = 12. The answer is 12."),
    ("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7. He has 7 apples."),
    ("What is 48 divided by 2?", "48 / 2 = 24. The answer is 24."),
    ("Write a poem about the sea.", "The sea is wide, the sea is deep."),
    ("How do I bake bread?", "Mix flour, water and yeast, knead, let it rise, bake."),
    ("Translate good morning to French.", "Bonjour."),
]


def rec(i: int, user: str, assistant: str | None) -> Record:
    msgs = [Message("user", user)] + ([Message("assistant", assistant)] if assistant is not None else [])
    return Record(index=i, id=str(i), source="t", messages=tuple(msgs), raw={})


RECORDS = [rec(i, u, a) for i, (u, a) in enumerate(PAIRS)]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fresh(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def small(**kw) -> TrainArgs:
    base = {
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lr": 1e-2,
        "epochs": 3,
        "batch_size": 2,
        "grad_accum": 2,
        "max_length": 128,
        "warmup_ratio": 0.1,
    }
    return TrainArgs(**{**base, **kw})


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------- masking
def test_labels_are_ignored_exactly_outside_the_response(tiny_model_dir):
    model, tok = fresh(tiny_model_dir)
    fmt = Formatter(tok, 128)
    multi = Record(
        9,
        "9",
        "t",
        (
            Message("system", "Be brief."),
            Message("user", "What is 7 plus 5?"),
            Message("assistant", "12."),
            Message("user", "And 48 / 2?"),
            Message("assistant", "24."),
        ),
        raw={},
    )
    enc = [fmt.encode(r) for r in (RECORDS[0], multi, RECORDS[5])]
    batch = collate(enc, [0, 1, 2], tok.pad_token_id, "right")
    labels = make_labels(batch)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for r, e in enumerate(enc):
        lab = labels[r, : len(e)].numpy()
        codes = e.codes
        target = lab != -100
        assert (target == e.loss_mask).all()
        assert target[codes == RESPONSE].all()  # all assistant content is a target
        assert not target[codes == PROMPT].any()  # prompt content never is
        tmpl_targets = target & (codes == TEMPLATE)
        assert set(e.input_ids[tmpl_targets].tolist()) == {im_end}  # only the end-of-turn token
        n_turns = sum(m.role == "assistant" for m in (RECORDS[0], multi, RECORDS[5])[r].messages)
        assert tmpl_targets.sum() == n_turns
        # the end-of-turn target directly follows the last response token of its turn
        for pos in tmpl_targets.nonzero()[0]:
            assert codes[pos - 1] == RESPONSE
        assert (labels[r, len(e) :] == -100).all()  # padding
    # our shifted token-sum / count is HF's own causal-LM loss
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        s, count = masked_lm_loss(logits, labels)
        hf = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    assert count == int((labels[:, 1:] != -100).sum())
    assert float(s) / count == pytest.approx(float(hf), rel=1e-5)
    # the Trainer collator builds the very same labels
    fed = collate_for_lm(tok.pad_token_id)(lm_features(enc))
    assert torch.equal(fed["labels"], labels) and torch.equal(fed["input_ids"], batch.input_ids)
    assert torch.equal(fed["attention_mask"].bool(), batch.attention_mask.bool())


@pytest.mark.parametrize("packing", [False, True])
def test_trainer_loss_is_the_hand_computed_response_loss(tiny_model_dir, tmp_path, packing):
    """One optimizer step over all 6 records (3 x 2 accumulation): Trainer's logged loss is the
    token-mean cross-entropy on exactly the Formatter's loss-mask tokens (LoRA B = 0 at step 1,
    so the model is the base model), split over micro-batches or packed into one row."""
    model, tok = fresh(tiny_model_dir)
    hand = eval_loss(model, tok, RECORDS, max_length=128)
    result = train_lora(
        model, tok, RECORDS, small(epochs=1, batch_size=3, grad_accum=2, packing=packing), tmp_path, progress=False
    )
    assert result.steps == 1
    assert result.losses[0] == pytest.approx(hand, rel=1e-5)


# ---------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    model, tok = fresh(tiny_model_dir)
    records = RECORDS + [rec(99, "A question with no answer", None)]
    before = eval_loss(model, tok, RECORDS, max_length=128)
    out = tmp_path_factory.mktemp("lora-run")
    # a random-init model's logits are tiny (tied 0.02-std head), so adapt the MLPs too to move them fast
    args = small(epochs=8, keep_checkpoints=3, target_modules=ALL_LINEAR)
    result = train_lora(model, tok, records, args, out, progress=False)
    after = eval_loss(model, tok, RECORDS, max_length=128)
    return model, tok, result, out, before, after, args


def test_training_lowers_the_loss_and_skips_targetless_records(trained):
    _, _, result, _, before, after, _ = trained
    assert after < before - 0.2, (before, after)
    assert sum(result.losses[-2:]) < sum(result.losses[:2]) - 0.4
    assert result.skipped == 1
    assert len(result.losses) == result.steps == 8 * 2  # 6 records / (2 x 2) -> 2 steps per epoch
    assert all(math.isfinite(x) and x > 0 for x in result.losses)
    assert result.tokens > 0


def test_adapter_loads_and_changes_outputs(trained, tiny_model_dir):
    from peft import PeftModel

    from coreselect.models.loading import load_model

    _, tok, result, out, _, _, _ = trained
    assert result.adapter_dir == out / "adapter"
    ids = torch.tensor([tok("What is 7 plus 5? 7 + 5 = 12.")["input_ids"]])
    base, _ = fresh(tiny_model_dir)
    with torch.no_grad():
        y_base = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
        y_peft = peft_model(input_ids=ids).logits
        merged, _ = load_model(str(tiny_model_dir), adapter=str(result.adapter_dir), device="cpu", dtype="float32")
        y_merged = merged(input_ids=ids).logits
    assert (y_peft - y_base).abs().max() > 1e-3
    assert torch.allclose(y_peft, y_merged, atol=1e-4)
    state = json.loads((out / "train_state.json").read_text())
    assert state["steps"] == result.steps and state["losses"] == result.losses and state["tokens_per_s"] > 0
    assert result.plot == out / "loss.png" and result.plot.read_bytes()[:4] == b"\x89PNG"
    assert set(json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]) == set(ALL_LINEAR)


def test_only_lora_weights_change(trained, tiny_model_dir):
    model, _, _, _, _, _, _ = trained
    base, _ = fresh(tiny_model_dir)
    ref = dict(base.named_parameters())
    seen = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        assert not p.requires_grad
        key = name.replace(".base_layer", "")
        assert torch.equal(p, ref[key]), name
        seen += 1
    assert seen == len(ref)


def test_checkpoints_keep_lr_and_count(trained):
    _, _, result, out, _, _, _ = trained
    state = json.loads((out / "train_state.json").read_text())
    lrs = state["lrs"]
    assert [c.step for c in result.checkpoints] == [12, 14, 16]  # epoch ends, newest 3 kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-14", "checkpoint-16"]
    prev = 10
    for c in result.checkpoints:
        assert c.epoch == c.step / 2
        assert c.lr == pytest.approx(sum(lrs[prev : c.step]) / (c.step - prev))
        assert (c.path / "adapter_config.json").is_file() and (c.path / "optimizer.safetensors").is_file()
        assert not list(c.path.glob("*.pt")) and not list(c.path.glob("*.bin"))  # no pickle anywhere
        assert not list(c.path.glob("*.pth")) and (c.path / "coreselect.json").is_file()
        prev = c.step
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-2)  # warmup ceil(0.1 * 16) = 2 steps, then linear
    assert lrs[-1] < lrs[2]
    last, final = adapter_tensors(result.checkpoints[-1].path), adapter_tensors(result.adapter_dir)
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)


def test_save_every_steps_and_max_steps(tiny_model_dir, tmp_path):
    model, tok = fresh(tiny_model_dir)
    result = train_lora(model, tok, RECORDS, small(save_every=3, max_steps=5, epochs=10), tmp_path, progress=False)
    assert result.steps == 5
    assert [c.step for c in result.checkpoints] == [3, 5]  # every 3 steps + the final one
    assert result.checkpoints[1].lr == pytest.approx(
        sum(json.loads((tmp_path / "train_state.json").read_text())["lrs"][3:5]) / 2
    )
    with pytest.raises(ConfigError, match="resume"):  # never silently mixes with an old run
        train_lora(fresh(tiny_model_dir)[0], tok, RECORDS, small(save_every=3, max_steps=5), tmp_path, progress=False)


# ---------------------------------------------------------------------------- resume
def test_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    args = small(epochs=3, save_every=2, lora_dropout=0.1)  # dropout: the RNG state must be restored too
    full, tok = fresh(tiny_model_dir)
    ref = train_lora(full, tok, RECORDS, args, tmp_path / "full", progress=False)
    assert ref.steps == 6

    # simulate a kill right after checkpoint-2 (and while checkpoint-4 was being written)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "adapter")
    (cut / "train_state.json").unlink()
    for step in (4, 6):
        shutil.rmtree(cut / f"checkpoint-{step}")
    (cut / "checkpoint-4").mkdir()  # a half folder with no manifest is not a checkpoint
    (cut / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"junk")

    with pytest.raises(ConfigError, match="differ"):
        train_lora(
            fresh(tiny_model_dir)[0],
            tok,
            RECORDS,
            small(epochs=3, save_every=2, lora_dropout=0.1, lr=1e-3),
            cut,
            progress=False,
            resume=True,
        )
    resumed = train_lora(fresh(tiny_model_dir)[0], tok, RECORDS, args, cut, progress=False, resume=True)
    assert resumed.steps == 6
    assert resumed.losses == pytest.approx(ref.losses, abs=1e-6)
    assert [c.step for c in resumed.checkpoints] == [c.step for c in ref.checkpoints] == [2, 4, 6]
    assert [c.lr for c in resumed.checkpoints] == pytest.approx([c.lr for c in ref.checkpoints])
    a, b = adapter_tensors(ref.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert json.loads((cut / "train_state.json").read_text())["resumed_from"] == 2


def test_resume_loads_only_what_this_run_wrote(tiny_model_dir, tmp_path):
    """A checkpoint is loaded only when its manifest names this run and every file hash matches:
    a changed byte, an extra file (a planted optimizer.pt / rng_state.pth pickle) or another
    run's checkpoint is refused before anything is read."""
    args = small(epochs=1, save_every=1, max_steps=1)
    tok = fresh(tiny_model_dir)[1]
    train_lora(fresh(tiny_model_dir)[0], tok, RECORDS, args, tmp_path / "a", progress=False)
    train_lora(fresh(tiny_model_dir)[0], tok, RECORDS, args, tmp_path / "b", progress=False)
    ck = tmp_path / "a" / "checkpoint-1"

    def refused(match: str, folder=tmp_path / "a") -> None:
        with pytest.raises(ConfigError, match=match):
            train_lora(fresh(tiny_model_dir)[0], tok, RECORDS, args, folder, progress=False, resume=True)

    (ck / "optimizer.pt").write_bytes(b"not a pickle this run wrote")
    refused("extra")
    (ck / "optimizer.pt").unlink()
    data = bytearray((ck / "optimizer.safetensors").read_bytes())
    data[-1] ^= 1
    (ck / "optimizer.safetensors").write_bytes(bytes(data))
    refused("changed")
    shutil.rmtree(ck)
    shutil.copytree(tmp_path / "b" / "checkpoint-1", ck)  # same args and data, but another run's folder
    refused("another run")


# ---------------------------------------------------------------------------- small pieces
def test_warmup_subset_is_seeded_sorted_and_sized():
    a = warmup_subset(1000, 0.05, seed=3)
    assert a == warmup_subset(1000, 0.05, seed=3)
    assert a != warmup_subset(1000, 0.05, seed=4)
    assert len(a) == 50 and a == sorted(set(a)) and a[0] >= 0 and a[-1] < 1000
    assert len(warmup_subset(7)) == 1 and len(warmup_subset(1, 0.01)) == 1
    assert warmup_subset(10, 1.0) == list(range(10))
    for bad in [(0, 0.05), (10, 0.0), (10, 1.5)]:
        with pytest.raises(ConfigError):
            warmup_subset(*bad)


def test_defaults_are_table_7():
    a = TrainArgs()
    assert (a.lora_r, a.lora_alpha, a.lora_dropout) == (128, 512, 0.1)
    assert a.target_modules is None  # = attention_projections(model): q/k/v/o_proj on Llama
    assert (a.lr, a.warmup_ratio, a.schedule, a.weight_decay) == (2e-5, 0.03, "linear", 0.0)
    assert (a.epochs, a.batch_size, a.grad_accum, a.max_length, a.keep_checkpoints) == (4, 2, 32, 2048, 15)
    assert (a.precision, a.packing, a.report_to) == ("auto", False, "none")
    assert TrainArgs(target_modules=["q_proj"]).target_modules == ("q_proj",)
    assert TrainArgs(target_modules="q_proj,v_proj").target_modules == ("q_proj", "v_proj")


def test_default_targets_are_the_attention_projections(tiny_model_dir, tmp_path):
    model, tok = fresh(tiny_model_dir)
    train_lora(model, tok, RECORDS, small(epochs=1, batch_size=6, grad_accum=1, plot=False), tmp_path, progress=False)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not (tmp_path / "loss.png").exists()


def test_report_to_an_integration_that_is_not_installed_is_a_config_error(tiny_model_dir, tmp_path):
    from transformers.integrations import get_available_reporting_integrations

    if "tensorboard" in get_available_reporting_integrations():
        pytest.skip("tensorboard is installed")
    model, tok = fresh(tiny_model_dir)
    with pytest.raises(ConfigError, match="tensorboard: not installed"):
        train_lora(model, tok, RECORDS, small(report_to="tensorboard"), tmp_path, progress=False)


@pytest.mark.parametrize(
    "kw",
    [
        {"lora_r": 0},
        {"lora_alpha": 0},
        {"lora_dropout": 1.0},
        {"lora_dropout": -0.1},
        {"lr": 0},
        {"lr": float("nan")},
        {"warmup_ratio": 1.0},
        {"schedule": "step"},
        {"weight_decay": -1},
        {"epochs": 0},
        {"batch_size": 0},
        {"grad_accum": 1.5},
        {"max_length": 1},
        {"seed": -1},
        {"save_every": "step"},
        {"save_every": 0},
        {"keep_checkpoints": 0},
        {"max_steps": 0},
        {"target_modules": ()},
        {"batch_size": True},
        {"max_grad_norm": 0},
        {"precision": "fp8"},
        {"report_to": ""},
    ],
)
def test_bad_args_raise(kw):
    with pytest.raises(ConfigError):
        TrainArgs(**kw)
