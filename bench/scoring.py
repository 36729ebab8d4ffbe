"""Stage II scoring benchmark (run on demand: ``make bench`` or ``python bench/scoring.py``).

Measures, on the same records in one run:

a. TRIM Stage II throughput (tokens/s, tokenization included, background thread) vs a
   bare base-model forward pass over the very same token-budget batches -> ratio;
b. padding efficiency (real / padded tokens) of token-budget batching vs fixed-size
   batches in pool order, on a mixed-length pool;
c. peak RSS of a full ``select`` for pools of several sizes (one subprocess per size,
   ``resource.getrusage``), tiny model and short records;
d. TRIM vs LESS total selection cost on one pool and model: one shared LoRA warmup
   (>= 2 epoch-end checkpoints), then ``select`` with ``trim`` and with ``less`` reusing it;
   wall times and forward / backward passes from each ``run.json``, and LESS / TRIM ratios
   (scoring only, with the shared warmup, end to end). ``--less-records 0`` skips it.

``--records 0`` skips (a) and (b); ``--rss-sizes ''`` skips (c).

``--model tiny`` (default) builds a random-init Llama + trained BPE tokenizer in a temp
folder; ``--model smollm2`` uses the packaged SmolLM2-135M; any other value is passed to
``load_model``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = [
    "the",
    "sea",
    "apples",
    "bread",
    "scissors",
    "Friday",
    "answer",
    "plus",
    "divided",
    "eggs",
    "boxes",
    "fox",
    "forest",
    "translate",
    "poem",
    "meeting",
    "flour",
    "water",
    "yeast",
    "knead",
    "rise",
    "bake",
    "twelve",
    "thirty",
    "forty",
    "total",
    "half",
    "clips",
    "sold",
    "April",
    "May",
]


def chat_bpe_tokenizer(out: Path, vocab_size: int, n_texts: int, words_per_text: int) -> Any:
    """A byte-level BPE with a ChatML template, trained on seeded texts of :data:`WORDS`, saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = random.Random(0)
    tk.train_from_iterator([" ".join(rng.choices(WORDS, k=words_per_text)) for _ in range(n_texts)], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.save_pretrained(out)
    return tok


def build_tiny(out: Path, hidden: int = 64, layers: int = 4) -> Path:
    """A random-init Llama with a small trained byte-level BPE tokenizer (like the tests')."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = chat_bpe_tokenizer(out, vocab_size=400, n_texts=200, words_per_text=30)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def synth_records(n: int, seed: int = 0, short: bool = False) -> list[dict]:
    """Chat records with a mixed (log-uniform-ish) length distribution, or short ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if short:
            u, a = rng.randint(3, 8), rng.randint(3, 8)
        else:
            u, a = int(4 * 2 ** rng.uniform(0, 4)), int(4 * 2 ** rng.uniform(0, 6.5))
        rows.append(
            {
                "id": str(i),
                "dataset": "synthetic",
                "messages": [
                    {"role": "user", "content": " ".join(rng.choices(WORDS, k=u))},
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=a))},
                ],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def resolve_model(name: str, tmp: Path) -> str:
    return str(build_tiny(tmp / "tiny")) if name == "tiny" else name


# ----------------------------------------------------------------------------- (a) + (b)


