"""Model introspection: where a Hugging Face causal LM keeps its layers, attention and heads.

Every method that reaches inside a model (TRIM's attention maps, P2D's head gates and head
slices, the warmup LoRA's target modules, LESS's gradients) asks this module, so that one
table says how each architecture is built:

* :func:`decoder_layers` / :func:`attention_module`: the decoder's ``ModuleList`` and the
  attention module of one layer (``self_attn``, ``attention``, ``attn`` ...).
* :func:`eager_attention`: a context manager that switches the model to eager attention
  (the only kernel that returns probability maps) and back.
* :data:`ATTENTION_SPECS` / :func:`attention_spec`: per ``config.model_type``, the names of
  the attention projections and, for a fused QKV projection, its layout. Unknown types are
  refused with a :class:`~coreselect.errors.ConfigError` that lists the attention module's
  linear submodules, rather than guessed: a wrong guess trains or slices the wrong weights
  silently (peft needs only *one* target name to match, so ``q/k/v/o_proj`` on Phi-3 adapts
  ``o_proj`` alone and raises nothing).
* :func:`attention_projections`: the module names LoRA should target (``list[str]``).
* :class:`HeadGeometry` and :func:`head_index_map`: heads per layer, KV heads (GQA),
  ``head_dim`` (read from ``config.head_dim`` when present: Gemma and Qwen3 have
  ``head_dim != hidden_size / n_heads``), and which rows / columns of each projection
  weight belong to a set of heads.

**Index convention.** Every weight is seen as ``[out_features, in_features]`` (the
``torch.nn.Linear`` layout; GPT-2's ``Conv1D`` stores the transpose, see
:func:`projection_weight`). A query/key/value projection (separate or fused) is indexed by
*output rows*; the output projection (``o_proj`` / ``dense`` / ``c_proj``) by *input columns*,
since its input is the concatenation of the per-head context vectors ``[B, T, H * d]``
(head-major, ``head_dim`` contiguous) in every supported family.

**Fused QKV layouts** (checked against ``transformers`` 5.x modeling code; ``H`` query heads,
``K`` KV heads, ``d = head_dim``, ``r = H / K``):

* ``concat``: ``[q (H*d) | k (K*d) | v (K*d)]``. Phi-3 ``qkv_proj`` (sliced at
  ``H*d`` and ``H*d + K*d``), GPT-2 ``c_attn`` (``split(hidden)``), Falcon with
  ``multi_query`` (``K = 1``).
* ``per_head``: ``[H, 3, d]``, i.e. per head ``[q_h | k_h | v_h]`` (``K = H``). GPT-NeoX
  ``query_key_value`` (``view(..., H, 3*d)`` then ``chunk(3)``), BLOOM, Falcon without
  ``multi_query`` or the new decoder architecture.
* ``grouped``: ``[K, r + 2, d]``, per KV group its ``r`` query heads, then ``k_g``, then
  ``v_g``. Falcon with ``new_decoder_architecture``.

**GQA.** Query head ``h`` reads KV head ``h // r`` (HF's ``repeat_kv``). A KV head's rows
belong to a head set as soon as *any* of its query heads is in it (P2D trains a selected
head's keys and values even when they are shared; see :mod:`coreselect.methods.p2d.train`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from coreselect.errors import ConfigError

__all__ = [
    "ATTENTION_SPECS",
    "AttentionSpec",
    "HeadGeometry",
    "Layout",
    "attention_module",
    "attention_projections",
    "attention_spec",
    "decoder_layers",
    "eager_attention",
    "head_index_map",
    "projection",
    "projection_weight",
    "text_config",
    "unwrap",
]

Layout = Literal["separate", "concat", "per_head", "grouped"]
LAYOUTS: tuple[str, ...] = ("separate", "concat", "per_head", "grouped")


# ------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class AttentionSpec:
    """Attribute names of one family's attention projections, relative to its attention module.

    Attributes:
        output: the output projection (input = concatenated head outputs).
        query, key, value: the separate input projections (``layout="separate"``).
        fused: the fused QKV projection (any other layout), else ``None``.
        layout: how q/k/v sit in ``fused``'s output rows (module doc). ``falcon`` is resolved
            from the config by :meth:`HeadGeometry.of`.
    """

    output: str = "o_proj"
    query: str = "q_proj"
    key: str = "k_proj"
    value: str = "v_proj"
    fused: str | None = None
    layout: Layout | Literal["falcon"] = "separate"

    @property
    def inputs(self) -> tuple[str, ...]:
        """The projections indexed by output rows: ``(fused,)`` or ``(query, key, value)``."""
        return (self.fused,) if self.fused else (self.query, self.key, self.value)

    @property
    def names(self) -> tuple[str, ...]:
        """Every attention projection, inputs first, output last."""
        return (*self.inputs, self.output)


_QKVO = AttentionSpec()
ATTENTION_SPECS: dict[str, AttentionSpec] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "olmo",
            "olmo2",
            "starcoder2",
            "granite",
            "cohere",
            "stablelm",
            "smollm3",
            "exaone4",
        ),
        _QKVO,
    ),
    "phi": AttentionSpec(output="dense"),
    "gptj": AttentionSpec(output="out_proj"),
    "opt": AttentionSpec(output="out_proj"),
    "phi3": AttentionSpec(fused="qkv_proj", layout="concat"),
    "gpt2": AttentionSpec(output="c_proj", fused="c_attn", layout="concat"),
    "gpt_neox": AttentionSpec(output="dense", fused="query_key_value", layout="per_head"),
    "bloom": AttentionSpec(output="dense", fused="query_key_value", layout="per_head"),
    "falcon": AttentionSpec(output="dense", fused="query_key_value", layout="falcon"),
}
"""``config.model_type`` -> attention projection names (module doc). Extend it for a new family
only after reading its ``modeling_*.py``: the layout decides which weights a head owns."""


# ------------------------------------------------------------------------------ modules
def unwrap(model: Any) -> Any:
    """The ``transformers`` model under a peft wrapper (``PeftModel.get_base_model()``), else ``model``."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and hasattr(model, "peft_config") else model


