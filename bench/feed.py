"""Stage II feed benchmark (issue 14, §2): can the CPU side keep a GPU busy?

All figures are measured in one run and printed as rates and ratios (no timed unit tests):

a. **feed rate**: TRIM Stage II from raw records with the model replaced by a no-op (reading,
   chat-template rendering, tokenization with offsets, scope codes, collation, host-to-device
   copy, scoring and gathering the results; the "forward" is an embedding lookup) in
   records/s and tokens/s, per CPU core, next to the real model's forward rate on a sample
   of the same batches. Encoding alone is reported three ways: ``encode`` per record (the
   old path), ``encode_many`` (batched tokenizer calls) and ``EncodePool`` worker processes.
b. **padding efficiency** (real / padded tokens) of the token-budget batching over a grid of
   shard sizes (``--shard-records``) and budgets (``--batch-tokens``), and of packing.
c. **packing vs padding**: Stage II seconds and the largest score difference on a sample.

``--data real`` reads the packaged pool (``build_embedded_data``: MC questions, GSM8K, MATH,
ShareGPT; needs the data packages); ``--data synthetic`` generates a length mix like it
(:func:`synthetic_mix`, no packages needed; ``bench/gpu.sh`` uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scoring import WORDS  # one vocabulary for every synthetic bench pool (bench/ is on sys.path)


def synthetic_mix(n: int, seed: int = 0) -> list[dict]:
    """Chat records whose length mix follows the packaged pool's: ~6/8 short multiple-choice items
    (question + 2-5 options, a one-line answer), ~1/8 GSM8K / MATH-like worked solutions and
    ~1/8 ShareGPT-like chats (long-tailed, up to ~1500 tokens)."""
    rng = random.Random(seed)
    rows = []

    def words(k: int) -> str:
        return " ".join(rng.choices(WORDS, k=max(1, k)))

    for i in range(n):
        u = rng.random()
        if u < 0.70:  # MC
            opts = "\n".join(f"{'ABCDE'[j]}. {words(rng.randint(2, 14))}" for j in range(rng.randint(2, 5)))
            user = f"{words(rng.randint(8, 60))}\n\n{opts}\n\nAnswer with the letter of the correct option."
            asst, src = f"B. {words(rng.randint(2, 12))}", "mc"
        elif u < 0.85:  # GSM8K / MATH
            user, asst, src = words(rng.randint(25, 90)), words(int(40 * 2 ** rng.uniform(0, 3))), "math"
        else:  # ShareGPT
            user, asst, src = (
                words(int(8 * 2 ** rng.uniform(0, 5.5))),
                words(int(30 * 2 ** rng.uniform(0, 4.2))),
                "chat",
            )
        rows.append(
            {
                "id": str(i),
                "dataset": src,
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": asst}],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def real_pool(n: int, tmp: Path) -> tuple[Path, Path]:
    """The packaged pool (``n`` records at most, shuffled sources) and the GSM8K target file."""
    from coreselect.assets import build_embedded_data

    paths = build_embedded_data(tmp / "data", n_per_source=max(60, (n + 7) // 8))
    return paths["pool"], paths["target_gsm8k"]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def pad_efficiency(lengths: np.ndarray, shard: int, budget: int) -> float:
    from coreselect.models.runner import token_budget_batches

    real = padded = 0
    for i in range(0, len(lengths), shard):
        c = lengths[i : i + shard]
        for b in token_budget_batches(c.tolist(), budget):
            real += int(c[b].sum())
            padded += len(b) * int(c[b].max())
    return real / padded


def pack_efficiency(lengths: np.ndarray, shard: int, budget: int) -> float:
    """Packing each token-budget batch into rows of its longest record (what ``packing=True`` runs)."""
    from coreselect.models.runner import pack_rows, token_budget_batches

    real = padded = 0
    for i in range(0, len(lengths), shard):
        c = lengths[i : i + shard]
        for b in token_budget_batches(c.tolist(), budget):
            w = int(c[b].max())
            real += int(c[b].sum())
            padded += len(pack_rows(c[b].tolist(), w)) * w
    return real / padded


class NoOpRunner:
    """Stands in for :class:`~coreselect.models.runner.ModelRunner` in Stage II: the same collation
    and copies, but the forward pass is an embedding lookup (cheap, finite, ``[B, T, D]``)."""

    def __init__(self, runner: Any) -> None:
        self._r = runner
        self.emb = runner.model.get_input_embeddings()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._r, name)

    def hidden(self, batch: Any) -> Any:
        import torch

        with torch.inference_mode():
            self._r.forward_passes += batch.input_ids.shape[0]
            self._r.tokens_seen += batch.n_real_tokens
            return self.emb(batch.input_ids)

    def hidden_packed(self, packed: Any) -> Any:
        return self.hidden(packed.batch)


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def feed_and_forward(
    model_path: str,
    pool: Path,
    target: Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    batch_tokens: int = 8192,
    shard: int = 2048,
    workers: int = 2,
    forward_batches: int = 3,
    repeats: int = 2,
    packing_sample: int = 64,
) -> dict:
    """(a) feed rate vs forward rate, and (c) packing vs padding, on one pool file."""
    import torch

    from coreselect.data.formatting import EncodePool, Formatter
    from coreselect.data.readers import read_records
    from coreselect.methods.trim import TrimConfig, TrimMethod
    from coreselect.models.loading import load_model
    from coreselect.models.runner import ModelRunner, token_budget_batches

    model, tok = load_model(model_path, device=device, dtype=dtype)
    runner = ModelRunner(model, tok)
    fmt = Formatter(tok, 2048)
    t = time.perf_counter()
    records = list(read_records([str(pool)]))
    t_read = time.perf_counter() - t
    res: dict[str, Any] = {
        "records": len(records),
        "device": str(runner.device),
        "dtype": str(model.dtype),
        "cores": cores(),
        "torch_threads": torch.get_num_threads(),
        "read_s": t_read,
    }
    enc_times: dict[str, list[float]] = {"encode": [], "encode_many": [], f"pool{workers}": []}
    ep = EncodePool(Formatter(tok, 2048), workers=workers, chunk=256) if workers > 0 else None
    ref = None
    for _ in range(repeats):
        t = time.perf_counter()
        ref = [fmt.encode(r) for r in records]
        enc_times["encode"].append(time.perf_counter() - t)
        t = time.perf_counter()
        fmt.encode_many(records)
        enc_times["encode_many"].append(time.perf_counter() - t)
        if ep is not None:
            t = time.perf_counter()
            ep.encode(records)
            enc_times[f"pool{workers}"].append(time.perf_counter() - t)
    if ep is not None:
        ep.close()
    assert ref is not None
    n_tok = sum(len(e) for e in ref)
    res["tokens"] = n_tok
    res["encode"] = {
        k: {"records_per_s": len(records) / min(v), "tokens_per_s": n_tok / min(v)} for k, v in enc_times.items() if v
    }
    cfg = TrimConfig(batch_tokens=batch_tokens, chunk_records=shard, layers=min(6, runner.num_layers))
    method = TrimMethod(runner, fmt, cfg, progress=False).fit(list(read_records([str(target)])))
    noop = TrimMethod(NoOpRunner(runner), fmt, cfg, progress=False)  # type: ignore[arg-type]
    noop.set_fingerprints(method.fingerprints)  # type: ignore[arg-type]
    feed = []
    for _ in range(repeats):
        _sync(runner.device)
        t = time.perf_counter()
        for _c in noop.score_chunks(read_records([str(pool)])):
            pass
        _sync(runner.device)
        feed.append(time.perf_counter() - t)
    res["feed"] = {
        "records_per_s": len(records) / min(feed),
        "tokens_per_s": n_tok / min(feed),
        "tokens_per_s_per_core": n_tok / min(feed) / res["cores"],
    }
    # the host's share on a GPU: read, encode (batched), batch, collate + copy; the scoring math
    # above ran on the CPU here, on a GPU it runs on the device
    from coreselect.methods.base import record_chunks
    from coreselect.models.runner import collate as _collate

    host = []
    for _ in range(repeats):
        t = time.perf_counter()
        for chunk in record_chunks(read_records([str(pool)]), shard):
            e = fmt.encode_many(chunk)
            for b in token_budget_batches([len(x) for x in e], batch_tokens):
                _collate(e, b, runner.pad_id, "right", runner.device)
        _sync(runner.device)
        host.append(time.perf_counter() - t)
    res["feed_host"] = {
        "records_per_s": len(records) / min(host),
        "tokens_per_s": n_tok / min(host),
        "tokens_per_s_per_core": n_tok / min(host) / res["cores"],
    }
    if not forward_batches:
        res["forward"] = {"tokens_per_s": float("nan"), "tokens": 0}
        res["feed_over_forward"] = float("nan")
        forward_batches = 0
    # model forward rate on the first (longest) batches of the first shard, the feed's batches
    first = ref[:shard]
    batches = token_budget_batches([len(e) for e in first], batch_tokens)
    sample = batches[:: max(1, len(batches) // max(1, forward_batches))][:forward_batches]
    if sample:
        runner.hidden(runner.collate(first, sample[0]))  # warm-up
    _sync(runner.device)
    t = time.perf_counter()
    toks = 0
    for b in sample:
        runner.hidden(runner.collate(first, b))
        toks += sum(len(first[i]) for i in b)
    _sync(runner.device)
    if sample:
        res["forward"] = {"tokens_per_s": toks / (time.perf_counter() - t), "tokens": toks}
        res["feed_over_forward"] = res["feed"]["tokens_per_s"] / res["forward"]["tokens_per_s"]
    # (c) packing vs padding on a sample of records (same budget)
    if packing_sample:
        samp = ref[:packing_sample]
        out = {}
        for packing in (False, True, False, True):
            method.config.packing = packing
            _sync(runner.device)
            t = time.perf_counter()
            sc, _ = method._score_encoded(samp)
            _sync(runner.device)
            dt = time.perf_counter() - t
            key = "packed" if packing else "padded"
            out[key] = min(out.get(key, (1e9, None))[0], dt), sc
        method.config.packing = False
        res["packing"] = {
            "records": len(samp),
            "tokens": sum(len(e) for e in samp),
            "padded_s": out["padded"][0],
            "packed_s": out["packed"][0],
            "packed_over_padded_speed": out["padded"][0] / out["packed"][0],
            "max_abs_score_diff": float(np.max(np.abs(out["packed"][1] - out["padded"][1]))),
        }
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", choices=("real", "synthetic"), default="real")
    p.add_argument("--records", type=int, default=10000)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--shard-records", type=int, default=2048)
    p.add_argument("--workers", type=int, default=2, help="EncodePool worker processes for the encode figure")
    p.add_argument("--forward-batches", type=int, default=2, help="0 skips the model forward rate")
    p.add_argument("--packing-sample", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="coreselect-feed-"))
    if a.data == "real":
        pool, target = real_pool(a.records, tmp)
        rows = [json.loads(x) for x in pool.read_text(encoding="utf-8").splitlines()][: a.records]
        pool = write_jsonl(tmp / "pool-n.jsonl", rows)
    else:
        pool = write_jsonl(tmp / "pool.jsonl", synthetic_mix(a.records))
        target = write_jsonl(tmp / "target.jsonl", synthetic_mix(8, seed=1))
    load0 = os.getloadavg()
    res = feed_and_forward(
        a.model,
        pool,
        target,
        device=a.device,
        dtype=a.dtype,
        batch_tokens=a.batch_tokens,
        shard=a.shard_records,
        workers=a.workers,
        forward_batches=a.forward_batches,
        repeats=a.repeats,
        packing_sample=a.packing_sample,
    )
    from coreselect.data.formatting import Formatter
    from coreselect.data.readers import read_records
    from coreselect.models.loading import load_tokenizer, resolve_model

    lengths = np.array(
        [
            len(e)
            for e in Formatter(load_tokenizer(resolve_model(a.model), False), 2048).encode_many(
                list(read_records([str(pool)]))
            )
        ]
    )
    res["lengths_pct"] = dict(
        zip(
            ("p10", "p50", "p90", "p99", "max"),
            np.percentile(lengths, [10, 50, 90, 99, 100]).round().astype(int).tolist(),
        )
    )
    shards, budgets = (256, 1024, 2048, 4096, 16384), (4096, 8192, 16384, 65536)
    res["padding"] = {f"{s}x{b}": pad_efficiency(lengths, s, b) for s in shards for b in budgets}
    res["packing_eff"] = {f"{s}x{b}": pack_efficiency(lengths, s, b) for s in (2048,) for b in budgets}
    res["load"] = {"start": load0, "end": os.getloadavg()}
    print(
        f"\nmodel={a.model} data={a.data} records={res['records']} tokens={res['tokens']} device={res['device']} "
        f"dtype={res['dtype']} cores={res['cores']} torch_threads={res['torch_threads']} "
        f"load start={load0[0]:.2f} end={res['load']['end'][0]:.2f}"
    )
    print(f"lengths (tokens): {res['lengths_pct']}")
    print(f"{'measure':58s} {'value':>14s}")
    rows = [
        (f"(a) encode {k}: records/s | tokens/s", f"{v['records_per_s']:.0f} | {v['tokens_per_s']:.0f}")
        for k, v in res["encode"].items()
    ]
    f = res["feed"]
    rows += [
        ("(a) feed (no-op model): records/s", f"{f['records_per_s']:.0f}"),
        ("(a) feed: tokens/s", f"{f['tokens_per_s']:.0f}"),
        (f"(a) feed: tokens/s per core ({res['cores']} cores; goal >= 50000)", f"{f['tokens_per_s_per_core']:.0f}"),
        ("(a) host side only (read, encode, batch, collate): records/s", f"{res['feed_host']['records_per_s']:.0f}"),
        ("(a) host side only: tokens/s per core", f"{res['feed_host']['tokens_per_s_per_core']:.0f}"),
        ("(a) model forward tokens/s (sample batches)", f"{res['forward']['tokens_per_s']:.0f}"),
        ("(a) feed / forward rate", f"{res['feed_over_forward']:.1f}x"),
    ]
    for k, v in res["padding"].items():
        rows.append((f"(b) padding eff., shard x budget {k}", f"{v:.3f}"))
    for k, v in res["packing_eff"].items():
        rows.append((f"(b) packed eff., shard x budget {k}", f"{v:.3f}"))
    if "packing" in res:
        pk = res["packing"]
        rows += [
            (
                f"(c) packed / padded speed ({pk['records']} rec, {pk['tokens']} tok)",
                f"{pk['packed_over_padded_speed']:.3f}",
            ),
            ("(c) max |score packed - padded|", f"{pk['max_abs_score_diff']:.2e}"),
        ]
    for k, v in rows:
        print(f"{k:58s} {v:>14s}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
