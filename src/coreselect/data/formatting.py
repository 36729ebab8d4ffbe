"""Format records into token ids and know, for every token, what part it belongs to.

Every token gets a *scope code*:

* ``TEMPLATE`` (0): template text, role headers, BOS/EOS/PAD and every other special or
  control token. Never fingerprinted or scored (paper App. B.1, eq. 14).
* ``PROMPT`` (1): the content of a system or user message.
* ``RESPONSE`` (2): the content of an assistant message (all of a ``text`` record).

How: the conversation is rendered to a string, each message's content is located in that
string, and the fast tokenizer's offset mapping assigns each token to the content span it
overlaps. Special token ids are forced to ``TEMPLATE`` whatever their span.

Special tokens (the model must read records the way it was trained to read them):

* **Chat template** (``template=chat``, or ``auto`` on a tokenizer that has one): the template
  is rendered as written and tokenized with ``add_special_tokens=False``, exactly like
  ``tokenizer.apply_chat_template(messages, tokenize=True)``. A template that writes
  ``{{ bos_token }}`` (Llama 3, Gemma, Mistral) gets that BOS once; one that writes none (Qwen,
  SmolLM2) gets none.
* **Plain template and ``text`` records**: tokenized with the tokenizer's own special tokens,
  i.e. exactly what ``tokenizer(text)`` adds through its post-processor (BOS once for
  Llama-2/3, Mistral, Gemma; nothing for Qwen or SmolLM2). The plain template writes an EOS
  after every assistant turn itself (see :data:`PLAIN_FORMAT`); a ``text`` record gets one EOS
  at its end so that training learns to stop, unless the post-processor already appends EOS
  (``add_eos_token=True`` tokenizers), in which case that EOS is the only one.
* Special-token *strings inside record content* (a user who writes ``</s>`` or
  ``<|im_end|>``) are parsed by the tokenizer as the special tokens they name, as
  ``apply_chat_template`` and ``tokenizer(text)`` would: that is what a trainer feeds the
  model. They are coded ``TEMPLATE`` (never scored, never a training target).

Rendering is a pure function of the record and the tokenizer: chat templates get a fixed date
(``template_date``, default :data:`DEFAULT_TEMPLATE_DATE`) both as the ``date_string`` template
variable and through ``strftime_now``, and the first chat record a :class:`Formatter` renders
is rendered twice: a template that renders it differently (e.g. ``| random``) is refused.

For training (loss on response tokens only) :attr:`Encoded.loss_mask` also marks the
end-of-turn token that closes each assistant message, so the model learns to stop.

Hostile text: record content is passed to the tokenizer as is (NUL and other control
characters are legal text and are tokenized like any other character). Text that is not
valid Unicode (lone surrogates, which the JSON decoder accepts from ``"\\ud800"``) cannot be
tokenized or written back as UTF-8; the reader refuses such records
(:mod:`coreselect.data.readers`) and :meth:`Formatter.encode` raises
:class:`~coreselect.errors.BadRecordError` for any that reach it another way. Very long records
are tokenized only as far as needed (see :meth:`Formatter.encode`).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import ChainMap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from coreselect.data.records import Record
from coreselect.errors import BadRecordError, ConfigError, CoreselectError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; typing only

TEMPLATE, PROMPT, RESPONSE = 0, 1, 2
Scope = Literal["all", "prompt", "response"]
TemplateChoice = Literal["auto", "chat", "plain"]

PLAIN_ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
#: The plain template: LESS's ``concat_messages`` (Xia et al. 2024, ``less/data_selection/
#: get_training_dataset.py``), itself open-instruct's / Tulu's ``encode_with_messages_format``,
#: the format the TRIM paper inherits. Contents are stripped; ``{eos}`` is the tokenizer's EOS
#: string; the result is tokenized with ``tokenizer(text)`` (BOS where the tokenizer adds one),
#: e.g. ``<s><|user|>\nHi\n<|assistant|>\nHello</s>\n`` for Llama-2. One difference from LESS's
#: labels: the loss mask covers each response and its EOS, not the newline after that EOS.
PLAIN_FORMAT = {
    "system": "<|system|>\n{content}\n",
    "user": "<|user|>\n{content}\n",
    "assistant": "<|assistant|>\n{content}{eos}\n",
}
#: Chat templates see this date (Llama 3.1's own fallback when no ``date_string`` is passed),
#: so that a record renders the same on every day (fingerprints, resumed runs, shards).
DEFAULT_TEMPLATE_DATE = "26 Jul 2024"
_DATE_FORMATS = ("%d %b %Y", "%Y-%m-%d")
# Tokens kept clear of the cut when a very long text is tokenized by prefix (see _tokenize).
_CUT_MARGIN = 64
# Marks a message's content in a "skeleton" rendering (private-use code points: no real template
# writes them, and ``trim`` / ``strip`` leave them alone).
_SENTINEL = "\ue000coreselect{}\ue001"
_SURROGATE = re.compile("[\ud800-\udfff]")
_CLOCK_LOCK = threading.Lock()
log = logging.getLogger(__name__)


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad id, else its eos id, else 0.

    The one rule for every batch in coreselect (scoring, training, losses). Padded positions
    are masked out, so the choice never changes a score; it only has to be a valid id.
    """
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if v is not None:
            return int(v)
    return 0


