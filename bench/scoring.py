"""Stage II scoring benchmark (run on demand: ``make bench`` or ``python bench/scoring.py``).

Measures, on the same records in one run:

a. TRIM Stage II throughput (tokens/s, tokenization included, background thread) vs a
   bare base-model forward pass over the very same token-budget batches -> ratio;
b. padding efficiency (real / padded tokens) of token-budget batching vs fixed-size
   batches in pool order, on a mixed-length pool;
c. peak RSS of a full ``select`` for pools of several sizes (one subprocess per size,
   ``resource.getrusage``), tiny model and short records;
d. TRIM vs LESS cost ratio when ``coreselect.methods.baselines.model_based.LESSMethod``
   exists (skipped otherwise).

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

WORDS = ("the sea apples bread scissors Friday answer plus divided eggs boxes fox forest translate poem meeting "
         "flour water yeast knead rise bake twelve thirty forty total half clips sold April May").split()


def build_tiny(out: Path, hidden: int = 64, layers: int = 4) -> Path:
    """A random-init Llama with a small trained byte-level BPE tokenizer (like the tests')."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                  "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    tk.train_from_iterator([" ".join(rng.choices(WORDS, k=30)) for _ in range(200)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
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
        rows.append({"id": str(i), "dataset": "synthetic",
                     "messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=u))},
                                  {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=a))}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def resolve_model(name: str, tmp: Path) -> str:
    return str(build_tiny(tmp / "tiny")) if name == "tiny" else name


# ----------------------------------------------------------------------------- (a) + (b)


def throughput(model: str, n_records: int, device: str, batch_tokens: int, tmp: Path) -> dict:
    import torch

    from coreselect.api import SelectArgs, load_context, read_records
    from coreselect.methods.trim import TrimConfig, TrimMethod
    from coreselect.models.runner import token_budget_batches

    pool = write_jsonl(tmp / "pool.jsonl", synth_records(n_records))
    target = write_jsonl(tmp / "target.jsonl", synth_records(8, seed=1))
    args = SelectArgs(pool=[str(pool)], target=[str(target)], out=str(tmp / "o"), model=model, warmup="none",
                      device=device, batch_tokens=batch_tokens, progress=False)
    ctx = load_context(args, tmp / "o", n_records)
    method = TrimMethod(ctx.runner, ctx.formatter, TrimConfig(layers=2, batch_tokens=batch_tokens,
                                                              chunk_records=args.shard_records), progress=False)
    method.fit(list(read_records([str(target)])))
    records = list(read_records([str(pool)]))
    encoded = [ctx.formatter.encode(r) for r in records]
    S = args.shard_records
    chunks = [list(range(i, min(i + S, len(encoded)))) for i in range(0, len(encoded), S)]
    batches = [[c[p] for p in b] for c in chunks for b in token_budget_batches([len(encoded[i]) for i in c],
                                                                               batch_tokens)]
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
    t_bare = min(bare() for _ in range(2))
    t_trim = min(trim() for _ in range(2))
    # (b) padding: token-budget batches (per chunk, longest first) vs fixed-size batches in pool order
    lengths = [len(e) for e in encoded]
    real = sum(lengths)
    padded_budget = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    size = max(1, round(len(lengths) / len(batches)))  # same number of batches
    fixed = [lengths[i:i + size] for i in range(0, len(lengths), size)]
    padded_fixed = sum(len(b) * max(b) for b in fixed)
    return {
        "records": n_records, "tokens": n_tok, "batches": len(batches), "fixed_batch_size": size,
        "bare_tokens_per_s": n_tok / t_bare, "trim_tokens_per_s": n_tok / t_trim, "ratio": t_bare / t_trim,
        "pad_eff_token_budget": real / padded_budget, "pad_eff_fixed": real / padded_fixed,
        "device": str(ctx.runner.device), "dtype": str(next(ctx.model.parameters()).dtype),
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
    info = select(SelectArgs(pool=[str(pool)], target=[str(target)], out=str(tmp / f"out-{n}"), model=model,
                             warmup="none", layers=1, budget="1%", batch_tokens=batch_tokens, progress=False,
                             device="cpu"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"records": n, "peak_rss_mib": peak, "rss_after_imports_mib": rss0,
                      "wall_s": time.perf_counter() - t, "tokens": info["stats"]["stage2"]["tokens"]}))


def rss_sweep(sizes: list[int], model: str, batch_tokens: int, tmp: Path) -> list[dict]:
    out = []
    for n in sizes:
        proc = subprocess.run([sys.executable, __file__, "--_rss-child", str(n), "--model", model,
                               "--batch-tokens", str(batch_tokens), "--_tmp", str(tmp)],
                              capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  rss {n}: {out[-1]}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- (d)


def less_ratio() -> str:
    try:
        from coreselect.methods.baselines.model_based import LESSMethod  # noqa: F401
    except ImportError:
        return "skipped (no coreselect.methods.baselines.model_based.LESSMethod)"
    return "LESSMethod present; hook not wired yet"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (random-init, built here), smollm2, or a model path")
    p.add_argument("--records", type=int, default=400, help="records for (a) and (b)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--rss-sizes", default="1000,10000,100000", help="pool sizes for (c); empty to skip")
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
        res = {"model": a.model, "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
        res["throughput"] = throughput(model, a.records, a.device, a.batch_tokens, tmp)
        sizes = [int(s) for s in a.rss_sizes.split(",") if s.strip()]
        tiny = model if a.model == "tiny" else str(build_tiny(tmp / "tiny-rss", hidden=32, layers=1))
        res["rss"] = rss_sweep(sizes, tiny if a.model == "tiny" else tiny, a.batch_tokens, tmp) if sizes else []
        res["less"] = less_ratio()
    t = res["throughput"]
    print(f"\nmodel={a.model} device={t['device']} dtype={t['dtype']} torch_threads={t['torch_threads']} "
          f"cpus={res['cpu_count']} records={t['records']} tokens={t['tokens']} batch_tokens={a.batch_tokens}")
    print(f"{'measure':48s} {'value':>12s}")
    rows = [
        ("(a) bare forward tokens/s", f"{t['bare_tokens_per_s']:.0f}"),
        ("(a) TRIM Stage II tokens/s", f"{t['trim_tokens_per_s']:.0f}"),
        ("(a) TRIM / bare throughput ratio (target >= 0.9)", f"{t['ratio']:.3f}"),
        ("(b) padding eff., token-budget batches", f"{t['pad_eff_token_budget']:.3f}"),
        (f"(b) padding eff., fixed {t['fixed_batch_size']}-record batches", f"{t['pad_eff_fixed']:.3f}"),
        ("(b) ratio token-budget / fixed", f"{t['pad_eff_token_budget'] / t['pad_eff_fixed']:.2f}x"),
    ]
    rows += [(f"(c) peak RSS, {r['records']} records (MiB)", f"{r['peak_rss_mib']:.0f}") for r in res["rss"]]
    rows += [("(d) TRIM vs LESS cost", res["less"])]
    for k, v in rows:
        print(f"{k:48s} {v:>12s}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
