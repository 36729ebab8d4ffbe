"""coreselect.models.introspect: the family table, the unknown-architecture error, head index maps."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as T

from coreselect.errors import ConfigError
from coreselect.models.introspect import (
    ATTENTION_SPECS,
    AttentionSpec,
    HeadGeometry,
    attention_module,
    attention_projections,
    decoder_layers,
    eager_attention,
    head_index_map,
    projection,
    projection_weight,
)

SMALL = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny(model_type: str, **kw):
    """A tiny random-init causal LM of ``model_type`` (``AutoConfig.for_model`` + small sizes)."""
    torch.manual_seed(0)
    if model_type == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        )
    elif model_type == "falcon":
        cfg = T.FalconConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            bos_token_id=1,
            eos_token_id=2,
            **kw,
        )
    else:
        cfg = T.AutoConfig.for_model(model_type, **{**SMALL, **kw})
    return T.AutoModelForCausalLM.from_config(cfg).eval()


# Per family: the LoRA target modules (a gated MoE router or an MLP layer must never be in them).
EXPECTED = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "olmo2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "gpt_neox": ["query_key_value", "dense"],
    "falcon": ["query_key_value", "dense"],
    "gpt2": ["c_attn", "attn.c_proj"],  # the MLP has a c_proj too: qualified
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_attention_projections_per_family(model_type):
    model = tiny(model_type)
    names = attention_projections(model)
    assert names == EXPECTED[model_type]
    # every name is a projection of every layer's attention module, and nothing outside attention matches it
    attn = {id(m) for layer in decoder_layers(model) for m in attention_module(layer).modules()}
    matched = [n for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in names)]
    assert len(matched) == len(names) * model.config.num_hidden_layers
    assert all(id(model.get_submodule(n)) in attn for n in matched)


def test_every_table_entry_names_real_modules():
    """Each table family not covered above still resolves on a tiny model of its type."""
    for model_type in sorted(set(ATTENTION_SPECS) - set(EXPECTED) - {"gemma3"}):  # gemma3: multimodal wrapper
        model = tiny(model_type)
        assert attention_projections(model), model_type
        HeadGeometry.of(model)


def test_unknown_architecture_is_refused_with_the_module_list():
    model = tiny("llama")
    model.config.model_type = "my_new_arch"
    with pytest.raises(ConfigError) as e:
        attention_projections(model)
    msg = str(e.value)
    assert "my_new_arch" in msg and "q_proj, k_proj, v_proj, o_proj" in msg and "--lora-target-modules" in msg
    with pytest.raises(ConfigError, match="my_new_arch"):
        HeadGeometry.of(model)


def test_phi3_and_neox_default_llama_targets_fail_but_the_table_adapts_everything():
    """The bugs of issue 11 §4, reproduced with peft: Phi-3 silently adapts only o_proj, GPT-NeoX raises."""
    from peft import LoraConfig, get_peft_model

    llama_names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    phi3 = get_peft_model(tiny("phi3"), LoraConfig(r=2, target_modules=llama_names))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in phi3.named_parameters() if "lora_A" in n}
    assert adapted == {"o_proj"}  # the silent failure
    with pytest.raises(ValueError, match="not found"):
        get_peft_model(tiny("gpt_neox"), LoraConfig(r=2, target_modules=llama_names))
    for model_type in ("phi3", "gpt_neox"):
        model = tiny(model_type)
        names = attention_projections(model)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=names))
        adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
        assert adapted == set(names)
        # the table still reads through peft's wrappers
        assert attention_projections(peft_model) == names
        assert isinstance(projection(peft_model, 0, names[0]), torch.nn.Linear)


def test_decoder_layers_and_eager_switch():
    model = tiny("llama")
    model.set_attn_implementation("sdpa")
    assert decoder_layers(model) is decoder_layers(model.model) is model.model.layers
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------ head geometry
def test_head_dim_comes_from_the_config_when_set():
    g = HeadGeometry.of(tiny("qwen3", num_key_value_heads=2, head_dim=16))  # hidden 32 / 4 heads = 8
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim) == (2, 4, 2, 16)
    assert HeadGeometry.of(tiny("llama", num_key_value_heads=2)).head_dim == 8


def test_gqa_kv_rows_follow_any_selected_query_head():
    g = HeadGeometry(1, 4, 2, 3)  # heads 0,1 read KV 0; heads 2,3 read KV 1
    m = head_index_map([(0, 1)], g)[0]
    assert m["q_proj"].tolist() == [3, 4, 5] and m["o_proj"].tolist() == [3, 4, 5]
    assert m["k_proj"].tolist() == m["v_proj"].tolist() == [0, 1, 2]
    m = head_index_map([(0, 0), (0, 3)], g)[0]
    assert m["k_proj"].tolist() == [0, 1, 2, 3, 4, 5]


def _split_like_transformers(layout: str, fused: torch.Tensor, H: int, K: int, d: int):
    """q ``[H, d]``, k/v ``[K, d]`` of a fused-QKV output vector, as the modeling code splits it."""
    x = fused[None, None]  # [B=1, T=1, out]
    if layout == "concat":  # Phi3Attention.forward
        q, k, v = x[..., : H * d], x[..., H * d : H * d + K * d], x[..., H * d + K * d :]
        return q.view(H, d), k.view(K, d), v.view(K, d)
    if layout == "per_head":  # GPTNeoXAttention.forward: view(..., -1, 3 * d).transpose(1, 2).chunk(3, -1)
        q, k, v = x.view(1, 1, -1, 3 * d).transpose(1, 2).chunk(3, dim=-1)
        return q.reshape(H, d), k.reshape(K, d), v.reshape(K, d)
    raise AssertionError(layout)


@pytest.mark.parametrize("layout,H,K", [("concat", 4, 2), ("concat", 4, 1), ("concat", 6, 6), ("per_head", 4, 4)])
def test_fused_index_maps_match_the_modeling_code(layout, H, K):
    d = 3
    g = HeadGeometry(1, H, K, d, AttentionSpec(fused="qkv", layout=layout))  # type: ignore[arg-type]
    fused = torch.arange(H * d + 2 * K * d)
    q, k, v = _split_like_transformers(layout, fused, H, K, d)
    for h in range(H):
        assert list(g.rows("q", h)) == q[h].tolist()
        assert head_index_map([(0, h)], g)[0]["qkv"].tolist() == sorted(
            q[h].tolist() + k[g.kv_head(h)].tolist() + v[g.kv_head(h)].tolist()
        )
    for kv in range(K):
        assert list(g.rows("k", kv)) == k[kv].tolist() and list(g.rows("v", kv)) == v[kv].tolist()


@pytest.mark.parametrize(
    "variant", [{"new_decoder_architecture": True, "num_kv_heads": 2}, {"multi_query": True}, {"multi_query": False}]
)
def test_falcon_layouts_match_its_split_heads(variant):
    """Falcon has three layouts; its own ``_split_heads`` is the reference."""
    model = tiny("falcon", **variant)
    g = HeadGeometry.of(model)
    attn = attention_module(decoder_layers(model)[0])
    out = projection_weight(attn.query_key_value).shape[0]
    q, k, v = attn._split_heads(torch.arange(out, dtype=torch.float32)[None, None])
    q, k, v = (t.reshape(-1, g.head_dim).long() for t in (q, k, v))  # [H or K (broadcast to H), d]
    for h in range(g.n_heads):
        assert list(g.rows("q", h)) == q[h].tolist()
        kv_row = g.kv_head(h) if k.shape[0] == g.n_kv_heads else h  # new arch broadcasts k/v to H
        assert list(g.rows("k", g.kv_head(h))) == k[kv_row].tolist()
        assert list(g.rows("v", g.kv_head(h))) == v[kv_row].tolist()


def test_gpt2_conv1d_weight_is_seen_as_out_by_in():
    model = tiny("gpt2")
    c_attn = projection(model, 0, "c_attn")
    assert tuple(projection_weight(c_attn).shape) == (3 * 32, 32)
    g = HeadGeometry.of(model)
    assert (g.spec.layout, g.n_kv_heads, g.spec.output) == ("concat", 4, "c_proj")


def test_less_warns_about_an_adapter_that_misses_attention_projections(tmp_path, caplog):
    """An old Phi-3 warmup adapter (o_proj only) is flagged when LESS loads it."""
    from peft import LoraConfig, get_peft_model

    from coreselect.methods.baselines.gradients import AdapterSwitcher

    peft_model = get_peft_model(tiny("phi3"), LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    peft_model.save_pretrained(tmp_path / "ckpt")
    switcher = AdapterSwitcher(tiny("phi3"))
    with caplog.at_level(logging.WARNING):
        switcher.activate(tmp_path / "ckpt")
    assert switcher.modules == ["o_proj"]
    assert "qkv_proj" in caplog.text
