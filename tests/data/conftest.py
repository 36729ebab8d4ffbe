"""Tokenizers for the formatting tests: a tiny BOS-adding one built offline, and SmolLM2's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

WORDS = [
    "hello world the cat sat on the mat",
    "what is two plus two the answer is four",
    "user assistant system Today Date Jul",
    "write a poem about the sea it is wide and deep",
]


def make_bos_tokenizer(*, add_eos: bool = False, chat_template: str | None = None) -> Any:
    """A byte-level BPE fast tokenizer whose post-processor adds ``<s>`` (and ``</s>`` if ``add_eos``).

    Built from a ``tokenizers.Tokenizer`` with a ``TemplateProcessing`` post-processor, the way
    Llama / Mistral / Gemma tokenizers add BOS; no download.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(WORDS * 4, trainer)
    single = "<s> $A </s>" if add_eos else "<s> $A"
    tk.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    assert tok.convert_tokens_to_ids(["<s>", "</s>"]) == [0, 1]
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@pytest.fixture()
def bos_tokenizer() -> Callable[..., Any]:
    """Factory: ``bos_tokenizer(add_eos=False, chat_template=None)``."""
    return make_bos_tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    """SmolLM2's real tokenizer (no model weights), as ``coreselect`` loads it."""
    from coreselect.models.loading import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2"))