def real_records(n: int, tmp: Path) -> tuple[list[dict], list[dict]]:
    """``n`` real mixed records of the packaged pool (MC, GSM8K, MATH, ShareGPT; shuffled) and
    the 5 GSM8K targets (needs the data packages, see ``coreselect.assets``)."""
    from coreselect.assets import build_embedded_data

    paths = build_embedded_data(tmp / "real-data", n_per_source=max(60, (n + 7) // 8))
    rows = [json.loads(x) for x in paths["pool"].read_text(encoding="utf-8").splitlines()][:n]
    return rows, [json.loads(x) for x in paths["target_gsm8k"].read_text(encoding="utf-8").splitlines()]


def throughput(
    model: str, n_records: int, device: str, batch_tokens: int, tmp: Path, real: bool = False, repeats: int = 2
) -> dict:
    """Stage II vs bare forward on the same token-budget batches, interleaved, best of ``repeats``."""
    import torch

    from coreselect.api import SelectArgs, load_context
    from coreselect.data.readers import read_records
    from coreselect.methods.trim import TrimConfig, TrimMethod
    from coreselect.models.runner import token_budget_batches

    tag = "real" if real else "synth"
    pool_rows, target_rows = (
        real_records(n_records, tmp) if real else (synth_records(n_records), synth_records(8, seed=1))
    )
    pool = write_jsonl(tmp / f"pool-{tag}.jsonl", pool_rows)
    target = write_jsonl(tmp / f"target-{tag}.jsonl", target_rows)
    args = SelectArgs(
        pool=[str(pool)],
        target=[str(target)],
        out=str(tmp / "o"),
        model=model,
        warmup="none",
        device=device,
        batch_tokens=batch_tokens,
        progress=False,
    )
    ctx = load_context(args, tmp / "o", n_records)
    method = TrimMethod(
        ctx.runner,
        ctx.formatter,
        TrimConfig(layers=2, batch_tokens=batch_tokens, chunk_records=args.shard_records),
        progress=False,
    )
    method.fit(list(read_records([str(target)])))
    records = list(read_records([str(pool)]))
    encoded = [ctx.formatter.encode(r) for r in records]
    S = args.shard_records
    chunks = [list(range(i, min(i + S, len(encoded)))) for i in range(0, len(encoded), S)]
    batches = [
        [c[p] for p in b] for c in chunks for b in token_budget_batches([len(encoded[i]) for i in c], batch_tokens)
    ]
    n_tok = sum(len(e) for e in encoded)

    def sync() -> None:
        if ctx.runner.device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> float:
        t = time.perf_counter()
        for b in batches:
            ctx.runner.hidden(ctx.runner.collate(encoded, b))
        sync()
        return time.perf_counter() - t

    def trim() -> float:
        t = time.perf_counter()
        for _ in method.score_chunks(records):
            pass
        sync()
        return time.perf_counter() - t

    bare()  # warm up kernels / allocator
    tb, tt = [], []
    for _ in range(repeats):  # interleaved, so that a load change hits both
        tb.append(bare())
        tt.append(trim())
    t_bare, t_trim = min(tb), min(tt)
    # (b) padding: token-budget batches (per chunk, longest first) vs fixed-size batches in pool order
    lengths = [len(e) for e in encoded]
    real = sum(lengths)
    padded_budget = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    size = max(1, round(len(lengths) / len(batches)))  # same number of batches
    fixed = [lengths[i : i + size] for i in range(0, len(lengths), size)]
    padded_fixed = sum(len(b) * max(b) for b in fixed)
    return {
        "data": tag,
        "batch_tokens": batch_tokens,
        "bare_s": tb,
        "trim_s": tt,
        "load": os.getloadavg(),
        "records": n_records,
        "tokens": n_tok,
        "batches": len(batches),
        "fixed_batch_size": size,
        "bare_tokens_per_s": n_tok / t_bare,
        "trim_tokens_per_s": n_tok / t_trim,
        "ratio": t_bare / t_trim,
        "pad_eff_token_budget": real / padded_budget,
        "pad_eff_fixed": real / padded_fixed,
        "device": str(ctx.runner.device),
        "dtype": str(next(ctx.model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- (c)


def rss_child(n: int, model: str, batch_tokens: int, tmp: Path) -> None:
    """One full ``select`` on ``n`` short records; prints peak RSS (MiB) as JSON."""
    from coreselect.api import SelectArgs, select

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pool = write_jsonl(tmp / f"pool-{n}.jsonl", synth_records(n, short=True))
    target = write_jsonl(tmp / "target.jsonl", synth_records(8, seed=1, short=True))
    t = time.perf_counter()
    info = select(
        SelectArgs(
            pool=[str(pool)],
            target=[str(target)],
            out=str(tmp / f"out-{n}"),
            model=model,
            warmup="none",
            layers=1,
            budget="1%",
            batch_tokens=batch_tokens,
            progress=False,
            device="cpu",
        )
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "records": n,
                "peak_rss_mib": peak,
                "rss_after_imports_mib": rss0,
                "wall_s": time.perf_counter() - t,
                "tokens": info["stats"]["stage2"]["tokens"],
            }
        )
    )


def rss_sweep(sizes: list[int], model: str, batch_tokens: int, tmp: Path) -> list[dict]:
    out = []
    for n in sizes:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--_rss-child",
                str(n),
                "--model",
                model,
                "--batch-tokens",
                str(batch_tokens),
                "--_tmp",
                str(tmp),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  rss {n}: {out[-1]}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- (d)


def less_vs_trim(
    model: str,
    n_records: int,
    device: str,
    batch_tokens: int,
    tmp: Path,
    *,
    warmup_fraction: float = 0.25,
    warmup_epochs: float = 2.0,
    lora_r: int = 8,
    short: bool = False,
    max_length: int = 2048,
    layers: int = 6,
) -> dict:
    """TRIM vs LESS total selection cost on the same pool, model and warmup.

    One shared LoRA warmup (``warmup_model``: ``warmup_fraction`` of the pool, ``warmup_epochs``
    epochs, a checkpoint at every epoch end, so >= 2 checkpoints for LESS), then
    ``select(method="trim")`` and ``select(method="less")`` both with
    ``warmup=<tmp>/less-warm/warmup/adapter``; LESS finds the ``checkpoint-*`` folders beside it.
    Figures come from each run's ``run.json`` (``timings``, ``cost``).
    """
    from coreselect.api import SelectArgs, scan_pool, select, warmup_model

    pool = write_jsonl(tmp / "less-pool.jsonl", synth_records(n_records, seed=2, short=short))
    target = write_jsonl(tmp / "less-target.jsonl", synth_records(8, seed=3, short=short))
    common = {
        "pool": [str(pool)],
        "target": [str(target)],
        "model": model,
        "device": device,
        "batch_tokens": batch_tokens,
        "max_length": max_length,
        "warmup_fraction": warmup_fraction,
        "warmup_epochs": warmup_epochs,
        "warmup_lora_r": lora_r,
        "warmup_lora_alpha": 4 * lora_r,
        "warmup_lr": 1e-4,
        "warmup_batch_size": 2,
        "warmup_grad_accum": 2,
        "budget": "10%",
        "layers": layers,
        "progress": False,
    }
    wargs = SelectArgs(out=str(tmp / "less-warm"), warmup="auto", **common)
    n_pool, _ = scan_pool(wargs)
    t = time.perf_counter()
    adapter, winfo = warmup_model(wargs, tmp / "less-warm", n_pool)
    w_wall = time.perf_counter() - t
    runs = {}
    for method in ("trim", "less"):
        info = select(SelectArgs(out=str(tmp / f"less-{method}"), method=method, warmup=str(adapter), **common))
        tm, cost = info["timings"], info["cost"]
        runs[method] = {
            "fit_s": tm["fit_s"],
            "score_s": tm["score_s"],
            "scoring_s": tm["fit_s"] + tm["score_s"],
            "total_s": tm["total_s"],
            "forward_passes": cost["forward_passes"],
            "backward_passes": cost["backward_passes"],
            "peak_memory_mb": cost["peak_memory_mb"],
        }
        if method == "less":
            runs[method]["checkpoints"] = len(info["method_settings"]["checkpoints"])
            runs[method]["feature_dim"] = info["method_settings"]["feature_dim"]
            runs[method]["pool_gradient"] = info["method_settings"]["pool_gradient"]
        print(f"  (d) {method}: {runs[method]}", file=sys.stderr)
    n_w = int(winfo.get("n_records", 0))
    warm = {
        "wall_s": w_wall,
        "records": n_w,
        "epochs": warmup_epochs,
        "steps": winfo.get("steps"),
        "checkpoints": len(winfo.get("checkpoints", [])),
        "lora_r": lora_r,
        # every warmup record is one forward + one backward per epoch (micro-batches of 2)
        "record_fwd_bwd": int(round(n_w * warmup_epochs)),
    }
    tr, le = runs["trim"], runs["less"]
    return {
        "model": model,
        "records": n_records,
        "trim_layers": layers,
        "target": 8,
        "short": short,
        "warmup": warm,
        "trim": tr,
        "less": le,
        "ratio_scoring": le["scoring_s"] / tr["scoring_s"],
        "ratio_with_warmup": (w_wall + le["scoring_s"]) / (w_wall + tr["scoring_s"]),
        "ratio_end_to_end": (w_wall + le["total_s"]) / (w_wall + tr["total_s"]),
    }


def less_rows(d: dict) -> list[tuple[str, str]]:
    w, tr, le = d["warmup"], d["trim"], d["less"]
    tag = f"[{d['model'] if len(d['model']) < 12 else 'model'}, {d['records']} rec]"
    return [
        (f"(d) {tag} shared warmup wall (s)", f"{w['wall_s']:.1f}"),
        (
            "(d)   warmup: records x epochs, steps, ckpts",
            f"{w['records']}x{w['epochs']:g},{w['steps']},{w['checkpoints']}",
        ),
        ("(d)   TRIM Stage I+II wall (s)", f"{tr['scoring_s']:.2f}"),
        ("(d)   TRIM fwd / bwd passes", f"{tr['forward_passes']}/{tr['backward_passes']}"),
        ("(d)   LESS scoring wall (fit+score) (s)", f"{le['scoring_s']:.2f}"),
        (f"(d)   LESS fwd / bwd passes ({le['checkpoints']} ckpts)", f"{le['forward_passes']}/{le['backward_passes']}"),
        ("(d)   LESS / TRIM, scoring only", f"{d['ratio_scoring']:.1f}x"),
        ("(d)   LESS / TRIM, incl. shared warmup", f"{d['ratio_with_warmup']:.2f}x"),
        ("(d)   LESS / TRIM, end to end (+ loads, I/O)", f"{d['ratio_end_to_end']:.2f}x"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (random-init, built here), smollm2, or a model path")
    p.add_argument("--records", type=int, default=400, help="records for (a) and (b)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument(
        "--real",
        type=int,
        default=160,
        help="also measure (a) on this many real packaged records (0 skips; needs the data packages)",
    )
    p.add_argument(
        "--real-budgets",
        default="",
        help="comma-separated --batch-tokens values for the real-record (a) (default: --batch-tokens)",
    )
    p.add_argument("--repeats", type=int, default=2, help="interleaved bare / Stage II repeats in (a)")
    p.add_argument("--rss-sizes", default="1000,10000,100000", help="pool sizes for (c); empty to skip")
    p.add_argument("--less-records", type=int, default=60, help="pool size for (d) TRIM vs LESS; 0 to skip")
    p.add_argument("--less-model", help="model for (d) (default: --model)")
    p.add_argument("--less-short", action="store_true", help="(d) on short records (3-8 words per turn)")
    p.add_argument("--less-max-length", type=int, default=2048, help="(d) truncate records to this many tokens")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_rss-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._rss_child:
        rss_child(a._rss_child, a.model, a.batch_tokens, Path(a._tmp))
        return
    import torch

    with tempfile.TemporaryDirectory(prefix="coreselect-bench-") as d:
        tmp = Path(d)
        model = resolve_model(a.model, tmp)
        res = {
            "model": a.model,
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
        }
        res["throughput"] = (
            throughput(model, a.records, a.device, a.batch_tokens, tmp, repeats=a.repeats) if a.records > 0 else None
        )
        budgets = [int(b) for b in a.real_budgets.split(",") if b.strip()] or [a.batch_tokens]
        res["real"] = (
            [throughput(model, a.real, a.device, b, tmp, real=True, repeats=a.repeats) for b in budgets]
            if a.real > 0
            else []
        )
        sizes = [int(s) for s in a.rss_sizes.split(",") if s.strip()]
        tiny = model if a.model == "tiny" else str(build_tiny(tmp / "tiny-rss", hidden=32, layers=1)) if sizes else ""
        res["rss"] = rss_sweep(sizes, tiny, a.batch_tokens, tmp) if sizes else []
        if a.less_records > 0:
            lm = a.less_model or a.model
            lpath = model if lm == a.model else resolve_model(lm, tmp)
            res["less"] = less_vs_trim(
                lpath,
                a.less_records,
                a.device,
                a.batch_tokens,
                tmp,
                short=a.less_short,
                max_length=a.less_max_length,
                layers=2 if lm == "tiny" else 6,
            )
            res["less"]["model"] = lm
        else:
            res["less"] = None
        res["loadavg_end"] = os.getloadavg()
    print(
        f"\nmodel={a.model} torch_threads={res['torch_threads']} cpus={res['cpu_count']} "
        f"cuda={res['cuda']} batch_tokens={a.batch_tokens} loadavg start={res['loadavg_start'][0]:.2f} "
        f"end={res['loadavg_end'][0]:.2f}"
    )
    rows: list[tuple[str, str]] = []
    t = res["throughput"]
    if t:
        print(f"(a)/(b): device={t['device']} dtype={t['dtype']} records={t['records']} tokens={t['tokens']}")
        rows += [
            ("(a) bare forward tokens/s", f"{t['bare_tokens_per_s']:.0f}"),
            ("(a) TRIM Stage II tokens/s", f"{t['trim_tokens_per_s']:.0f}"),
            ("(a) TRIM / bare throughput ratio (target >= 0.9)", f"{t['ratio']:.3f}"),
            ("(b) padding eff., token-budget batches", f"{t['pad_eff_token_budget']:.3f}"),
            (f"(b) padding eff., fixed {t['fixed_batch_size']}-record batches", f"{t['pad_eff_fixed']:.3f}"),
            ("(b) ratio token-budget / fixed", f"{t['pad_eff_token_budget'] / t['pad_eff_fixed']:.2f}x"),
        ]
    for r in res["real"]:
        tag = f"[real, {r['records']} rec, {r['tokens']} tok, budget {r['batch_tokens']}]"
        rows += [
            (f"(a) {tag} bare tokens/s", f"{r['bare_tokens_per_s']:.0f}"),
            ("(a)   TRIM Stage II tokens/s", f"{r['trim_tokens_per_s']:.0f}"),
            ("(a)   TRIM / bare (target >= 0.95)", f"{r['ratio']:.3f}"),
            ("(a)   load average during it", f"{r['load'][0]:.2f}"),
        ]
    rows += [(f"(c) peak RSS, {r['records']} records (MiB)", f"{r['peak_rss_mib']:.0f}") for r in res["rss"]]
    if res["less"]:
        rows += less_rows(res["less"])
    print(f"{'measure':52s} {'value':>14s}")
    for k, v in rows:
        print(f"{k:52s} {v:>14s}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
