"""Every architecture, not only Llama (issue 11 §4): the methods on tiny random-init models of each family.

One tiny config per family (hidden 32, 2 layers, 4 query heads; GQA with 2 KV heads where the
family has it; ``head_dim = 16 != 32 / 4`` on Qwen3 and Gemma 2/3), the shared trained-in-test
BPE tokenizer of ``tests/conftest.py``. On each: TRIM's padding / batching invariance, the
warmup LoRA, P2D's heads (layout checked against the real modeling code, heads-only training),
LESS's gradients; and sliding windows shorter than the records on the families that have them.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as T

from coreselect.data.formatting import Formatter
from coreselect.data.readers import read_records
from coreselect.methods.trim import TrimConfig, TrimMethod
from coreselect.models.introspect import (
    HeadGeometry,
    attention_module,
    attention_projections,
    decoder_layers,
    eager_attention,
    head_index_map,
    projection,
    projection_weight,
)
from coreselect.models.runner import ModelRunner, collate

GQA = {"num_key_value_heads": 2}
# family -> (config class, model class, family-specific config kwargs)
FAMILIES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, GQA),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, GQA),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, GQA),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {**GQA, "head_dim": 16}),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {**GQA, "head_dim": 16}),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {**GQA, "head_dim": 16}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, GQA),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, GQA),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {}),
}
# A window of 4 tokens, shorter than every record (Qwen2 needs the flag and the layer count).
WINDOW = 4
SLIDING: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"sliding_window": WINDOW, "use_sliding_window": True, "max_window_layers": 0},
    "gemma2": {"sliding_window": WINDOW},
    "gemma3": {"sliding_window": WINDOW},
}
MATH = [
    ("What is 7 plus 5?", "7 + 5 = 12. The answer is 12."),
    ("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7. He has 7 apples."),
    ("What is 48 divided by 2?", "48 / 2 = 24. The answer is 24."),
]
OTHER = [
    ("Write a poem about the sea.", "The sea is wide, the sea is deep."),
    ("How do I bake bread?", "Mix flour, water and yeast, knead, let it rise, bake."),
    ("Translate good morning to French.", "Bonjour."),
]
TARGET = [
    ("What is 12 plus 30?", "10 + 30 = 40, plus 2 is 42. The answer is 42."),
    ("Natalia sold 48 clips and half as many later. Total?", "48 / 2 = 24. 48 + 24 = 72."),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from conftest import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import chat, write_jsonl

    d = tmp_path_factory.mktemp("data")
    pool = write_jsonl(d / "pool.jsonl", [chat(i, u, a) for i, (u, a) in enumerate(MATH + OTHER)])
    target = write_jsonl(d / "target.jsonl", [chat(100 + i, u, a) for i, (u, a) in enumerate(TARGET)])
    return list(read_records([pool])), list(read_records([target]))


@pytest.fixture(scope="module")
def build(tok):
    """``build(family, **config_overrides)``: a fresh fp32 model, the same weights every call (seed 0)."""

    @functools.cache
    def cached(family: str, overrides: tuple) -> Any:
        cfg_cls, model_cls, extra = FAMILIES[family]
        cfg = cfg_cls(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **extra,
            **dict(overrides),
        )
        torch.manual_seed(0)
        return model_cls(cfg).eval()

    return lambda family, **over: copy.deepcopy(cached(family, tuple(sorted(over.items()))))


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


class LeftPaddedRunner(ModelRunner):
    """A runner whose batches are padded on the left (TRIM pads on the right)."""

    def collate(self, encoded, positions, padding_side: str = "left"):  # type: ignore[override]
        return super().collate(encoded, positions, "left")


def trim_scores(model, tok, data, *, side: str = "right", batch_tokens: int = 100_000) -> np.ndarray:
    pool, target = data
    runner = (LeftPaddedRunner if side == "left" else ModelRunner)(model, tok)
    cfg = TrimConfig(layers=2, batch_tokens=batch_tokens)
    return TrimMethod(runner, Formatter(tok, 128), cfg, progress=False).fit(target).score(pool)


# ------------------------------------------------------------------------------ TRIM
@pytest.mark.parametrize("family", FAMILIES)
def test_trim_scores_invariant_to_padding_side_and_batch_budget(family, build, tok, data):
    model = build(family)
    ref = trim_scores(model, tok, data)
    assert np.isfinite(ref).all() and np.ptp(ref) > 0
    for kw in ({"side": "left"}, {"batch_tokens": 60}, {"side": "left", "batch_tokens": 60}):
        np.testing.assert_allclose(trim_scores(model, tok, data, **kw), ref, atol=1e-5, rtol=0, err_msg=str(kw))


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_shorter_than_records_batched_equals_unbatched(family, build, tok, data):
    model = build(family, **SLIDING[family])
    fmt = Formatter(tok, 128)
    enc = [fmt.encode(r) for r in data[0]]
    assert min(len(e) for e in enc) > 2 * WINDOW
    # the window is in effect: the last layer's eager attention puts no mass outside it
    batch = collate(enc, [0], tok.pad_token_id)
    with eager_attention(model), torch.no_grad():
        att = model(input_ids=batch.input_ids, output_attentions=True).attentions
    i, j = torch.tril_indices(att[0].shape[-1], att[0].shape[-1], offset=-WINDOW)
    assert any(float(a[..., i, j].abs().max()) == 0.0 for a in att)
    unbatched = trim_scores(model, tok, data, batch_tokens=1)  # one record per forward pass
    for side in ("right", "left"):
        np.testing.assert_allclose(trim_scores(model, tok, data, side=side), unbatched, atol=1e-5, rtol=0, err_msg=side)


# ------------------------------------------------------------------------------ warmup LoRA
@pytest.mark.parametrize("family", FAMILIES)
def test_warmup_lora_adapts_every_attention_projection_and_trains(family, build, tok, data):
    from peft import LoraConfig, get_peft_model

    model = build(family)
    names = attention_projections(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=names))
    for layer in decoder_layers(peft_model):
        attn = attention_module(layer)
        for name in names:
            assert hasattr(attn.get_submodule(name.rsplit(".", 1)[-1]), "lora_A"), (family, name)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    fmt = Formatter(tok, 128)
    enc = [fmt.encode(r) for r in data[0]]
    batch = collate(enc, list(range(len(enc))), tok.pad_token_id)
    labels = torch.where(batch.loss_mask, batch.input_ids, torch.full_like(batch.input_ids, -100))
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    peft_model.train()
    for step in range(4):
        loss = peft_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            labels=labels,
        ).loss
        loss.backward()
        if step == 0:  # lora_B starts at 0, so its gradient is the first to move
            assert all(float(p.grad.abs().max()) > 0 for n, p in trainable.items() if "lora_B" in n), family
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], (family, losses)


# ------------------------------------------------------------------------------ P2D
def _contexts(model, batch, layer: int, geom: HeadGeometry) -> torch.Tensor:
    """``[T, H, d]`` head outputs (the output projection's input) of ``layer`` for a 1-record batch."""
    out: list[torch.Tensor] = []
    h = projection(model, layer, geom.spec.output).register_forward_pre_hook(
        lambda _m, args: out.append(args[0][0].reshape(-1, geom.n_heads, geom.head_dim).clone())
    )
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, position_ids=batch.position_ids)
    finally:
        h.remove()
    return out[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_head_rows_drive_exactly_their_heads_in_the_real_model(family, build, tok, data):
    """The layout of :class:`HeadGeometry` against the modeling code: permuting the rows it assigns to
    query head ``h`` changes head ``h``'s output only; KV head ``g``'s rows, the outputs of ``g``'s
    query heads only (a permutation keeps OLMo2's whole-projection q/k norms unchanged)."""
    model = build(family)
    geom = HeadGeometry.of(model)
    layer = geom.n_layers - 1
    batch = collate([Formatter(tok, 128).encode(data[0][0])], [0], tok.pad_token_id)
    base = _contexts(model, batch, layer, geom)
    s = geom.spec
    cases = [
        ("q", 2, {2}),
        ("q", 1, {1}),
        ("k", 0, {h for h in range(geom.n_heads) if geom.kv_head(h) == 0}),
        ("v", geom.n_kv_heads - 1, {h for h in range(geom.n_heads) if geom.kv_head(h) == geom.n_kv_heads - 1}),
    ]
    for part, head, expect in cases:
        W = projection_weight(projection(model, layer, s.fused or {"q": s.query, "k": s.key, "v": s.value}[part]))
        rows = torch.tensor(list(geom.rows(part, head)))
        saved = W[rows].clone()
        with torch.no_grad():
            W[rows] = saved.flip(0)
        try:
            new = _contexts(model, batch, layer, geom)
        finally:
            with torch.no_grad():
                W[rows] = saved
        changed = {h for h in range(geom.n_heads) if not torch.allclose(new[:, h], base[:, h], atol=1e-6, rtol=0)}
        assert changed == expect, (family, part, head)


@pytest.mark.parametrize("family", FAMILIES)
def test_p2d_locates_heads_and_trains_only_them(family, build, tok, data, tmp_path):
    from coreselect.methods.p2d import localize_heads
    from coreselect.methods.p2d.train import train_heads
    from coreselect.train.lora import TrainArgs

    model = build(family)
    geom = HeadGeometry.of(model)
    hs = localize_heads(ModelRunner(model, tok), Formatter(tok, 128), data[1], fraction=0.25)
    scores = np.asarray(hs.scores)
    assert scores.shape == (geom.n_layers, geom.n_heads) and np.isfinite(scores).all() and scores.max() > 0
    assert len(hs.heads) == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainArgs(
        lr=5e-2,
        warmup_ratio=0.0,
        schedule="constant",
        epochs=1,
        batch_size=2,
        grad_accum=1,
        max_length=128,
        max_steps=2,
        max_grad_norm=None,
    )
    train_heads(model, tok, data[0], hs, args, tmp_path, progress=False)
    # which entries of which parameter the heads own
    owned: dict[int, torch.Tensor] = {}
    for layer, by_name in head_index_map(hs.heads, geom).items():
        for name, idx in by_name.items():
            mod = projection(model, layer, name)
            mask = torch.zeros_like(mod.weight, dtype=torch.bool)
            view = mask.T if type(mod).__name__ == "Conv1D" else mask
            if geom.is_output(name):
                view[:, idx] = True
            else:
                view[idx] = True
                if mod.bias is not None:
                    owned[id(mod.bias)] = torch.zeros_like(mod.bias, dtype=torch.bool).index_fill(0, idx, True)
            owned[id(mod.weight)] = mask
    moved = 0
    for n, p in model.named_parameters():
        mask = owned.get(id(p), torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p.detach()[~mask], before[n][~mask]), (family, n)  # bit-identical outside H_T
        moved += int((p.detach()[mask] != before[n][mask]).sum())
    assert moved > 0


# ------------------------------------------------------------------------------ LESS
@pytest.mark.parametrize("family", FAMILIES)
def test_less_extracts_gradients(family, build, tok, data, tmp_path):
    from peft import LoraConfig, get_peft_model

    from coreselect.methods.baselines.model_based import LESSMethod

    names = attention_projections(build(family))
    warm = get_peft_model(
        build(family), LoraConfig(r=2, lora_alpha=4, target_modules=names, init_lora_weights=False)
    )  # random B: nonzero A-gradients
    ckpt = Path(tmp_path) / "checkpoint-1"
    warm.save_pretrained(ckpt)
    less = LESSMethod(build(family), tok, Formatter(tok, 128), [ckpt], proj_dim=16, optimizer="sgd")
    scores = less.fit(data[1]).score(data[0])
    assert scores.shape == (len(data[0]),) and np.isfinite(scores).all() and np.ptp(scores) > 0
    assert less.feature_dim == 16
    assert set(less.settings()["lora_modules"]) == {n.rsplit(".", 1)[-1] for n in names}
    assert all(t.abs().sum(1).gt(0).all() for t in less.target_feats)