def text_config(model: Any) -> Any:
    """The decoder's config (``config.get_text_config()`` for multimodal models, else ``config``)."""
    cfg = unwrap(model).config
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder layers of ``model`` (a ``*ForCausalLM``, its base model or a peft wrapper).

    Looks at ``get_decoder()`` first (the language model of a multimodal model, not its
    vision tower), then at the usual attribute names (``layers`` / ``h`` / ``blocks``), then
    for any ``ModuleList`` of ``num_hidden_layers`` modules.
    """
    m = unwrap(model)
    n = getattr(text_config(m), "num_hidden_layers", None)
    roots = [m]
    get = getattr(m, "get_decoder", None)
    if callable(get):
        with contextlib.suppress(Exception):
            roots.insert(0, get())
    roots.append(getattr(m, "base_model", m))
    for root in roots:
        for name in ("layers", "h", "blocks", "decoder_layers"):
            mod = getattr(root, name, None)
            if isinstance(mod, torch.nn.ModuleList) and (n is None or len(mod) == n):
                return mod
    for mod in m.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise ConfigError(f"cannot find the decoder layers of {type(m).__name__}")


def attention_module(layer: torch.nn.Module) -> torch.nn.Module:
    """The self-attention module of one decoder layer (``self_attn`` / ``attn`` / ``attention``)."""
    for name in ("self_attn", "attn", "attention", "self_attention"):
        mod = getattr(layer, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    for mod in layer.modules():
        if type(mod).__name__.endswith("Attention"):
            return mod
    raise ConfigError(f"cannot find the attention module of {type(layer).__name__}")


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run the block with eager attention (the kernel that returns probabilities), then restore.

    ``config._attn_implementation`` is switched only when it is not already ``eager``, and put
    back on exit (also on error), so SDPA / flash users keep their kernel elsewhere.
    """
    m = unwrap(model)
    impl = getattr(m.config, "_attn_implementation", None)
    if impl != "eager":
        m.set_attn_implementation("eager")
    try:
        yield
    finally:
        if impl not in (None, "eager"):
            m.set_attn_implementation(impl)


def _base_layer(mod: Any) -> Any:
    """The layer under peft's LoRA wrappers (``base_layer``), else ``mod``."""
    while isinstance(getattr(mod, "base_layer", None), torch.nn.Module):
        mod = mod.base_layer
    return mod


def _is_projection(mod: Any) -> bool:
    mod = _base_layer(mod)
    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"


def _linear_names(attn: torch.nn.Module) -> list[str]:
    def peft_part(n: str) -> bool:
        return any(p == "base_layer" or p.startswith("lora_") for p in n.split("."))

    return [n for n, mod in attn.named_modules() if n and not peft_part(n) and _is_projection(mod)]


