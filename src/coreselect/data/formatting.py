"""Format records into token ids and know, for every token, what part it belongs to.

Every token gets a *scope code*:

* ``TEMPLATE`` (0): template text, role headers, BOS/EOS/PAD and every other special or
  control token. Never fingerprinted or scored (paper App. B.1, eq. 14).
* ``PROMPT`` (1): the content of a system or user message.
* ``RESPONSE`` (2): the content of an assistant message (all of a ``text`` record).

How: the conversation is rendered to a string (the tokenizer's chat template when it has
one, else a plain ``<|user|>`` / ``<|assistant|>`` template), each message's content is
located in that string, and the fast tokenizer's offset mapping assigns each token to the
content span it overlaps. Special token ids are forced to ``TEMPLATE`` whatever their span.

For training (loss on response tokens only) :attr:`Encoded.loss_mask` also marks the
end-of-turn token that closes each assistant message, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError

TEMPLATE, PROMPT, RESPONSE = 0, 1, 2
Scope = Literal["all", "prompt", "response"]
TemplateChoice = Literal["auto", "chat", "plain"]

PLAIN_ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


def scope_mask(codes: np.ndarray, scope: Scope) -> np.ndarray:
    """Bool mask of the tokens a scope selects (``all`` = prompt and response, never template)."""
    if scope == "all":
        return codes != TEMPLATE
    if scope == "prompt":
        return codes == PROMPT
    if scope == "response":
        return codes == RESPONSE
    raise ConfigError(f"unknown scope {scope!r} (expected all, prompt or response)")


@dataclass
class Encoded:
    """One tokenized record.

    Attributes:
        index: the record's pool index.
        input_ids: ``[n]`` int64 token ids (after truncation).
        codes: ``[n]`` int8 scope codes (TEMPLATE / PROMPT / RESPONSE).
        loss_mask: ``[n]`` bool, positions whose token is a training target.
        n_original: token count before truncation.
    """

    index: int
    input_ids: np.ndarray
    codes: np.ndarray
    loss_mask: np.ndarray
    n_original: int

    @property
    def truncated(self) -> bool:
        return self.n_original > len(self.input_ids)

    def __len__(self) -> int:
        return int(len(self.input_ids))


class Formatter:
    """Renders and tokenizes records for one tokenizer.

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (offsets are required).
        max_length: records longer than this are truncated (keep the first tokens).
        template: ``auto`` (chat template if the tokenizer has one), ``chat`` or ``plain``.
    """

    def __init__(self, tokenizer: Any, max_length: int = 2048, template: TemplateChoice = "auto") -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("coreselect needs a fast tokenizer (offset mapping); this one is a slow tokenizer")
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {max_length}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ConfigError("template=chat but the tokenizer has no chat template")
        if template not in ("auto", "chat", "plain"):
            raise ConfigError(f"unknown template {template!r} (expected auto, chat or plain)")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.use_chat = template == "chat" or (template == "auto" and has_chat)
        self.special_ids = np.array(sorted(self._special_ids(tokenizer)), dtype=np.int64)

    @staticmethod
    def _special_ids(tok: Any) -> set[int]:
        ids = set(int(i) for i in (getattr(tok, "all_special_ids", None) or []))
        decoder = getattr(tok, "added_tokens_decoder", None) or {}
        for i, added in decoder.items():
            if getattr(added, "special", False):
                ids.add(int(i))
        return ids

    # ------------------------------------------------------------------ rendering
    def render(self, record: Record) -> tuple[str, list[tuple[int, int, int]]]:
        """Return the rendered text and ``(start, end, code)`` content spans, in order."""
        msgs = [{"role": m.role, "content": m.content} for m in record.messages]
        if record.kind == "text":
            text = record.messages[0].content
            eos = self.tokenizer.eos_token or ""
            return text + eos, [(0, len(text), RESPONSE)]
        if self.use_chat:
            try:
                text = self.tokenizer.apply_chat_template(msgs, tokenize=False)
            except Exception as e:  # jinja errors (e.g. a template that rejects system turns)
                raise CoreselectError(f"{record.file}:{record.line}: chat template failed: {e}") from None
        else:
            parts = []
            for m in msgs:
                parts.append(f"{PLAIN_ROLES[m['role']]}\n{m['content']}\n")
            text = "".join(parts) + (self.tokenizer.eos_token or "")
        spans: list[tuple[int, int, int]] = []
        cursor = 0
        for m in record.messages:
            needle = m.content.strip()
            if not needle:
                continue
            at = text.find(needle, cursor)
            if at < 0:
                raise CoreselectError(
                    f"{record.file}:{record.line}: the chat template changed a {m.role} message's text, "
                    "so prompt/response tokens cannot be located; use --template plain"
                )
            code = RESPONSE if m.role == "assistant" else PROMPT
            spans.append((at, at + len(needle), code))
            cursor = at + len(needle)
        return text, spans

    # ------------------------------------------------------------------ tokenizing
    def encode(self, record: Record) -> Encoded:
        """Tokenize one record with scope codes and the response-only loss mask."""
        text, spans = self.render(record)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        codes = np.zeros(len(ids), dtype=np.int8)
        loss = np.zeros(len(ids), dtype=bool)
        starts, ends = offsets[:, 0], offsets[:, 1]
        special = np.isin(ids, self.special_ids)
        for s, e, code in spans:
            inside = (starts < e) & (ends > s) & (ends > starts)
            codes[inside & ~special] = code
            if code == RESPONSE:
                loss[inside & ~special] = True
                # the end-of-turn token that closes this assistant message is a target too
                after = np.nonzero((starts >= e) & special)[0]
                if after.size:
                    loss[after[0]] = True
        codes[special] = TEMPLATE
        n = len(ids)
        m = self.max_length
        return Encoded(record.index, ids[:m], codes[:m], loss[:m], n)

    def token_strings(self, ids: list[int]) -> dict[int, str]:
        """Human-readable strings of token ids (for fingerprint files and reports)."""
        toks = self.tokenizer.convert_ids_to_tokens(list(ids))
        return {int(i): str(t) for i, t in zip(ids, toks)}
