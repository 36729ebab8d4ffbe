"""The SelectionMethod contract, checked for every registered method (a new method is
tested by construction): shapes and dtype, empty and one-record pools, pool-order
invariance and slice independence for streaming methods, and save_state/load_state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coreselect.data.records import Message, Record
from coreselect.methods import registry
from coreselect.methods.base import MethodContext, SelectionMethod

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QA = [
    ("What is 7 plus 5?", "7 + 5 = 12. The answer is 12."),
    ("Write a poem about the sea.", "The sea is wide, the sea is deep."),
    ("How do I bake bread?", "Mix flour, water and yeast, knead, let it rise, bake."),
    ("Translate good morning to French.", "Bonjour."),
    ("What is 48 divided by 2?", "48 / 2 = 24. The answer is 24."),
    ("Summarize: the meeting moved to Friday.", "The meeting is now on Friday."),
]
TARGET = [
    Record(
        index=0,
        id="t0",
        source="t",
        raw={},
        messages=(Message("user", "What is 12 plus 30?"), Message("assistant", "The answer is 42.")),
    )
]


def pool(order: list[int] | None = None) -> list[Record]:
    order = list(range(len(QA))) if order is None else order
    return [
        Record(
            index=pos,
            id=str(i),
            source="p",
            raw={},
            messages=(Message("user", QA[i][0]), Message("assistant", QA[i][1])),
        )
        for pos, i in enumerate(order)
    ]


@pytest.fixture(scope="module")
def model_ctx(tiny_model_dir, tmp_path_factory):
    """The scoring model, and three LoRA epoch checkpoints for the checkpoint methods."""
    import torch

    from coreselect.config import SelectArgs
    from coreselect.runtime import load_context
    from coreselect.train.lora import TrainArgs, train_lora

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("contract")
    ctx = load_context(SelectArgs(model=str(tiny_model_dir), warmup="none", max_length=128, out=str(out)), out, 0)
    targs = TrainArgs(
        lora_r=2,
        lora_alpha=4,
        lora_dropout=0.0,
        lr=5e-3,
        epochs=3,
        batch_size=3,
        grad_accum=1,
        max_length=128,
        warmup_ratio=0.0,
        seed=0,
        save_every="epoch",
    )
    res = train_lora(
        ctx.model.__class__.from_pretrained(tiny_model_dir), ctx.tokenizer, pool(), targs, out / "warm", progress=False
    )
    return ctx, [str(c.path) for c in res.checkpoints]


def build(name: str, model_ctx, tiny_model_dir) -> SelectionMethod:
    spec = registry.get(name)
    ctx, ckpts = model_ctx if spec.needs_model else (None, [])
    options: dict = {"checkpoints": ckpts} if "checkpoints" in spec.option_names() else {}
    if "layers" in spec.option_names():
        options["layers"] = 2  # the tiny model has 4
    if "aer" in spec.option_names():
        options["aer"] = False  # times full-model training steps: not part of the contract
    config = spec.make_config(options, {"seed": 0, "chunk_records": 4})
    mctx = MethodContext(model=ctx, model_name=str(tiny_model_dir), device="cpu", budget="50%", progress=False)
    return spec.cls.create(config, mctx)


@pytest.mark.parametrize("name", registry.names())
def test_method_keeps_the_contract(name, model_ctx, tiny_model_dir, tmp_path: Path):
    spec = registry.get(name)
    m = build(name, model_ctx, tiny_model_dir)
    assert isinstance(m, SelectionMethod) and m.name == name
    assert isinstance(m.n_truncated, int) and isinstance(m.stats, dict) and isinstance(m.settings(), dict)
    m.fit_targets({"target": TARGET})

    s = m.score(pool())
    assert isinstance(s, np.ndarray) and s.dtype == np.float64 and s.shape == (len(QA),)
    assert not np.isnan(s).any()
    assert m.score(pool()[:1]).shape == (1,)
    if spec.streaming:
        assert m.score([]).shape == (0,)
        # a record's score is its own: any order, any slice
        perm = [3, 0, 5, 1, 4, 2]
        assert np.allclose(m.score(pool(perm)), s[perm], rtol=1e-6, atol=1e-9)
        halves = [m.score_batch(pool()[:2]), m.score_batch(pool()[2:])]
        assert np.allclose(np.concatenate([c.score for c in halves]), s, rtol=1e-6, atol=1e-9)
        chunks = list(m.score_chunks(iter(pool()), chunk_records=4))
        assert [len(c) for c in chunks] == [4, 2]
        # what fit learned survives save_state / load_state into a fresh instance
        written = m.save_state(tmp_path)
        assert written and all(p.is_file() for p in written)
        fresh = build(name, model_ctx, tiny_model_dir)
        assert fresh.load_state(tmp_path)
        assert np.allclose(fresh.score(pool()), s, rtol=1e-6, atol=1e-9)  # float32 features
    else:
        assert isinstance(m.save_state(tmp_path), list)
    if m.multi_target:  # several targets natively: one score column per target in every chunk
        m.fit_targets({"a": TARGET, "b": TARGET[:1]})
        chunk = next(iter(m.score_chunks(iter(pool()))))
        assert set(chunk.targets) == {"a", "b"} and all(len(v) == len(chunk) for v in chunk.targets.values())
    else:
        with pytest.raises(Exception, match="one target set|takes one"):
            m.fit_targets({"a": TARGET, "b": TARGET})


def test_registry_lists_every_catalogued_method():
    from coreselect.methods.catalog import MODULES

    assert set(registry.specs()) == set(MODULES)
    for spec in registry.specs().values():
        assert spec.config.__doc__ and "Attributes" in spec.config.__doc__ or not spec.option_names()
