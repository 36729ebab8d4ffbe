"""Shared fixtures: a tiny random-init Llama with a real (trained-in-test) BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is 12 plus 30? First add the tens: 10 + 30 = 40. Then 2 more gives 42. The answer is 42.",
    "Natalia sold clips to 48 friends in April and half as many in May. 48 / 2 = 24. 48 + 24 = 72.",
    "Write a short poem about the sea. The sea is wide, the sea is deep, it sings the sailors off to sleep.",
    "Where would you find a fox? A) forest B) ocean C) desert. The answer is A, the forest.",
    "Translate to French: good morning. Bonjour.",
    "How do I bake bread? Mix flour, water, yeast and salt, knead, let it rise, then bake at 220 degrees.",
    "Summarize the text: the meeting was moved to Friday because the room was booked.",
    "Question: what do people use to cut paper? Choices: scissors, spoon, pillow. Answer: scissors.",
] * 4


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return tok


def make_tiny_model(out: Path, *, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return out


@pytest.fixture()
def one_torch_thread():
    """Tiny models run far faster single-threaded on a small, shared CPU (no OpenMP spin-waits)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def system_refusing_model(tiny_model_dir: Path, out: Path, message: str = "System role not supported") -> Path:
    """A copy of the tiny model whose chat template raises on a leading system turn (as some do)."""
    import shutil

    shutil.copytree(tiny_model_dir, out)
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('" + message + "') }}{% endif %}"
    (out / "chat_template.jinja").write_text(refuse + (out / "chat_template.jinja").read_text())
    return out


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bigbench_archive(path: Path, subtasks: dict[str, list[dict] | bytes], prefix: str = "Definition: do it.") -> Path:
    """A ``bigbench-1.0.0.tar.gz`` lookalike: natural_instructions subtasks plus one other task
    (a subtask given as bytes is written as its task.json verbatim)."""
    import io
    import tarfile

    root = "bigbench-1.0.0/bigbench/benchmark_tasks"
    files = {f"{root}/natural_instructions/task.json": {"name": "natural_instructions", "subtasks": []}}
    files[f"{root}/other_task/task.json"] = {"task_prefix": "x", "examples": [{"input": "no", "target": ["no"]}]}
    for name, examples in subtasks.items():
        task = examples if isinstance(examples, bytes) else {"task_prefix": prefix, "examples": examples}
        files[f"{root}/natural_instructions/{name}/task.json"] = task
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in files.items():
            data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(i, user, assistant, dataset="mix"):
    return {
        "id": str(i),
        "dataset": dataset,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
    }


@pytest.fixture()
def small_pool(tmp_path) -> tuple[Path, Path]:
    """A mixed pool (math / other) and a math target, as JSONL files."""
    math = [
        ("What is 7 plus 5?", "7 + 5 = 12. The answer is 12."),
        ("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7. He has 7 apples."),
        ("What is 48 divided by 2?", "48 / 2 = 24. The answer is 24."),
        ("A box holds 6 eggs. How many eggs in 5 boxes?", "6 * 5 = 30. There are 30 eggs."),
    ]
    other = [
        ("Write a poem about the sea.", "The sea is wide, the sea is deep."),
        ("How do I bake bread?", "Mix flour, water and yeast, knead, let it rise, bake."),
        ("Translate good morning to French.", "Bonjour."),
        ("Summarize: the meeting moved to Friday.", "The meeting is now on Friday."),
    ]
    rows = [chat(i, u, a, "math") for i, (u, a) in enumerate(math)]
    rows += [chat(10 + i, u, a, "other") for i, (u, a) in enumerate(other)]
    target = [
        chat(100, "What is 12 plus 30?", "10 + 30 = 40, plus 2 is 42. The answer is 42.", "gsm8k"),
        chat(101, "Natalia sold 48 clips and half as many later. Total?", "48 / 2 = 24. 48 + 24 = 72.", "gsm8k"),
    ]
    return write_jsonl(tmp_path / "pool.jsonl", rows), write_jsonl(tmp_path / "target.jsonl", target)
