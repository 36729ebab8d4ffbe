"""A small evaluation engine that scores like lm-evaluation-harness (HFLM backend).

* Multiple choice: the log-likelihood of each choice ``" " + choice`` given the few-shot
  context, tokenized the lm-eval way (trailing context spaces move to the continuation;
  the whole string is encoded and split at the context's token length). ``acc`` takes the
  argmax log-likelihood, ``acc_norm`` the argmax of log-likelihood / ``len(choice)`` in
  characters (lm-eval's definition).
* Generation (GSM8K): greedy decoding until a stop string; exact match on the final
  number (:func:`extract_number`), compared as numbers.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

from coreselect.errors import ConfigError
from coreselect.eval.tasks import Item, Task
from coreselect.io import write_json
from coreselect.progress import progress_bar

__all__ = ["evaluate", "extract_number", "numbers_equal", "encode_pair", "loglikelihoods", "generate", "write_eval"]

# a number: optional minus (not glued to a preceding word/number, so "3-4" gives 3 and 4),
# optional "$", digits with thousands commas, optional decimals
_NUM = re.compile(r"(?:(?<![\w.\-])-)?\$?\s?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"the (?:final )?answer is", re.IGNORECASE)


def _clean_number(s: str) -> str:
    neg = s.lstrip().startswith("-")
    digits = s.replace("-", "").replace("$", "").replace(",", "").strip().rstrip(".")
    return ("-" if neg else "") + digits


def extract_number(text: str) -> str | None:
    """The final numeric answer of a solution, or ``None``.

    Looks after the last ``####`` first, then after the last "The answer is", else takes
    the last number in the text. Commas, ``$`` and a trailing ``.`` are removed:
    ``"#### 1,234"`` -> ``"1234"``, ``"The answer is $18."`` -> ``"18"``,
    ``"she has 5.0 apples"`` -> ``"5.0"``, ``"#### -3"`` -> ``"-3"``.
    """
    ends = [text.rfind("####") + 4] if "####" in text else []
    ends += [m.end() for m in _ANSWER_IS.finditer(text)][-1:]
    for end in ends:
        m = _NUM.search(text, end)
        if m:
            return _clean_number(m.group())
    nums = _NUM.findall(text)
    return _clean_number(nums[-1]) if nums else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Numeric equality of two extracted answers (``"5.0" == "5"``); strings otherwise."""
    if a is None or b is None:
        return False
    try:
        return Decimal(_clean_number(a)) == Decimal(_clean_number(b))
    except InvalidOperation:
        return a.strip() == b.strip()


# --------------------------------------------------------------------------- log-likelihood


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for causal models: encode the whole string, split at the context."""
    if not context:  # lm-eval conditions an empty context on BOS (else EOS), unless already there
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


def _max_length(model: Any) -> int:
    cfg = model.config
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, k, None) or getattr(getattr(cfg, "text_config", None), k, None)
        if isinstance(v, int) and 0 < v < 1_000_000:
            return v
    return 2048


def _pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    return int(pid if pid is not None else tokenizer.eos_token_id or 0)


def loglikelihoods(model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], *, batch_size: int = 8,
                   progress: bool = True, desc: str = "loglik") -> list[float]:
    """Sum of log-probs of each continuation's tokens given its context (lm-eval semantics).

    Sequences are sorted by length, right-padded in batches, left-truncated to the model's
    maximum length; log-softmax is taken only at continuation positions (and, where the
    model supports ``logits_to_keep``, logits are only computed for the batch's tail).
    """
    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    max_len = _max_length(model)
    enc = []
    for ctx, cont in requests:
        c, k = encode_pair(tokenizer, ctx, cont)
        if not k:
            raise ConfigError(f"empty continuation {cont!r} after tokenization")
        if len(k) > max_len:
            raise ConfigError(f"continuation of {len(k)} tokens exceeds the model's maximum length {max_len}")
        enc.append(((c + k)[-(max_len + 1):][:-1], k))
    order = sorted(range(len(enc)), key=lambda i: -(len(enc[i][0]) + 1))
    device = next(model.parameters()).device
    keep_ok = "logits_to_keep" in inspect.signature(model.forward).parameters
    pad = _pad_id(tokenizer)
    out = [0.0] * len(enc)
    with torch.inference_mode(), progress_bar(len(enc), desc, progress) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            lens = [len(enc[i][0]) for i in idx]
            width = max(lens)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :lens[r]] = torch.tensor(enc[i][0])
                mask[r, :lens[r]] = 1
            first = min(n - len(enc[i][1]) for n, i in zip(lens, idx))
            kw: dict[str, Any] = {}
            if keep_ok and first > 0:
                kw["logits_to_keep"] = torch.arange(first, width, device=device)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kw).logits
            offset = first if "logits_to_keep" in kw else 0
            for r, i in enumerate(idx):
                cont = enc[i][1]
                lo = lens[r] - len(cont) - offset
                lp = torch.log_softmax(logits[r, lo:lo + len(cont)].float(), dim=-1)
                tgt = torch.tensor(cont, device=lp.device).unsqueeze(-1)
                out[i] = float(lp.gather(-1, tgt).sum())
            bar.update(len(idx), tokens=sum(lens))
    return out


# --------------------------------------------------------------------------- generation


def generate(model: Any, tokenizer: Any, contexts: Sequence[str], *, stop: Sequence[str], max_new_tokens: int = 256,
             batch_size: int = 8, progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations, cut at the first stop string (left-padded batches, length-sorted)."""
    max_len = _max_length(model)
    enc = [tokenizer(c)["input_ids"][-max(1, max_len - max_new_tokens):] for c in contexts]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    out = [""] * len(enc)
    with torch.inference_mode(), progress_bar(len(enc), desc, progress) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
                mask[r, width - len(enc[i]):] = 1
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                stop_strings=list(stop), tokenizer=tokenizer,
            )
            for r, i in enumerate(idx):
                text = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
                for s in stop:
                    text = text.split(s)[0]
                out[i] = text
            bar.update(len(idx), tokens=int(gen[:, width:].numel()))
    return out