def scope_mask(codes: np.ndarray, scope: Scope) -> np.ndarray:
    """Bool mask of the tokens a scope selects (``all`` = prompt and response, never template)."""
    if scope == "all":
        return codes != TEMPLATE
    if scope == "prompt":
        return codes == PROMPT
    if scope == "response":
        return codes == RESPONSE
    raise ConfigError(f"unknown scope {scope!r} (expected all, prompt or response)")


def parse_template_date(value: str) -> datetime:
    """Parse ``--template-date``: ``26 Jul 2024`` (Llama 3's ``date_string`` format) or ``2024-07-26``."""
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(str(value).strip(), fmt)
        except ValueError:
            continue
    raise ConfigError(f"template_date {value!r}: expected a date like '26 Jul 2024' or '2024-07-26'")


def surrogate_error(text: str) -> str | None:
    """A reason to refuse ``text`` if it holds a lone surrogate (not encodable as UTF-8), else None."""
    hit = _SURROGATE.search(text)
    if hit is None:
        return None
    return (
        f"lone surrogate U+{ord(hit.group()):04X} at character {hit.start()} "
        "(not valid Unicode, cannot be encoded as UTF-8)"
    )


@contextmanager
def _fixed_clock(template: str, date: datetime) -> Iterator[None]:
    """Make ``strftime_now`` inside ``template`` return ``date`` during one render.

    transformers compiles each chat template once (``_compile_jinja_template``, an lru_cache
    keyed by the template text) with a global ``strftime_now`` that reads the wall clock, and
    it turns any callable passed as a template variable into a placeholder string. So the only
    way to hand the template a fixed clock is to shadow that global on the compiled template,
    for the duration of our call (under a lock, restored afterwards).
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - a transformers that moved it
        raise ConfigError(
            "this chat template reads today's date (strftime_now) and this transformers "
            "version gives coreselect no way to fix it; use --template plain"
        ) from None

    def strftime_now(fmt: str) -> str:
        return date.strftime(fmt)

    with _CLOCK_LOCK:
        g = _compile_jinja_template(template).globals
        local = g.maps[0] if isinstance(g, ChainMap) else g
        had, old = "strftime_now" in local, local.get("strftime_now")
        local["strftime_now"] = strftime_now
        try:
            yield
        finally:
            if had:
                local["strftime_now"] = old
            else:
                local.pop("strftime_now", None)


@dataclass
class Encoded:
    """One tokenized record.

    Attributes:
        index: the record's pool index.
        input_ids: ``[n]`` int64 token ids (after truncation).
        codes: ``[n]`` int8 scope codes (TEMPLATE / PROMPT / RESPONSE).
        loss_mask: ``[n]`` bool, positions whose token is a training target.
        n_original: token count before truncation. For a text so long that only a prefix was
            tokenized (see :meth:`Formatter.encode`) it is the prefix's count: a lower bound,
            always > ``max_length``, so :attr:`truncated` stays exact.
        offsets: ``[n, 2]`` int32 character offsets of each token in the rendered text (special
            tokens the post-processor added have ``(0, 0)``); None when not recorded.
    """

    index: int
    input_ids: np.ndarray
    codes: np.ndarray
    loss_mask: np.ndarray
    n_original: int
    offsets: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def truncated(self) -> bool:
        return self.n_original > len(self.input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)


class Formatter:
    """Renders and tokenizes records for one tokenizer.

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (offsets are required).
        max_length: records longer than this are truncated (keep the first tokens).
        template: ``auto`` (chat template if the tokenizer has one), ``chat`` or ``plain``
            (:data:`PLAIN_FORMAT`).
        template_date: the date chat templates see (``date_string`` and ``strftime_now``),
            ``26 Jul 2024`` or ``2024-07-26`` style; default :data:`DEFAULT_TEMPLATE_DATE`.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 2048,
        template: TemplateChoice = "auto",
        *,
        template_date: str = DEFAULT_TEMPLATE_DATE,
    ) -> None:
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
        self.template_date = str(template_date)
        self._date = parse_template_date(template_date)
        self._chat_template = self._resolve_chat_template(tokenizer) if self.use_chat else None
        self._reads_clock = bool(self._chat_template and "strftime_now" in self._chat_template)
        self._probed = False  # determinism probe done (first chat record)
        self._warned_double_bos = False
        self._skeletons: dict[tuple[str, ...], str | None] = {}  # by role sequence, see _spans_by_skeleton
        self._eos = tokenizer.eos_token or ""
        prefix, suffix = self._added_special(tokenizer)
        eos_id = getattr(tokenizer, "eos_token_id", None)
        #: ids ``tokenizer(text)`` puts before / after the text (BOS / EOS of its post-processor)
        self.added_prefix, self.added_suffix = prefix, suffix
        self._post_adds_eos = bool(suffix) and eos_id is not None and suffix[-1] == eos_id
        # Chars tokenized at first for a long text: ~16 chars per kept token is far more than any
        # real tokenizer needs; denser text (CJK, emoji, byte fallback) widens the prefix (x4).
        self._char_budget = 16 * self.max_length + 4096

    @staticmethod
    def _special_ids(tok: Any) -> set[int]:
        ids = {int(i) for i in (getattr(tok, "all_special_ids", None) or [])}
        decoder = getattr(tok, "added_tokens_decoder", None) or {}
        for i, added in decoder.items():
            if getattr(added, "special", False):
                ids.add(int(i))
        return ids

    @staticmethod
    def _resolve_chat_template(tok: Any) -> str:
        """The template text ``apply_chat_template`` would use (a tokenizer may hold several, by name)."""
        try:
            resolved = tok.get_chat_template() if hasattr(tok, "get_chat_template") else tok.chat_template
        except ValueError as e:
            raise ConfigError(f"cannot pick the tokenizer's chat template: {e}") from None
        if not isinstance(resolved, str):
            raise ConfigError("the tokenizer's chat template is not a string; use --template plain")
        return resolved

    @staticmethod
    def _added_special(tok: Any) -> tuple[list[int], list[int]]:
        """The ids ``tokenizer(text)`` adds before and after ``text`` (its post-processor's BOS/EOS)."""
        bare = list(tok("a", add_special_tokens=False)["input_ids"])
        full = list(tok("a", add_special_tokens=True)["input_ids"])
        for i in range(len(full) - len(bare) + 1):
            if full[i : i + len(bare)] == bare:
                return full[:i], full[i + len(bare) :]
        raise ConfigError(
            "cannot tell which special tokens this tokenizer adds (tokenizer('a') does not contain the tokens of 'a')"
        )

    # ------------------------------------------------------------------ rendering
    def _apply(self, msgs: list[dict[str, str]]) -> str:
        """``apply_chat_template`` with the fixed date (``date_string`` and ``strftime_now``)."""
        assert self._chat_template is not None
        kwargs: dict[str, Any] = {
            "tokenize": False,
            "chat_template": self._chat_template,
            "date_string": self._date.strftime("%d %b %Y"),
        }
        if not self._reads_clock:
            return str(self.tokenizer.apply_chat_template(msgs, **kwargs))
        with _fixed_clock(self._chat_template, self._date):
            return str(self.tokenizer.apply_chat_template(msgs, **kwargs))

    def render(self, record: Record) -> tuple[str, list[tuple[int, int, int]]]:
        """Return the rendered text and ``(start, end, code)`` content spans, in order.

        Text records and the plain template get no BOS here: :meth:`encode` tokenizes them with
        the tokenizer's own special tokens (:attr:`added_prefix`, :attr:`added_suffix`).
        """
        if record.kind == "text":
            text = record.messages[0].content
            return text + ("" if self._post_adds_eos else self._eos), [(0, len(text), RESPONSE)]
        if not self.use_chat:
            return self._render_plain(record)
        msgs = [{"role": m.role, "content": m.content} for m in record.messages]
        rendered, refusal = self._try_apply(msgs)
        if rendered is None:
            raise BadRecordError(record.file, record.line, None, refusal or "chat template failed")
        text = rendered
        if not self._probed:
            self._probe(record, msgs, text)
        spans = self._spans_by_skeleton(msgs, text)
        if spans is None:
            spans = self._spans_by_search(record, text)
        return text, spans

    def template_refusal(self, roles: tuple[str, ...]) -> str | None:
        """Why the chat template refuses conversations with this turn order (None: it renders them).

        Templates refuse by turn order (a system turn, two user turns in a row), not by content,
        so one probe render with placeholder contents answers for every record of that order;
        :func:`coreselect.runtime.scan_pool` asks once per order before any model is loaded.
        """
        if not self.use_chat:
            return None
        return self._try_apply([{"role": r, "content": "x"} for r in roles])[1]

    def _try_apply(self, msgs: list[dict[str, str]]) -> tuple[str | None, str | None]:
        """``(text, None)``, or ``(None, why)`` when the template raises on these turns."""
        try:
            return self._apply(msgs), None
        except CoreselectError:
            raise
        except Exception as e:  # noqa: BLE001 - any jinja error (e.g. a template that rejects system turns)
            return None, f"chat template failed: {type(e).__name__}: {e}"

    def _render_plain(self, record: Record) -> tuple[str, list[tuple[int, int, int]]]:
        """:data:`PLAIN_FORMAT`, with each stripped content's span known by construction."""
        parts: list[str] = []
        spans: list[tuple[int, int, int]] = []
        pos = 0
        for m in record.messages:
            content = m.content.strip()
            head, tail = PLAIN_FORMAT[m.role].format(content="\0", eos=self._eos).split("\0")
            start = pos + len(head)
            if content:
                spans.append((start, start + len(content), RESPONSE if m.role == "assistant" else PROMPT))
            parts += [head, content, tail]
            pos = start + len(content) + len(tail)
        return "".join(parts), spans

    def _probe(self, record: Record, msgs: list[dict[str, str]], text: str) -> None:
        """Render the first chat record a second time; refuse a template that is not a pure function."""
        again = self._apply(msgs)
        if again != text:
            at = next((i for i, (a, b) in enumerate(zip(text, again)) if a != b), min(len(text), len(again)))
            raise ConfigError(
                f"the chat template renders {record.file}:{record.line} differently on two calls "
                f"(first difference at character {at}: {text[at : at + 20]!r} vs {again[at : at + 20]!r}); "
                "coreselect needs a deterministic rendering (fingerprints and scores must not change "
                "between runs): fix the template or use --template plain"
            )
        self._probed = True

    def _spans_by_skeleton(self, msgs: list[dict[str, str]], text: str) -> list[tuple[int, int, int]] | None:
        """Exact content spans: render with a sentinel for each content and align ``text`` to it.

        A content equal to template text (a user message ``user`` under ChatML) cannot be told
        apart from the template by searching; the skeleton can. Templates that ``trim`` /
        ``strip`` content, or move a message (Mistral puts the system prompt into the last user
        turn), are matched too. Returns None when the skeleton does not describe ``text``
        (templates that branch on content, drop or repeat messages). Spans are in text order.
        """
        marks = [_SENTINEL.format(i) for i in range(len(msgs))]
        # The skeleton depends on the roles only (a template that branches on content fails the
        # exact alignment below and falls back to searching), so it is rendered once per role
        # sequence.
        roles = tuple(m["role"] for m in msgs)
        if roles not in self._skeletons:
            try:
                sk: str | None = self._apply([{**m, "content": s} for m, s in zip(msgs, marks)])
            except Exception:  # noqa: BLE001 - a template that rejects the sentinels: search instead
                sk = None
            if sk is not None and any(sk.count(s) != 1 for s in marks):
                sk = None
            if len(self._skeletons) < 256:
                self._skeletons[roles] = sk
        else:
            sk = self._skeletons[roles]
        if sk is None:
            return None
        skeleton = sk
        order = sorted(range(len(msgs)), key=lambda i: skeleton.index(marks[i]))
        literals, cursor = [], 0
        for i in order:
            at = skeleton.index(marks[i])
            literals.append(skeleton[cursor:at])
            cursor = at + len(marks[i])
        literals.append(skeleton[cursor:])
        if not text.startswith(literals[0]):
            return None
        pos, spans = len(literals[0]), []
        for k, i in enumerate(order):
            m = msgs[i]
            content, after, last = m["content"], literals[k + 1], k == len(order) - 1
            for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                end = pos + len(cand)
                if (
                    text.startswith(cand, pos)
                    and text.startswith(after, end)
                    and (not last or end + len(after) == len(text))
                ):
                    break
            else:
                return None
            lead = len(cand) - len(cand.lstrip())
            body = cand.strip()
            if body:
                spans.append((pos + lead, pos + lead + len(body), RESPONSE if m["role"] == "assistant" else PROMPT))
            pos = end + len(after)
        return spans

    @staticmethod
    def _spans_by_search(record: Record, text: str) -> list[tuple[int, int, int]]:
        """Fallback: find each stripped content in order (the template changed content or structure)."""
        spans: list[tuple[int, int, int]] = []
        cursor = 0
        for m in record.messages:
            needle = m.content.strip()
            if not needle:
                continue
            at = text.find(needle, cursor)
            if at < 0:
                raise BadRecordError(
                    record.file,
                    record.line,
                    None,
                    f"the chat template changed a {m.role} message's text, so prompt/response tokens "
                    "cannot be located; use --template plain",
                )
            spans.append((at, at + len(needle), RESPONSE if m.role == "assistant" else PROMPT))
            cursor = at + len(needle)
        return spans

    # ------------------------------------------------------------------ tokenizing
    def _tokenize(self, record: Record, text: str, add_special: bool) -> tuple[np.ndarray, np.ndarray, int]:
        """Token ids, offsets and the token count of ``text`` (a lower bound if only a prefix was read).

        A text longer than the char budget is tokenized by prefix: cut at a whitespace near the
        budget, and accepted once the prefix holds more than ``max_length + 64`` tokens (before
        any suffix the post-processor appends), so the kept tokens lie far from the cut and
        equal those of the whole text (pre-tokenizers split at whitespace, and BPE / Unigram
        work within those pieces). Otherwise the budget grows x4. Memory and time per record
        thus stay bounded (a 5M-character record would take ~1 GB and ~8 s whole).
        """
        budget = self._char_budget
        while True:
            cut = len(text)
            if cut > budget:
                window = text.rfind(" ", budget - 1024, budget)
                cut = window if window > 0 else budget
            try:
                enc = self.tokenizer(text[:cut], add_special_tokens=add_special, return_offsets_mapping=True)
            except Exception as e:  # noqa: BLE001 - the tokenizer refused the text: a bad record, not a crash
                raise BadRecordError(
                    record.file, record.line, None, f"the tokenizer cannot read this record: {type(e).__name__}: {e}"
                ) from None
            ids = np.asarray(enc["input_ids"], dtype=np.int64)
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            if cut == len(text):
                return ids, offsets, len(ids)
            n = len(ids) - (len(self.added_suffix) if add_special else 0)
            if n > self.max_length + _CUT_MARGIN:
                return ids[:n], offsets[:n], n
            budget *= 4

    def encode(self, record: Record) -> Encoded:
        """Tokenize one record with scope codes and the response-only loss mask.

        Text records and the plain template are tokenized with the tokenizer's special tokens
        (``tokenizer(text)``), a chat template without them (it writes its own); see the
        module docstring. Raises :class:`~coreselect.errors.BadRecordError` (file, line, field)
        for a record that cannot be tokenized.
        """
        text, spans, add_special = self._prepare(record)
        ids, offsets, n_total = self._tokenize(record, text, add_special)
        return self._finish(record, spans, add_special, ids, offsets, n_total)

    def _prepare(self, record: Record) -> tuple[str, list[tuple[int, int, int]], bool]:
        """Check, render: the rendered text, its content spans, and whether to add special tokens."""
        for i, m in enumerate(record.messages):
            reason = surrogate_error(m.content)
            if reason:
                fld = "text" if record.kind == "text" else f"messages[{i}].content"
                raise BadRecordError(record.file, record.line, fld, reason)
        text, spans = self.render(record)
        return text, spans, record.kind == "text" or not self.use_chat

    def encode_many(self, records: list[Record]) -> list[Encoded]:
        """``[self.encode(r) for r in records]``, with one batched fast-tokenizer call per kind of
        text (same ids and offsets: a batch without padding tokenizes each text on its own).
        Texts past the char budget, and any batch the tokenizer refuses, go one by one through
        :meth:`encode`'s path, so errors name the same record."""
        prepared: list[Any] = []
        for r in records:
            try:
                prepared.append(self._prepare(r))
            except CoreselectError as e:  # raised when its record's turn comes, as encode() would
                prepared.append(e)
                break
        toks: list[tuple[np.ndarray, np.ndarray, int] | None] = [None] * len(records)
        for flag in (False, True):
            idx = [
                i
                for i, p in enumerate(prepared)
                if not isinstance(p, Exception) and p[2] is flag and len(p[0]) <= self._char_budget
            ]
            if not idx:
                continue
            try:
                enc = self.tokenizer(
                    [prepared[i][0] for i in idx], add_special_tokens=flag, return_offsets_mapping=True
                )
            except Exception:  # noqa: BLE001 - let the one-by-one path name the bad record
                continue
            for k, i in enumerate(idx):
                ids = np.asarray(enc["input_ids"][k], dtype=np.int64)
                toks[i] = ids, np.asarray(enc["offset_mapping"][k], dtype=np.int64).reshape(-1, 2), len(ids)
        out = []
        for r, p, tk in zip(records, prepared, toks):
            if isinstance(p, Exception):
                raise p
            text, spans, add = p
            ids, offsets, n_total = tk if tk is not None else self._tokenize(r, text, add)
            out.append(self._finish(r, spans, add, ids, offsets, n_total))
        return out

    def _finish(
        self,
        record: Record,
        spans: list[tuple[int, int, int]],
        add_special: bool,
        ids: np.ndarray,
        offsets: np.ndarray,
        n_total: int,
    ) -> Encoded:
        """Scope codes, loss mask and truncation of one tokenized record."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos and not self._warned_double_bos:
            # coreselect adds no BOS of its own to a template that writes one; a second one comes
            # from the template or the record itself (a text starting with the BOS string)
            self._warned_double_bos = True
            log.warning(
                "%s:%s starts with two BOS tokens: the %s spells one out itself; kept as the tokenizer "
                "reads it (further such records are not reported)",
                record.file,
                record.line,
                "record" if add_special else "chat template",
            )
        codes = np.zeros(len(ids), dtype=np.int8)
        loss = np.zeros(len(ids), dtype=bool)
        starts, ends = offsets[:, 0], offsets[:, 1]
        special = np.isin(ids, self.special_ids)
        for s, e, code in spans:
            inside = (starts < e) & (ends > s) & (ends > starts) & ~special
            codes[inside] = code
            if code == RESPONSE:
                loss[inside] = True
                # the end-of-turn token that closes this assistant message is a target too: the
                # first special token after its last content token (by position, so that an EOS
                # the post-processor appends, with offsets (0, 0), counts as well)
                last = np.nonzero(inside)[0]
                if last.size:
                    nxt = np.nonzero(special[last[-1] + 1 :])[0]
                    if nxt.size:
                        loss[last[-1] + 1 + nxt[0]] = True
        codes[special] = TEMPLATE
        keep = self.max_length
        # copies, so that a truncated record does not keep its whole tokenization alive
        return Encoded(
            record.index,
            ids[:keep].copy(),
            codes[:keep].copy(),
            loss[:keep].copy(),
            n_total,
            offsets[:keep].astype(np.int32),
        )

    def token_strings(self, ids: list[int]) -> dict[int, str]:
        """Human-readable strings of token ids (for fingerprint files and reports)."""
        toks = self.tokenizer.convert_ids_to_tokens(list(ids))
        return {int(i): str(t) for i, t in zip(ids, toks)}


def _worker_init(formatter: Formatter) -> None:
    global _WORKER_FORMATTER
    _WORKER_FORMATTER = formatter


def _worker_encode(records: list[Record]) -> list[Encoded]:
    return _WORKER_FORMATTER.encode_many(records)


_WORKER_FORMATTER: Any = None


class EncodePool:
    """Encode record chunks in worker processes, results in pool order (``imap``).

    ``workers=0`` encodes in the calling process (:meth:`Formatter.encode_many`). The outputs are
    the same arrays either way (``tests/methods/test_trim_feed.py``). Workers start with a copy
    of the formatter (its skeleton cache and determinism probe included).
    """

    def __init__(self, formatter: Formatter, workers: int = 0, chunk: int = 256) -> None:
        self.formatter, self.workers, self.chunk = formatter, int(workers), max(1, int(chunk))
        self._pool: Any = None
        if self.workers > 0:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self._pool = ctx.Pool(self.workers, initializer=_worker_init, initargs=(formatter,))

    def encode(self, records: list[Record]) -> list[Encoded]:
        if self._pool is None:
            return self.formatter.encode_many(records)
        parts = [records[i : i + self.chunk] for i in range(0, len(records), self.chunk)]
        return [e for part in self._pool.imap(_worker_encode, parts) for e in part]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
