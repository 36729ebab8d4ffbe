"""P2D sparse head adaptation on ``Trainer``: only the H_T slices move (bit-identical elsewhere),
GQA policy, the delta artifact, checkpoints and resume."""

from __future__ import annotations

import json

import pytest
import torch

from coreselect.data.readers import read_records
from coreselect.errors import CoreselectError
from coreselect.methods.p2d import HeadGeometry, HeadSet
from coreselect.methods.p2d.train import (
    HeadDelta,
    _merge,
    apply_head_delta,
    head_slices,
    train_heads,
    train_heads_from_file,
)
from coreselect.models.loading import load_model
from coreselect.train.lora import TrainArgs, eval_loss

HEADS = [(1, 0), (1, 1), (3, 2)]  # layer 1: both query heads of KV head 0; layer 3: query head 2 -> KV head 1


def test_gqa_slices_train_the_kv_head_of_any_selected_query_head():
    g = HeadGeometry(n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16)
    assert [g.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    sl = head_slices(HEADS, g)
    assert sorted(sl) == [1, 3]
    assert sl[1]["q_proj"].tolist() == list(range(32)) and sl[1]["o_proj"].tolist() == list(range(32))
    assert sl[1]["k_proj"].tolist() == list(range(16)) == sl[1]["v_proj"].tolist()  # shared KV head once
    assert sl[3]["q_proj"].tolist() == list(range(32, 48))
    assert sl[3]["k_proj"].tolist() == list(range(16, 32))
    mha = head_slices([(0, 3)], HeadGeometry(1, 4, 4, 16))  # no GQA: exactly the head's own rows
    assert mha[0]["k_proj"].tolist() == list(range(48, 64))


def _selected(name: str, hs: list[tuple[int, int]], d: int = 16) -> tuple[int, str, list[int]] | None:
    """(layer, axis, indices) of the trained slice of parameter ``name``, or None if untouched."""
    parts = name.split(".")
    if "self_attn" not in parts or not name.endswith("weight"):
        return None
    layer, proj = int(parts[parts.index("layers") + 1]), parts[-2]
    g = HeadGeometry(4, 4, 2, d)
    sl = head_slices(hs, g)
    if layer not in sl:
        return None
    return layer, ("col" if proj == "o_proj" else "row"), sl[layer][proj].tolist()


def _records(small_pool):
    return list(read_records([small_pool[0]]))


def test_sparse_training_moves_only_the_selected_slices_and_lowers_the_loss(tiny_model_dir, small_pool, tmp_path):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    records = _records(small_pool)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss0 = eval_loss(model, tok, records, max_length=256)
    args = TrainArgs(
        lr=5e-3,
        epochs=20,
        batch_size=4,
        grad_accum=1,
        max_steps=16,
        warmup_ratio=0.0,
        weight_decay=0.1,
        max_length=256,
        seed=0,
    )
    res = train_heads(model, tok, records, HEADS, args, tmp_path / "run", progress=False)
    loss1 = eval_loss(model, tok, records, max_length=256)
    assert loss1 < loss0 - 1e-3 and len(res.losses) == 16
    assert res.n_trainable == 2 * (32 * 64) + 2 * (16 * 64) + (16 * 64) * 2 + 2 * (16 * 64)  # q+o, k+v per layer
    after = model.state_dict()
    changed = 0
    for name, w0 in before.items():
        w1 = after[name]
        sel = _selected(name, HEADS)
        if sel is None:
            assert torch.equal(w0, w1), name
            continue
        _, axis, idx = sel
        keep = torch.ones(w0.shape[0] if axis == "row" else w0.shape[1], dtype=torch.bool)
        keep[idx] = False
        if axis == "row":
            assert torch.equal(w0[keep], w1[keep]), name
            assert not torch.equal(w0[idx], w1[idx]), name
        else:
            assert torch.equal(w0[:, keep], w1[:, keep]), name
            assert not torch.equal(w0[:, idx], w1[:, idx]), name
        changed += 1
    assert changed == 8  # q/k/v/o of layers 1 and 3

    # the artifact holds only those slices and rebuilds the trained model on a fresh base
    from safetensors.torch import load_file

    t = load_file(str(res.delta_path))
    assert {k.rsplit(".", 2)[0] for k in t} == {"layers.1", "layers.3"}
    assert sum(v.numel() for k, v in t.items() if k.endswith(".weight")) == res.n_trainable
    assert json.loads(res.heads_path.read_text())["heads"] == [list(h) for h in HEADS]
    fresh, _ = load_model(str(tiny_model_dir), device="cpu")
    apply_head_delta(fresh, res.delta_path)
    for name, w in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], w), name
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["mode"] == "heads" and state["kv_policy"] == "any" and len(state["losses"]) == 16
    # Trainer's outputs: the loss curve, and the base's requires_grad flags restored
    assert (tmp_path / "run" / "loss.png").is_file() and res.plot is not None
    assert all(p.requires_grad for p in model.parameters())
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_checkpoints_hold_only_the_deltas_and_resume_matches_one_run(tiny_model_dir, small_pool, tmp_path):
    """Per-epoch checkpoints carry the deltas and their AdamW state (no base weights, no pickle);
    stopping after epoch 1 and resuming gives the same deltas as one uninterrupted run."""
    from safetensors.torch import load_file

    records = _records(small_pool)  # 8 records, batch 4: 2 steps per epoch
    args = TrainArgs(
        lr=5e-3, epochs=2, batch_size=4, grad_accum=1, warmup_ratio=0.0, max_length=256, seed=0, max_grad_norm=None
    )
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    full = train_heads(model, tok, records, HEADS, args, tmp_path / "full", progress=False)
    assert [c.step for c in full.checkpoints] == [2, 4]
    ck = tmp_path / "full" / "checkpoint-2"
    weights = load_file(str(ck / "model.safetensors"))
    n_delta = sum(v.numel() for v in weights.values())
    assert n_delta == full.n_trainable and all(k.startswith("delta.") for k in weights)
    assert (ck / "optimizer.safetensors").is_file() and not list(ck.glob("*.bin")) and not list(ck.glob("*.pt*"))

    # an interrupted run: stop after epoch 1 (remove the later checkpoint), then resume
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    model2, _ = load_model(str(tiny_model_dir), device="cpu")
    resumed = train_heads(model2, tok, records, HEADS, args, tmp_path / "cut", progress=False, resume=True)
    assert resumed.steps == 4
    a, b = load_file(str(full.delta_path)), load_file(str(resumed.delta_path))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    # and a different head set is refused for that folder
    with pytest.raises(Exception, match="differ"):
        train_heads(model2, tok, records, [(0, 0)], args, tmp_path / "cut", progress=False, resume=True)