# --------------------------------------------------------------------------- evaluate


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda j: xs[j])  # first maximum, like numpy.argmax


def score_mc(items: Sequence[Item], logliks: Sequence[Sequence[float]]) -> tuple[float, float, list[dict[str, Any]]]:
    """``(acc, acc_norm, per_item)`` from each item's choice log-likelihoods."""
    rows, acc, norm = [], 0, 0
    for it, ll in zip(items, logliks):
        pred = _argmax(ll)
        pred_norm = _argmax([x / max(len(c), 1) for x, c in zip(ll, it.choices)])
        acc += pred == it.answer
        norm += pred_norm == it.answer
        rows.append({"id": it.id, "answer": it.answer, "pred": pred, "pred_norm": pred_norm,
                     "correct": pred == it.answer, "logliks": list(ll)})
    n = max(len(rows), 1)
    return acc / n, norm / n, rows


def evaluate(model: Any, tokenizer: Any, task: Task, *, shots: int, limit: int | None = None, batch_size: int = 8,
             seed: int = 0, progress: bool = True, max_new_tokens: int = 256) -> dict[str, Any]:
    """Evaluate ``model`` on ``task`` with ``shots`` fixed exemplars (drawn with ``seed``).

    Returns ``{"task", "kind", "n", "shots", "acc", "acc_stderr", "acc_norm" (mc),
    "exact_match" (gen), "per_item"}``; ``limit`` keeps the first items only.
    """
    items = task.items[:limit] if limit is not None else task.items
    if not items:
        raise ConfigError(f"task {task.name}: no test items to evaluate")
    exemplars = task.fewshot(shots, seed)
    contexts = [task.context(it, exemplars) for it in items]
    res: dict[str, Any] = {"task": task.name, "kind": task.kind, "n": len(items), "shots": shots, "seed": seed}
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        if task.kind == "mc":
            reqs = [(ctx, " " + c) for ctx, it in zip(contexts, items) for c in it.choices]
            flat = loglikelihoods(model, tokenizer, reqs, batch_size=batch_size, progress=progress, desc=task.name)
            lls, pos = [], 0
            for it in items:
                lls.append(flat[pos:pos + len(it.choices)])
                pos += len(it.choices)
            acc, acc_norm, rows = score_mc(items, lls)
            res.update(acc=acc, acc_stderr=_stderr(acc, len(items)), acc_norm=acc_norm,
                       acc_norm_stderr=_stderr(acc_norm, len(items)), per_item=rows)
        else:
            gens = generate(model, tokenizer, contexts, stop=task.stop, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, progress=progress, desc=task.name)
            rows = []
            for it, g in zip(items, gens):
                pred = extract_number(g)
                ok = numbers_equal(pred, str(it.answer))
                rows.append({"id": it.id, "answer": it.answer, "pred": pred, "correct": ok,
                             "generation": g})
            em = sum(r["correct"] for r in rows) / len(rows)
            res.update(acc=em, acc_stderr=_stderr(em, len(rows)), exact_match=em, per_item=rows)
    finally:
        if was_training:
            model.train()
    return res


def write_eval(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``result`` to ``out_dir/eval.json`` atomically; return the path."""
    path = Path(out_dir) / "eval.json"
    write_json(path, result)
    return path