def _unknown(model_type: str, attn: torch.nn.Module) -> ConfigError:
    names = ", ".join(_linear_names(attn)) or "none"
    return ConfigError(
        f"unknown architecture {model_type!r}: coreselect does not know its attention projections. Its attention "
        f"module ({type(attn).__name__}) has these linear submodules: {names}. Pass the ones to adapt with "
        "--lora-target-modules (P2D head slicing needs the family added to "
        "coreselect.models.introspect.ATTENTION_SPECS)"
    )


def attention_spec(model: Any) -> AttentionSpec:
    """The :data:`ATTENTION_SPECS` entry of ``model``'s ``model_type`` (text config first).

    Raises:
        ConfigError: for a type not in the table, listing the attention module's linear submodules.
    """
    m = unwrap(model)
    types = [getattr(text_config(m), "model_type", None), getattr(m.config, "model_type", None)]
    for t in types:
        if t in ATTENTION_SPECS:
            return ATTENTION_SPECS[t]
    raise _unknown(str(types[0] or types[1]), attention_module(decoder_layers(m)[0]))


def projection(model: Any, layer: int, name: str) -> torch.nn.Module:
    """The projection ``name`` (an :class:`AttentionSpec` name) of decoder layer ``layer``'s attention
    (the ``Linear`` / ``Conv1D`` itself, under a peft LoRA wrapper if there is one)."""
    attn = attention_module(decoder_layers(model)[layer])
    mod = getattr(attn, name, None)
    if not _is_projection(mod):
        raise ConfigError(
            f"{type(attn).__name__} of layer {layer} has no linear {name!r} "
            f"(its linear submodules: {', '.join(_linear_names(attn)) or 'none'})"
        )
    return _base_layer(mod)


def projection_weight(mod: torch.nn.Module) -> Tensor:
    """``mod``'s weight as ``[out_features, in_features]``: a ``Linear``'s own, a ``Conv1D``'s transpose.

    Both are views of the parameter, so indexed in-place writes reach the model.
    """
    w = mod.weight
    # the return-value ignore: Module.__getattr__ is typed Tensor | Module; ``weight`` is a Parameter here
    return w.T if type(mod).__name__ == "Conv1D" else w  # type: ignore[return-value]


def attention_projections(model: Any) -> list[str]:
    """The module names LoRA should target to adapt all of ``model``'s attention projections.

    Names come from :data:`ATTENTION_SPECS` and are checked on every decoder layer. They are
    leaf names (``q_proj``), as peft matches them as suffixes of module paths; a name that
    also occurs outside the attention modules (GPT-2's MLP has a ``c_proj`` too) is qualified
    with the attention module's attribute (``attn.c_proj``) so that only attention is adapted.
    (Limit: a multimodal model whose vision tower reuses ``self_attn.q_proj`` names, such as
    Gemma 3 with SigLIP, still matches the tower too; pass ``--lora-target-modules`` there.)

    Raises:
        ConfigError: unknown ``model_type`` (lists the attention's linear submodules and
            points to ``--lora-target-modules``), or a table name missing from a layer.
    """
    m = unwrap(model)
    spec = attention_spec(m)
    layers = decoder_layers(m)
    attr = ""
    for i, layer in enumerate(layers):
        attn = attention_module(layer)
        attr = next((n for n, c in layer.named_children() if c is attn), attr)
        for name in spec.names:
            projection(m, i, name)
    inside = {id(mod) for a in (attention_module(layer) for layer in layers) for mod in a.modules()}
    elsewhere = {n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if id(mod) not in inside and n}
    return [f"{attr}.{n}" if n in elsewhere and attr else n for n in spec.names]


