"""TRIM Stage II on a GPU with random-init models of real shapes (run by ``bench/gpu.sh``).

No weights, no internet, no coreselect data packages: the models are built from the configs
below (SmolLM2-135M, Llama-3.2-1B, Qwen2.5-1.5B shapes) directly on the device, the tokenizer
is a small byte-level BPE trained here, and the pool is :func:`bench.feed.synthetic_mix` (short
multiple-choice items next to long chats). Per model, in one run, on the same token-budget
batches:

* bare forward (``ModelRunner.hidden`` over the collated batches) vs TRIM Stage II on the
  encoded records, and vs Stage II from raw records (tokenization included): tokens/s, ratios;
* the feed rate: Stage II from raw records with the forward replaced by an embedding lookup;
* padding efficiency vs packing, and packed vs padded Stage II (SDPA, and
  ``flash_attention_2`` when ``flash_attn`` is installed): speed ratio, max score difference;
* peak device memory per phase;
* multi-target cost (3 targets vs 1 in one ``select``), only when the CLI supports
  ``--target name=FILE`` (issue 14, §1); skipped with a message otherwise.

``--smoke``: CPU, fp32, the same code on shrunken shapes and a few hundred records.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feed import (
    NoOpRunner,
    pack_efficiency,
    pad_efficiency,
    synthetic_mix,
    write_jsonl,
)
from scoring import chat_bpe_tokenizer

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "family": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "family": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "qwen2.5-1.5b": {
        "family": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
}
SMOKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
}


def tokenizer(out: Path) -> Any:
    """A byte-level BPE (vocab 1000) with a ChatML template, trained on the synthetic words."""
    return chat_bpe_tokenizer(out, vocab_size=1000, n_texts=500, words_per_text=40)


def build(shape: str, tok: Any, device: str, dtype: Any, smoke: bool, attn: str = "sdpa") -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    kw = dict(SHAPES[shape])
    family = kw.pop("family")
    if smoke:
        kw.update(SMOKE)
        kw.pop("rope_scaling", None)
    kw.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = (LlamaConfig if family == "llama" else Qwen2Config)(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model.eval()


def sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: Any) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if str(device).startswith("cuda") else float("nan")


def bench_model(
    shape: str,
    tok: Any,
    records_file: Path,
    target_file: Path,
    *,
    device: str,
    dtype: Any,
    smoke: bool,
    batch_tokens: int,
    shard: int,
    repeats: int,
) -> dict:
    import numpy as np

    from coreselect.data.formatting import Formatter
    from coreselect.data.readers import read_records
    from coreselect.methods.trim import TrimConfig, TrimMethod
    from coreselect.models.runner import ModelRunner, token_budget_batches

    t = time.perf_counter()
    model = build(shape, tok, device, dtype, smoke)
    res: dict[str, Any] = {
        "shape": shape,
        "build_s": time.perf_counter() - t,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    runner = ModelRunner(model, tok)
    fmt = Formatter(tok, 2048)
    records = list(read_records([str(records_file)]))
    enc = fmt.encode_many(records)
    n_tok = sum(len(e) for e in enc)
    shards = [list(range(i, min(i + shard, len(enc)))) for i in range(0, len(enc), shard)]
    batches = [[s[p] for p in b] for s in shards for b in token_budget_batches([len(enc[i]) for i in s], batch_tokens)]
    lengths = np.array([len(e) for e in enc])
    res.update(
        records=len(enc),
        tokens=n_tok,
        batches=len(batches),
        pad_eff=pad_efficiency(lengths, shard, batch_tokens),
        pack_eff=pack_efficiency(lengths, shard, batch_tokens),
    )
    cfg = TrimConfig(batch_tokens=batch_tokens, chunk_records=shard, layers=min(6, runner.num_layers))
    peak_reset(device)
    method = TrimMethod(runner, fmt, cfg, progress=False).fit(list(read_records([str(target_file)])))
    res["peak_mib_stage1"] = peak_mib(device)

    def bare() -> float:
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            runner.hidden(runner.collate(enc, b))
        sync(device)
        return time.perf_counter() - t0

    def stage2_encoded() -> float:
        sync(device)
        t0 = time.perf_counter()
        for s in shards:
            method._score_encoded([enc[i] for i in s])
        sync(device)
        return time.perf_counter() - t0

    def stage2_records() -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in method.score_chunks(read_records([str(records_file)])):
            pass
        sync(device)
        return time.perf_counter() - t0

    bare()  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {"bare": [], "stage2_encoded": [], "stage2_records": []}
    peaks = {}
    for _ in range(repeats):  # interleaved, best of `repeats`
        for k, f in (("bare", bare), ("stage2_encoded", stage2_encoded), ("stage2_records", stage2_records)):
            peak_reset(device)
            times[k].append(f())
            peaks[k] = peak_mib(device)
    tb = min(times["bare"])
    res.update({f"{k}_tokens_per_s": n_tok / min(v) for k, v in times.items()})
    res["ratio_stage2_encoded"] = tb / min(times["stage2_encoded"])
    res["ratio_stage2_records"] = tb / min(times["stage2_records"])
    res.update({f"peak_mib_{k}": v for k, v in peaks.items()})
    # feed rate: the same Stage II from raw records, forward = embedding lookup
    noop = TrimMethod(NoOpRunner(runner), fmt, cfg, progress=False)  # type: ignore[arg-type]
    noop.set_fingerprints(method.fingerprints)  # type: ignore[arg-type]
    sync(device)
    t0 = time.perf_counter()
    for _ in noop.score_chunks(read_records([str(records_file)])):
        pass
    sync(device)
    dt = time.perf_counter() - t0
    res["feed_tokens_per_s"] = n_tok / dt
    res["feed_records_per_s"] = len(enc) / dt
    res["feed_over_forward"] = res["feed_tokens_per_s"] / res["bare_tokens_per_s"]
    # padding vs packing (SDPA; then flash_attention_2 if installed)
    base = [method._score_encoded([enc[i] for i in s])[0] for s in shards]
    kernels = ["sdpa"]
    if str(device).startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            kernels.append("flash_attention_2")
        except ImportError:
            res["flash_attention_2"] = "flash_attn not installed: skipped"
    for kern in kernels:
        try:
            model.set_attn_implementation(kern)
        except Exception as e:  # noqa: BLE001
            res[f"packing_{kern}"] = f"cannot switch to {kern}: {e}"
            continue
        method.config.packing = True
        best, diff = 1e18, 0.0
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            got = [method._score_encoded([enc[i] for i in s])[0] for s in shards]
            sync(device)
            best = min(best, time.perf_counter() - t0)
        fin = [np.isfinite(b) for b in base]
        diff = max(float(np.max(np.abs(g[m] - b[m]), initial=0.0)) for g, b, m in zip(got, base, fin))
        method.config.packing = False
        res[f"packing_{kern}"] = {
            "packed_over_padded_speed": min(times["stage2_encoded"]) / best,
            "max_abs_score_diff": diff,
        }
    model.set_attn_implementation("sdpa")
    return res


def multi_target(tok_dir: Path, tok: Any, tmp: Path, device: str, dtype: Any, smoke: bool, n: int) -> dict | str:
    """3 named targets vs 1 in one ``select`` (SmolLM2 shape), when the CLI supports it."""
    helptext = subprocess.run(
        [sys.executable, "-m", "coreselect", "select", "--help"], capture_output=True, text=True, check=False
    ).stdout
    if "--combine" not in helptext and "name=FILE" not in helptext:
        return "skipped: this coreselect has no multi-target --target name=FILE yet (issue 14, section 1)"
    model = build("smollm2-135m", tok, device, dtype, smoke)
    mdir = tmp / "smollm2-shape"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    layers = min(6, model.config.num_hidden_layers)  # TRIM's default L=6 exceeds the smoke shapes' depth
    del model
    pool = write_jsonl(tmp / "mt-pool.jsonl", synthetic_mix(n, seed=5))
    targets = [write_jsonl(tmp / f"mt-t{i}.jsonl", synthetic_mix(8, seed=10 + i)) for i in range(3)]
    walls = {}
    for name, tspec in (("one", [str(targets[0])]), ("three", [f"t{i}={p}" for i, p in enumerate(targets)])):
        out = tmp / f"mt-{name}"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "coreselect",
                "select",
                "--pool",
                str(pool),
                "--target",
                *tspec,
                "--out",
                str(out),
                "--model",
                str(mdir),
                "--warmup",
                "none",
                "--layers",
                str(layers),
                "--budget",
                "10%",
                "--device",
                device.split(":")[0],
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            return (
                f"failed ({name}): {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
            )
        walls[name] = time.perf_counter() - t0
    return {
        "records": n,
        "one_target_s": walls["one"],
        "three_targets_s": walls["three"],
        "ratio_3_over_1": walls["three"] / walls["one"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, shrunken shapes, few records")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--records", type=int)
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--shard-records", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--json")
    a = p.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not a.smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = a.records or (120 if a.smoke else 8000)
    budget = a.batch_tokens or (4096 if a.smoke else 32768)
    shard = a.shard_records or (n if a.smoke else 8192)
    repeats = a.repeats or (1 if a.smoke else 2)
    hw = torch.cuda.get_device_name(0) if cuda else f"CPU x{os.cpu_count()}"
    print(
        f"# coreselect gpu bench: device={device} ({hw}) dtype={dtype} torch={torch.__version__} "
        f"records={n} batch_tokens={budget} shard={shard} repeats={repeats} load={os.getloadavg()[0]:.2f}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="coreselect-gpu-"))
    tok = tokenizer(tmp / "tok")
    pool = write_jsonl(tmp / "pool.jsonl", synthetic_mix(n))
    target = write_jsonl(tmp / "target.jsonl", synthetic_mix(8, seed=1))
    out: dict[str, Any] = {
        "device": device,
        "hardware": hw,
        "dtype": str(dtype),
        "records": n,
        "batch_tokens": budget,
        "shard": shard,
        "models": [],
    }
    t_all = time.perf_counter()
    for shape in a.shapes.split(","):
        t0 = time.perf_counter()
        r = bench_model(
            shape,
            tok,
            pool,
            target,
            device=device,
            dtype=dtype,
            smoke=a.smoke,
            batch_tokens=budget,
            shard=shard,
            repeats=repeats,
        )
        r["wall_s"] = time.perf_counter() - t0
        if cuda:
            torch.cuda.empty_cache()
        out["models"].append(r)
        print(
            f"\n## {shape} ({r['params_m']:.1f}M params{' (smoke shapes)' if a.smoke else ''}): "
            f"{r['records']} records, {r['tokens']} tokens, {r['batches']} batches, wall {r['wall_s']:.0f}s"
        )
        rows = [
            ("bare forward tokens/s", f"{r['bare_tokens_per_s']:.0f}"),
            ("Stage II (encoded) tokens/s", f"{r['stage2_encoded_tokens_per_s']:.0f}"),
            ("Stage II (from records) tokens/s", f"{r['stage2_records_tokens_per_s']:.0f}"),
            ("ratio Stage II encoded / bare", f"{r['ratio_stage2_encoded']:.3f}"),
            ("ratio Stage II from records / bare", f"{r['ratio_stage2_records']:.3f}"),
            ("feed rate (no-op model) tokens/s", f"{r['feed_tokens_per_s']:.0f}"),
            ("feed rate records/s", f"{r['feed_records_per_s']:.0f}"),
            ("feed / forward", f"{r['feed_over_forward']:.2f}x"),
            ("padding efficiency (padded batches)", f"{r['pad_eff']:.3f}"),
            ("padding efficiency (packed rows)", f"{r['pack_eff']:.3f}"),
        ]
        for kern in ("sdpa", "flash_attention_2"):
            v = r.get(f"packing_{kern}")
            if isinstance(v, dict):
                rows += [
                    (f"packed / padded speed ({kern})", f"{v['packed_over_padded_speed']:.3f}"),
                    (f"max |score packed - padded| ({kern})", f"{v['max_abs_score_diff']:.1e}"),
                ]
            elif v:
                rows.append((f"packing ({kern})", str(v)))
        rows += [
            (f"peak MiB {k}", f"{r[f'peak_mib_{k}']:.0f}")
            for k in ("stage1", "bare", "stage2_encoded", "stage2_records")
        ]
        for k, v in rows:
            print(f"  {k:44s} {v:>14s}")
        sys.stdout.flush()
    print("\n## multi-target cost (3 targets vs 1, one select, SmolLM2 shape)")
    mt = multi_target(tmp / "tok", tok, tmp, device, dtype, a.smoke, min(n, 2000))
    out["multi_target"] = mt
    print(f"  {mt}" if isinstance(mt, str) else "".join(f"  {k:44s} {v:>14.3f}\n" for k, v in mt.items()), end="\n")
    out["wall_s"] = time.perf_counter() - t_all
    out["load_end"] = os.getloadavg()
    print(f"\ntotal wall {out['wall_s']:.0f}s, load end {out['load_end'][0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
