"""Chat templates: load a tokenizer's template, render conversations to token ids and trained spans.

One copy of the rendering serves both sides: ``shardloader convert --tokenizer`` renders chat data
once and stores ``input_ids`` plus ``loss_spans``, and the packer
(`shardloader.pack_encode.SampleEncoder`) renders ``messages`` samples at read time; both call
`ChatRenderer`, so the stored ids and spans are exactly what reading would compute.

The algorithm: a conversation is rendered once per assistant turn, without and with that turn,
and the turn's characters are the difference (``render(turns[:i], add_generation_prompt=True)``
must be a prefix of ``render(turns[:i + 1])``, which must be a prefix of the whole rendering;
templates that rewrite earlier turns are refused). The whole conversation is then tokenized once
with offsets, and every token that overlaps an assistant turn's characters gets a loss, so the ids
are exactly what inference would see. What the template writes after the content (an end-of-turn
token, a newline) belongs to the turn: the model learns to end its answer. BOS and EOS are
whatever the template writes.

Trained tokens travel as ``loss_spans``: sorted, non-overlapping ``[start, end)`` token ranges
(`mask_to_spans`), checked as hostile input when read back (`spans_to_mask`).

Templates that mark the generated text with ``{% generation %}`` (transformers' convention, and
``shardloader train-tokenizer``'s default template) are rendered once per conversation under
transformers' tracker of those blocks, and the marked blocks are the trained spans; on the default
template they are exactly the prefix method's spans (``tests/test_tokenizer.py``).

Cost (``python -m tools.bench.convert --tasks chat --quick``, 2 processes on a quiet 2-core VM,
11,379 conversations of ~3 KB): one process converts ~2.8 MB/s once warm (rendering 12%,
tokenizing with offsets 64% of its time), the tokenizer alone on the turns' text ~3.4 MB/s. End
to end the benchmark measures 40-43% of the tokenizer-alone bound: converting its 36 MB takes
~12 s, ~3 s of them start-up (importing transformers and loading its tokenizer, which the bound
does not count). Marking generation made rendering 2.3x faster than the ``1 + 2 * assistant
turns`` renders of the prefix method.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from shardloader.errors import ConfigError, CorpusError

__all__ = [
    "TEMPLATE_FILE",
    "ChatRenderer",
    "RenderedChat",
    "check_loss_spans",
    "load_chat_tokenizer",
    "mask_to_spans",
    "read_chat_template",
    "spans_to_mask",
    "template_hash",
    "template_text",
]

TEMPLATE_FILE = "chat_template.jinja"
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects it


def template_text(value: Any) -> str | None:
    """The default template's text of a ``chat_template`` value (text, or named templates).

    ``tokenizer_config.json`` holds a string or a list of ``{"name", "template"}``; a loaded
    tokenizer holds a string or a dict name -> text. Named templates use ``default``.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        default = value.get("default")
        return default if isinstance(default, str) else None
    return None


def template_hash(text: str) -> str:
    """The sha256 of a template's text, as manifests record it (``sha256:<hex>``)."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_chat_template(path: str | Path) -> str | None:
    """The chat template of a tokenizer directory, as ``transformers`` would load it.

    ``chat_template.jinja`` wins over ``tokenizer_config.json``'s ``chat_template``; a
    ``tokenizer.json`` file (no directory) has none.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / TEMPLATE_FILE).is_file():
        return (p / TEMPLATE_FILE).read_text(encoding="utf-8")
    config = p / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{config}: not valid JSON ({err})") from err
    return template_text(data.get("chat_template")) if isinstance(data, dict) else None