# ------------------------------------------------------------------------------ heads
@dataclass(frozen=True)
class HeadGeometry:
    """Attention shape of a model and how its projections are sliced per head.

    ``n_heads`` query heads of size ``head_dim`` per layer share ``n_kv_heads`` key/value
    heads (grouped-query attention when fewer). ``spec`` names the projections and the fused
    QKV layout (module doc); the default is separate ``q/k/v/o_proj``.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    spec: AttentionSpec = _QKVO

    def __post_init__(self) -> None:
        if min(self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim) < 1 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"invalid head geometry {self.n_layers} layers x {self.n_heads} heads "
                f"({self.n_kv_heads} KV heads) x {self.head_dim}"
            )
        if self.spec.layout not in LAYOUTS:
            raise ConfigError(f"unresolved QKV layout {self.spec.layout!r}")
        if self.spec.layout == "per_head" and self.n_kv_heads != self.n_heads:
            raise ConfigError("a per-head fused QKV has one KV head per query head")

    @classmethod
    def of(cls, model: Any) -> HeadGeometry:
        """From the (text) config: ``head_dim`` from ``config.head_dim`` when set (Gemma, Qwen3), else
        ``hidden_size / num_attention_heads``; KV heads from ``num_key_value_heads`` (Falcon:
        ``num_kv_heads`` / ``multi_query``), else one per query head."""
        spec = attention_spec(model)
        cfg = text_config(model)
        h = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or h)
        if spec.layout == "falcon":
            layout: Layout
            if getattr(cfg, "new_decoder_architecture", False):
                kv, layout = int(cfg.num_kv_heads), "grouped"
            elif getattr(cfg, "multi_query", False):
                kv, layout = 1, "concat"
            else:
                kv, layout = h, "per_head"
            spec = AttentionSpec(output=spec.output, fused=spec.fused, layout=layout)
        d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // h)
        return cls(int(cfg.num_hidden_layers), h, kv, d, spec)

    @property
    def group(self) -> int:
        """Query heads per KV head (``r``)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The key/value head query head ``head`` reads (HF's ``repeat_kv`` grouping)."""
        return head // self.group

    def is_output(self, name: str) -> bool:
        """Whether ``name`` is indexed by input columns (the output projection) rather than output rows."""
        return name == self.spec.output

    def rows(self, part: str, head: int) -> range:
        """Output rows of ``part`` (``q``/``k``/``v``) for query head (q) or KV head (k, v) ``head``,
        inside the projection that holds that part."""
        d, H, K, r = self.head_dim, self.n_heads, self.n_kv_heads, self.group
        off = {"q": 0, "k": 1, "v": 2}[part]
        lay = self.spec.layout
        if lay == "separate":
            start = head * d
        elif lay == "concat":
            start = head * d if part == "q" else H * d + (off - 1) * K * d + head * d
        elif lay == "per_head":
            start = head * 3 * d + off * d
        else:  # grouped: [K, r + 2, d]
            g, j = (self.kv_head(head), head % r) if part == "q" else (head, r + off - 1)
            start = g * (r + 2) * d + j * d
        return range(start, start + d)

    def layer_indices(self, heads: Iterable[int]) -> dict[str, Tensor]:
        """For query heads ``heads`` of one layer: projection name -> sorted int64 indices it owns.

        Input projections map to output rows (separate ``q``; ``k``/``v`` for every KV head
        read by a selected head; or all of those inside the fused projection); the output
        projection maps to the selected heads' input columns.
        """
        qs = sorted({int(h) for h in heads})
        if not qs or not all(0 <= h < self.n_heads for h in qs):
            raise ConfigError(f"heads must be a non-empty subset of 0..{self.n_heads - 1}, got {qs}")
        kvs = sorted({self.kv_head(h) for h in qs})

        def idx(part: str, hs: list[int]) -> list[int]:
            return [i for h in hs for i in self.rows(part, h)]

        q, k, v = idx("q", qs), idx("k", kvs), idx("v", kvs)
        cols = torch.tensor([i for h in qs for i in range(h * self.head_dim, (h + 1) * self.head_dim)])
        s = self.spec
        if s.fused:
            out = {s.fused: torch.tensor(sorted(q + k + v), dtype=torch.int64)}
        else:
            out = {
                s.query: torch.tensor(q, dtype=torch.int64),
                s.key: torch.tensor(k, dtype=torch.int64),
                s.value: torch.tensor(v, dtype=torch.int64),
            }
        out[s.output] = cols.to(torch.int64)
        return out


def head_index_map(heads: Iterable[tuple[int, int]], geom: HeadGeometry) -> dict[int, dict[str, Tensor]]:
    """Per layer with a selected head: projection name -> the weight indices the ``(layer, head)`` pairs own.

    Rows (``[out, in]`` convention) of the query/key/value or fused QKV projection, columns of
    the output projection; KV rows follow the "any selected query head" rule (module doc).
    """
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not 0 <= int(layer) < geom.n_layers:
            raise ConfigError(f"layer {layer} is outside the model (0..{geom.n_layers - 1})")
        by_layer.setdefault(int(layer), []).append(int(head))
    return {layer: geom.layer_indices(hs) for layer, hs in sorted(by_layer.items())}
