"""Where does a model's held-out loss on lettered multiple-choice answers come from? (issue 15)

A held-out answer such as "C. chicken" is a letter, a period and the option's text (copied
from the prompt), then the end of turn. The held-out loss (:mod:`coreselect.eval.heldout`)
is the mean over those tokens. This script splits it, per example, into the loss of the
first response token (the letter: the only token that needs the task's knowledge) and the
mean loss of the rest, and reports how often the letter is the model's top choice and how
the letter loss compares with guessing uniformly among the options (ln of their count).

    python scripts/answer_loss.py --model smollm2 --dtype bfloat16 \\
        --heldout ~/.cache/coreselect/data/evidence-500/heldout_csqa.jsonl \\
        --adapter runs/table1-cpu/in_domain/joint/train/trim-5pct-s0/adapter  # repeatable; none: pretrained

Records are formatted exactly as for training and for the held-out loss
(:class:`coreselect.data.formatting.Formatter`, response tokens only).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from coreselect.data.formatting import Formatter
from coreselect.data.readers import read_records
from coreselect.models.loading import load_model


def example_split(model, fmt: Formatter, rec) -> tuple[float, float, bool, int, int] | None:
    """``(letter loss, mean loss of the other response tokens, letter is top-1, response tokens,
    options)`` of one record; None when it has fewer than two response tokens."""
    enc = fmt.encode(rec)
    ids = torch.as_tensor(enc.input_ids, dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    targets = ids[0, 1:]
    mask = torch.as_tensor(enc.loss_mask[1:], dtype=torch.bool)  # logits[i] predicts token i + 1
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[mask]
    if len(nll) < 2:
        return None
    first = int(mask.nonzero()[0])
    hit = int(logits[first].argmax()) == int(targets[first])
    n_opts = len(re.findall(r"^[A-Z]\. ", rec.messages[0].content, flags=re.M))
    return float(nll[0]), float(nll[1:].mean()), hit, len(nll), n_opts


def split_losses(model, fmt: Formatter, path: str) -> dict[str, float]:
    """Mean letter loss, mean rest loss, letter top-1 rate and mean ln(options) over the file's records."""
    rows = [r for r in (example_split(model, fmt, rec) for rec in read_records([path])) if r is not None]
    n = len(rows)
    return {
        "n": n,
        "letter": sum(r[0] for r in rows) / n,
        "rest": sum(r[1] for r in rows) / n,
        "top1": sum(r[2] for r in rows) / n,
        "chance": sum(math.log(max(r[4], 1)) for r in rows) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--heldout", action="append", required=True, help="held-out JSONL (repeatable)")
    ap.add_argument("--adapter", action="append", default=[], help="LoRA adapter folder (repeatable)")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    print("| Model | Task | n | letter loss | ln(options) | letter top-1 | rest loss |")
    print("|---|---|---|---|---|---|---|")
    for adapter in [None, *args.adapter]:
        model, tok = load_model(args.model, dtype=args.dtype, adapter=adapter)
        fmt = Formatter(tok, args.max_length)
        name = "pretrained" if adapter is None else "/".join(Path(adapter).parts[-5:-1])
        for path in args.heldout:
            r = split_losses(model, fmt, path)
            task = Path(path).stem.removeprefix("heldout_")
            print(
                f"| {name} | {task} | {r['n']} | {r['letter']:.3f} | {r['chance']:.3f} | "
                f"{100 * r['top1']:.1f}% | {r['rest']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