def test_delta_hooks_equal_the_merged_weights(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), device="cpu")
    delta = HeadDelta(model, HEADS)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_(0, 0.05)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad(), delta.attached(model):
        hooked = model(input_ids=ids).logits
    _merge(model, delta.tensors())
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-5)


def _tiny_fused(family: str):
    import transformers as T

    torch.manual_seed(0)
    small = {
        "vocab_size": 300,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if family == "phi3":  # [q | k | v] in qkv_proj, GQA
        return T.Phi3ForCausalLM(T.Phi3Config(**small, intermediate_size=64, num_key_value_heads=2)).eval()
    if family == "gpt_neox":  # [H, 3, d] in query_key_value, with biases
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**small, intermediate_size=64)).eval()
    if family == "gpt2":  # Conv1D (weights stored [in, out]), [q | k | v] in c_attn
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "gpt2"])
def test_fused_qkv_deltas_hooked_equal_merged_and_touch_only_the_heads(family):
    """Fused QKV and Conv1D: the hooked deltas and the merged weights give the same logits, and
    the merge writes only the rows / columns :func:`head_slices` assigns to the heads."""
    from coreselect.models.introspect import projection, projection_weight

    model = _tiny_fused(family)
    geom = HeadGeometry.of(model)
    heads = [(0, 1), (1, 2)]
    delta = HeadDelta(model, heads)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_(0, 0.05)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad(), delta.attached(model):
        hooked = model(input_ids=ids).logits
    _merge(model, delta.tensors())
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-5)
    owned: dict[int, torch.Tensor] = {}
    for layer, by_name in head_slices(heads, geom).items():
        for name, idx in by_name.items():
            mod = projection(model, layer, name)
            mask = torch.zeros_like(mod.weight, dtype=torch.bool)
            view = mask.T if type(mod).__name__ == "Conv1D" else mask
            if geom.is_output(name):
                view[:, idx] = True
            else:
                view[idx] = True
                assert projection_weight(mod).shape[0] > len(idx)  # a strict subset of the fused rows
                if mod.bias is not None:
                    owned[id(mod.bias)] = torch.zeros_like(mod.bias, dtype=torch.bool).index_fill(0, idx, True)
            owned[id(mod.weight)] = mask
    for n, p in model.named_parameters():
        mask = owned.get(id(p), torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p.detach()[~mask], before[n][~mask]), n
        if id(p) in owned and p.dim() == 2:
            assert (p.detach()[mask] != before[n][mask]).float().mean() > 0.9, n