def load_chat_tokenizer(path: str) -> Any:
    """Load a local Hugging Face fast tokenizer that has a chat template (offline).

    Raises:
        ConfigError: ``path`` is not a tokenizer directory transformers can load, its tokenizer
            has no fast version, or it has no chat template.
    """
    if not Path(path).is_dir():
        raise ConfigError(
            f"{path}: rendering chat data needs a tokenizer directory with a chat template "
            "(tokenizer.json plus tokenizer_config.json's chat_template or chat_template.jinja)"
        )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"{path}: cannot load the tokenizer with transformers ({err})") from err
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ConfigError(f"{path}: the tokenizer has no fast (Rust) version to use")
    if template_text(getattr(tokenizer, "chat_template", None)) is None:
        raise ConfigError(
            f"{path}: the tokenizer has no chat template (no chat_template in "
            f"tokenizer_config.json, no {TEMPLATE_FILE}); add one, e.g. with "
            "shardloader train-tokenizer's default, or convert without --tokenizer"
        )
    return tokenizer


class RenderedChat(NamedTuple):
    """A conversation rendered by its template: the text and its assistant turns' characters."""

    text: str
    spans: list[tuple[int, int]]


class ChatRenderer:
    """Renders conversations with a Hugging Face fast tokenizer's chat template.

    Args:
        tokenizer: A fast tokenizer with a ``chat_template`` (``AutoTokenizer``).
        name: Names the tokenizer in errors (default: its ``name_or_path``).

    Raises:
        ConfigError: The tokenizer has no chat template.
    """

    def __init__(self, tokenizer: Any, name: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.name = name or str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        template = template_text(getattr(tokenizer, "chat_template", None))
        if template is None:
            raise ConfigError(f"{self.name}: the tokenizer has no chat template")
        self.template = template
        self._rust = tokenizer.backend_tokenizer
        # A template that marks what the model generates ({% generation %}) is rendered once per
        # conversation, the marked blocks being the trained spans; others by prefixes.
        self.marks_generation = GENERATION_TAG.search(template) is not None

    @property
    def template_hash(self) -> str:
        """The sha256 of the template's text (`template_hash`)."""
        return template_hash(self.template)

    def _render(self, messages: Sequence[Mapping[str, Any]], *, prompt: bool, what: str) -> str:
        try:
            if not messages:  # transformers refuses an empty conversation: render it directly
                from transformers.utils.chat_template_utils import render_jinja_template

                result: Any = render_jinja_template(  # (texts, generation indices)
                    conversations=[[]],
                    chat_template=self.template,
                    add_generation_prompt=prompt,
                    **self.tokenizer.special_tokens_map,
                )
                return str(result[0][0])
            text = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=prompt
            )
        except Exception as err:  # noqa: BLE001 - Jinja's TemplateError, raise_exception, ...
            raise CorpusError(
                f"{what}: the chat template of {self.name} cannot render it "
                f"({type(err).__name__}: {err})"
            ) from err
        return str(text)

    def _render_marked(
        self, messages: Sequence[Mapping[str, Any]], what: str
    ) -> tuple[str, list[tuple[int, int]]]:
        """One render that also returns the character spans of the ``{% generation %}`` blocks.

        The same Jinja call ``apply_chat_template`` makes (with the tokenizer's special tokens
        as variables), under transformers' tracker of generation blocks.
        """
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            result: Any = render_jinja_template(  # (texts, generation spans), one per chat
                conversations=[[dict(m) for m in messages]],
                chat_template=self.template,
                return_assistant_tokens_mask=True,
                add_generation_prompt=False,
                **self.tokenizer.special_tokens_map,
            )
        except Exception as err:  # noqa: BLE001 - Jinja's TemplateError, raise_exception, ...
            raise CorpusError(
                f"{what}: the chat template of {self.name} cannot render it "
                f"({type(err).__name__}: {err})"
            ) from err
        texts, indices = result
        return str(texts[0]), [(int(a), int(b)) for a, b in indices[0]]

    def render_turns(self, messages: Sequence[Mapping[str, Any]], what: str) -> RenderedChat:
        """Render a conversation; return its text and the character spans of its assistant turns.

        Args:
            messages: ``{"role", "content"}`` turns.
            what: Names the conversation in errors (``sample 'a'``, ``chat.jsonl:3``).

        Raises:
            CorpusError: No assistant turn, or the template cannot render the conversation.
            ConfigError: The template renders a turn differently once later turns follow.
        """
        if self.marks_generation:
            full, marked = self._render_marked(messages, what)
            spans = [(start, end) for start, end in marked if end > start]
            if not any(m.get("role") == "assistant" for m in messages) or not spans:
                raise CorpusError(f"{what}: no assistant turn, so nothing to learn from")
            return RenderedChat(full, spans)
        full = self._render(messages, prompt=False, what=what)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self._render(messages[:i], prompt=True, what=what)
            upto = self._render(messages[: i + 1], prompt=False, what=what)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ConfigError(
                    f"{what}: the chat template renders turn {i} differently once later turns"
                    " follow, so its tokens cannot be found; use a template whose renderings of a"
                    " conversation's prefixes are prefixes of its rendering"
                )
            spans.append((len(before), len(upto)))
        if not spans:
            raise CorpusError(f"{what}: no assistant turn, so nothing to learn from")
        return RenderedChat(full, spans)

    def encode(self, chats: Sequence[RenderedChat]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenize rendered conversations in one batch: (ids int64, loss mask bool) each.

        A token gets a loss when it overlaps an assistant turn's characters.
        """
        if not chats:
            return []
        encodings = self._rust.encode_batch([c.text for c in chats], add_special_tokens=False)
        out = []
        for chat, e in zip(chats, encodings, strict=True):
            ids = np.array(e.ids, dtype=np.int64)
            offsets = np.array(e.offsets, dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(ids), dtype=bool)
            for start, end in chat.spans:
                mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
            out.append((ids, mask))
        return out


def mask_to_spans(mask: np.ndarray) -> list[list[int]]:
    """The runs of ``True`` in a loss mask as sorted ``[start, end)`` token ranges."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1).tolist()
    ends = np.flatnonzero(edges == -1).tolist()
    return [[s, e] for s, e in zip(starts, ends, strict=True)]


def check_loss_spans(spans: Any, num_tokens: int, what: str) -> list[tuple[int, int]]:
    """Check stored ``loss_spans`` as hostile input; the spans as (start, end) pairs.

    Raises:
        CorpusError: Not a list of ``[start, end]`` integer pairs with ``0 <= start < end <=
            num_tokens``, sorted and non-overlapping; the message names ``what`` and the problem.
    """
    if not isinstance(spans, list):
        raise CorpusError(
            f"{what}: loss_spans is {type(spans).__name__}, expected a list of [start, end] pairs"
        )
    out: list[tuple[int, int]] = []
    previous_end = 0
    for k, span in enumerate(spans):
        if (
            not isinstance(span, list)
            or len(span) != 2
            or not all(type(v) is int for v in span)  # not bool, not float
        ):
            raise CorpusError(
                f"{what}: loss_spans[{k}] is {span!r:.60}, expected [start, end] (two integers)"
            )
        start, end = span
        if not 0 <= start < end <= num_tokens:
            raise CorpusError(
                f"{what}: loss_spans[{k}] is [{start}, {end}], outside 0 <= start < end <= "
                f"{num_tokens} (the sample's token count)"
            )
        if start < previous_end:
            raise CorpusError(
                f"{what}: loss_spans[{k}] [{start}, {end}] starts before the previous span's end "
                f"{previous_end}; spans must be sorted and must not overlap"
            )
        out.append((start, end))
        previous_end = end
    return out


def spans_to_mask(spans: Any, num_tokens: int, what: str) -> np.ndarray:
    """The loss mask of stored ``loss_spans`` (checked by `check_loss_spans`)."""
    mask = np.zeros(num_tokens, dtype=bool)
    for start, end in check_loss_spans(spans, num_tokens, what):
        mask[start:end] = True
    return mask
