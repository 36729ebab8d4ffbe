"""Load a causal LM and its tokenizer from a folder, a ``.gguf`` file, an alias or a hub id."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coreselect.assets import PACKAGED_MODELS
from coreselect.errors import ConfigError, CoreselectError

log = logging.getLogger(__name__)

#: Names that resolve to models shipped by pip packages (``coreselect.assets.PACKAGED_MODELS``).
ALIASES: tuple[str, ...] = tuple(PACKAGED_MODELS)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"bad device {device!r}: {e}") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU (bf16 is much slower there) and bfloat16 on a GPU that has it."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ConfigError(f"unknown dtype {dtype!r} (expected auto, float32, bfloat16 or float16)")
    return table[dtype]


@dataclass
class ModelSpec:
    """Where a model comes from: ``path`` for from_pretrained, plus ``gguf_file`` when it is a GGUF."""

    path: str
    gguf_file: str | None = None
    is_local: bool = True


def resolve_model(spec: str) -> ModelSpec:
    """Turn a ``--model`` value into a :class:`ModelSpec`, failing early on a missing path.

    A packaged-model name (:data:`ALIASES`, case-insensitive) resolves to its converted
    folder in the cache, converting it on first use.
    """
    if spec.lower() in ALIASES:
        from coreselect import assets

        return ModelSpec(str(assets.packaged_model_path(spec.lower())))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise CoreselectError(f"{spec}: no such model file")
        return ModelSpec(str(p.parent), gguf_file=p.name)
    if p.exists():
        if not p.is_dir():
            raise CoreselectError(f"{spec}: a model must be a folder, a .gguf file or a hub id")
        if not (p / "config.json").exists():
            raise CoreselectError(f"{spec}: folder has no config.json (not a Hugging Face model folder)")
        return ModelSpec(str(p))
    # a hub id is "name" or "org/name"; anything else that does not exist is a missing path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise CoreselectError(f"{spec}: no such model folder")
    near = difflib.get_close_matches(spec.lower(), ALIASES, n=1, cutoff=0.75)
    if "/" not in spec and near:  # a mistyped packaged name, not a hub id
        raise CoreselectError(
            f"{spec}: unknown model; did you mean {near[0]!r}? (packaged models: {', '.join(ALIASES)})"
        )
    return ModelSpec(spec, is_local=False)


def load_tokenizer(spec: ModelSpec, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if spec.gguf_file:
        kw["gguf_file"] = spec.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(spec.path, **kw)
    except OSError as e:
        raise CoreselectError(f"{spec.path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    model: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    adapter: str | None = None,
    merge_adapter: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        model: a local folder, a ``.gguf`` file, a packaged name (``smollm2``, ``gemma3-270m``) or a hub id.
        dtype: ``auto`` (fp32 on CPU, bf16 on GPU), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        trust_remote_code: never on unless the user asks.
        adapter: a saved PEFT adapter folder to apply.
        merge_adapter: merge the adapter into the weights (fast inference).
    """
    from transformers import AutoModelForCausalLM

    spec = resolve_model(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tok = load_tokenizer(spec, trust_remote_code)
    kw: dict[str, Any] = {"dtype": dt, "trust_remote_code": trust_remote_code}
    if spec.gguf_file:
        kw["gguf_file"] = spec.gguf_file
    m: Any
    try:
        m = AutoModelForCausalLM.from_pretrained(spec.path, attn_implementation="sdpa", **kw)
    except (ValueError, ImportError):  # architectures without SDPA support
        m = AutoModelForCausalLM.from_pretrained(spec.path, attn_implementation="eager", **kw)
    except OSError as e:
        raise CoreselectError(f"{model}: cannot load model ({str(e).splitlines()[0]})") from None
    if spec.gguf_file and dt != torch.float32:
        m = m.to(dt)
    if adapter:
        m = apply_adapter(m, adapter, merge=merge_adapter)
    m.to(dev).eval()
    return m, tok


def require_adapter_dir(path: str | Path) -> Path:
    """``path`` as a Path; CoreselectError unless it is a saved PEFT adapter folder."""
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise CoreselectError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    return p


def apply_adapter(model: Any, adapter: str, merge: bool = True) -> Any:
    """Apply a saved PEFT adapter; merged by default so scoring runs a plain model."""
    from peft import PeftModel

    require_adapter_dir(adapter)
    pm = PeftModel.from_pretrained(model, adapter)
    return pm.merge_and_unload() if merge else pm


def model_name(model: Any) -> str:
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