def test_train_hook_reads_heads_json_and_apply_rejects_other_models(tiny_model_dir, small_pool, tmp_path):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    hs = HeadSet("tiny", "gradient", 0.1, [(0, 3)], n_layers=4, n_heads=4)
    hs.save(tmp_path / "heads.json")
    res = train_heads_from_file(
        model,
        tok,
        _records(small_pool),
        tmp_path / "heads.json",
        TrainArgs(lr=1e-3, max_steps=1, batch_size=2, grad_accum=1, max_length=256),
        tmp_path / "run",
        progress=False,
    )
    assert res.steps == 1 and res.delta_path.exists()
    bad = HeadSet("tiny", "gradient", 0.1, [(5, 0)], n_layers=6, n_heads=4)
    with pytest.raises(CoreselectError):
        train_heads(model, tok, _records(small_pool), bad, TrainArgs(max_steps=1), tmp_path / "bad", progress=False)


def test_cli_train_heads(tiny_model_dir, small_pool, tmp_path):
    from coreselect.__main__ import main
    from coreselect.train.command import is_trained

    HeadSet("tiny", "gradient", 0.1, [(2, 1)], n_layers=4, n_heads=4).save(tmp_path / "heads.json")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(small_pool[0]),
                "--out",
                str(out),
                "--heads",
                str(tmp_path / "heads.json"),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--grad-accum",
                "1",
                "--lr",
                "1e-3",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    info = json.loads((out / "run.json").read_text())
    assert info["mode"] == "heads" and info["steps"] == 2 and info["counts"]["trained"] == 8
    assert (out / "heads_delta.safetensors").exists() and is_trained(out)


def test_two_gloo_processes_train_the_one_process_heads(tiny_model_dir, small_pool, tmp_path):
    """``accelerate launch -m coreselect train --heads`` on 2 CPU processes: DDP syncs the deltas
    (the only parameters of the module Trainer trains), giving the 1-process deltas."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    def _run(cmd: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    HeadSet("tiny", "gradient", 0.1, HEADS, n_layers=4, n_heads=4).save(tmp_path / "heads.json")
    common = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(small_pool[0]),
        "--heads",
        str(tmp_path / "heads.json"),
        "--epochs",
        "2",
        "--max-length",
        "128",
        "--lr",
        "1e-2",
        "--warmup-ratio",
        "0",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--no-progress",
        "--no-plot",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "coreselect", *common, "--out", str(one), "--batch-size", "2", "--grad-accum", "2"])
    _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            "-m",
            "coreselect",
            *common,
            "--out",
            str(two),
            "--batch-size",
            "1",
            "--grad-accum",
            "2",
        ]
    )
    s1, s2 = (json.loads((d / "train_state.json").read_text()) for d in (one, two))
    assert s1["processes"] == 1 and s2["processes"] == 2 and s1["mode"] == s2["mode"] == "heads"
    assert s2["losses"] == pytest.approx(s1["losses"], rel=1e-4)
    a, b = load_file(str(one / "heads_delta.safetensors")), load_file(str(two / "heads_delta.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-3)


def test_gradient_checkpointing_gives_the_same_deltas(tiny_model_dir, small_pool, tmp_path):
    """The delta hooks stay attached for the whole run, so recomputed forwards include them."""
    from safetensors.torch import load_file

    out = {}
    for gc in (False, True):
        model, tok = load_model(str(tiny_model_dir), device="cpu")
        args = TrainArgs(
            lr=5e-3,
            batch_size=4,
            grad_accum=1,
            max_steps=2,
            warmup_ratio=0.0,
            max_length=128,
            gradient_checkpointing=gc,
            plot=False,
        )
        res = train_heads(model, tok, _records(small_pool), HEADS, args, tmp_path / str(gc), progress=False)
        out[gc] = load_file(str(res.delta_path))
    assert any(v.abs().sum() > 0 for k, v in out[True].items() if k.endswith(".weight"))
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-4, atol=1e-7)
