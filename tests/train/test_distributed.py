"""``accelerate launch -m coreselect train`` on 2 CPU processes (gloo) trains the adapter of 1 process.

Same data, same effective batch (2 processes x 1 record x 2 accumulation = 1 process x 2 x 2),
no dropout: the optimizer steps see the same records and the same token-mean loss, so the
adapters agree to float rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]


def test_two_gloo_processes_train_the_one_process_adapter(tiny_model_dir, small_pool, tmp_path):
    from safetensors.torch import load_file

    pool, _ = small_pool  # 8 records
    common = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(pool),
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lora-dropout",
        "0",
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
            str(_free_port()),
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
    assert s1["processes"] == 1 and s2["processes"] == 2
    assert s1["steps"] == s2["steps"] == 4  # 8 records / 4 per step x 2 epochs
    assert s2["losses"] == pytest.approx(s1["losses"], rel=1e-4)
    a, b = (
        load_file(str(one / "adapter" / "adapter_model.safetensors")),
        load_file(str(two / "adapter" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-3)
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (two / "checkpoint-4" / "rng_state_1.safetensors").is_file()
