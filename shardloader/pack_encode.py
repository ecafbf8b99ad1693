"""Turn upstream samples into token documents for packing: token ids, text, and SFT records.

A sample is a dict from the reader. Its kind follows from its fields, checked in this order:

- ``input_ids`` (tokenized shards): used as they are; conversion already appended EOS (and BOS
  with ``--add-bos``), so nothing is added here. Chat data rendered at conversion also carries
  ``loss_spans`` (``[start, end)`` token ranges of the assistant turns), which become the loss
  mask; they are checked as hostile input (`shardloader.chat_template.check_loss_spans`).
- ``messages`` (a chat: a list of ``{"role", "content"}``): rendered with the tokenizer's chat
  template; only the assistant turns get a loss.
- ``prompt`` and ``response``: rendered as a two-turn chat (user, assistant) when the tokenizer has
  a chat template, else encoded as ``[BOS] prompt response EOS`` (BOS and EOS as configured), with
  a loss on the response and its EOS only.
- the text field (``text`` by default): encoded without the tokenizer's own special tokens, then
  BOS / EOS added as configured (by default EOS only, as ``shardloader convert`` does), so text
  shards and tokenized shards of the same corpus give the same ids.

Texts are encoded in one batched call per group of samples (Rust-side parallel in ``tokenizers``).

Chat templates are rendered by `shardloader.chat_template.ChatRenderer` (its module docstring
gives the algorithm), the same code ``shardloader convert --tokenizer`` renders chat data with, so
shards rendered at conversion and ``messages`` rendered here give the same ids and masks.

The tokenizer is a :class:`shardloader.TextTokenizer` or a Hugging Face fast tokenizer
(``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)``); only the latter
renders chat templates. :func:`shardloader.tokenizer.check_tokenizer` compares its fingerprint
(and chat template) with a manifest's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from shardloader.chat_template import ChatRenderer, spans_to_mask, template_text
from shardloader.errors import ConfigError, CorpusError

# check_tokenizer and tokenizer_fingerprint live in shardloader.tokenizer; dataset.py still imports
# check_tokenizer from here.
from shardloader.tokenizer import TextTokenizer, check_tokenizer, tokenizer_fingerprint

__all__ = [
    "EncodedDoc",
    "Encoder",
    "SampleEncoder",
    "check_tokenizer",
    "encode_token_samples",
    "tokenizer_fingerprint",
]


class EncodedDoc(NamedTuple):
    """One document as token ids, with the tokens that get a loss (``None``: all of them)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray | None


class Encoder(Protocol):
    """Turns a group of samples into one :class:`EncodedDoc` each, in order."""

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> list[EncodedDoc]:
        """Encode ``samples``."""
        ...


def _describe(sample: Mapping[str, Any]) -> str:
    if "id" in sample:
        return f"sample {sample['id']!r}"
    if "sample_id" in sample:
        return f"sample_id {sample['sample_id']}"
    return "sample"


def _token_array(sample: Mapping[str, Any]) -> np.ndarray:
    ids = sample["input_ids"]
    array = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
    if array.ndim != 1 or not (array.dtype.kind in "iu" or array.size == 0):
        raise CorpusError(
            f"{_describe(sample)}: input_ids must be a 1-D integer array, got {array.dtype}"
            f" of shape {array.shape}"
        )
    return array


def _token_doc(sample: Mapping[str, Any]) -> EncodedDoc:
    """A tokenized sample: its ids, and its ``loss_spans`` (checked) as the mask if it has them."""
    ids = _token_array(sample)
    if "loss_spans" not in sample:
        return EncodedDoc(ids, None)
    return EncodedDoc(ids, spans_to_mask(sample["loss_spans"], len(ids), _describe(sample)))


def encode_token_samples(samples: Sequence[Mapping[str, Any]]) -> list[EncodedDoc]:
    """The encoder for tokenized shards: each sample's ``input_ids``, masked by ``loss_spans``.

    Raises:
        CorpusError: A sample has no ``input_ids`` (text shards need a tokenizer), they are not
            a 1-D integer array, or its ``loss_spans`` are malformed (not ``[start, end]``
            integer pairs within the ids, sorted and non-overlapping).
    """
    docs = []
    for sample in samples:
        if "input_ids" not in sample:
            raise CorpusError(
                f"{_describe(sample)}: no input_ids; pass a tokenizer to pack text or SFT samples"
            )
        docs.append(_token_doc(sample))
    return docs


class _Backend:
    """What the encoder needs from either kind of tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._renderer: ChatRenderer | None = None
        if isinstance(tokenizer, TextTokenizer):
            self.name = tokenizer.path
            self.eos_id, self.bos_id = tokenizer.eos_id, tokenizer.bos_id
            self.rust: Any = None
            self.chat_template: str | None = None
        elif getattr(tokenizer, "backend_tokenizer", None) is not None:
            self.name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
            self.eos_id = tokenizer.eos_token_id
            self.bos_id = tokenizer.bos_token_id
            self.rust = tokenizer.backend_tokenizer
            self.chat_template = template_text(getattr(tokenizer, "chat_template", None))
        else:
            raise ConfigError(
                f"tokenizer {type(tokenizer).__name__} is neither a shardloader.TextTokenizer nor"
                " a Hugging Face fast tokenizer; load one with AutoTokenizer (use_fast=True)"
            )

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        if self.rust is None:
            out: list[np.ndarray] = self.tokenizer.encode_batch(texts, add_bos=False, add_eos=False)
            return out
        encode = getattr(self.rust, "encode_batch_fast", self.rust.encode_batch)
        return [np.array(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    def renderer(self) -> ChatRenderer:
        """The chat renderer of a Hugging Face tokenizer with a template (made on first use)."""
        if self._renderer is None:
            self._renderer = ChatRenderer(self.tokenizer, self.name)
        return self._renderer

    def special(self, token_id: int | None, what: str, option: str) -> list[int]:
        if token_id is None:
            raise ConfigError(f"{self.name}: no {what} token; set {option}=False or choose one")
        return [token_id]


class SampleEncoder:
    """Encodes any mix of token, text and SFT samples (see the module docstring for the rules).

    Args:
        tokenizer: A :class:`shardloader.TextTokenizer` or a Hugging Face fast tokenizer; ``None``
            accepts tokenized samples only.
        add_bos: Prepend BOS to text and to template-less prompt/response samples.
        add_eos: Append EOS to text and to template-less prompt/response samples.
        text_field: The field that holds the text of text samples.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        add_bos: bool = False,
        add_eos: bool = True,
        text_field: str = "text",
    ) -> None:
        self._backend = _Backend(tokenizer) if tokenizer is not None else None
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.text_field = text_field

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> list[EncodedDoc]:
        """Encode ``samples``, batching the tokenizer calls of each kind.

        Raises:
            CorpusError: A sample has none of the fields above, or malformed ones.
            ConfigError: Text or SFT samples but no tokenizer; ``messages`` but no chat template.
        """
        docs: list[EncodedDoc | None] = [None] * len(samples)
        texts: list[int] = []
        chats: list[int] = []
        pairs: list[int] = []
        for i, sample in enumerate(samples):
            if "input_ids" in sample:
                docs[i] = _token_doc(sample)
            elif "messages" in sample:
                chats.append(i)
            elif "prompt" in sample and "response" in sample:
                pairs.append(i)
            elif self.text_field in sample:
                texts.append(i)
            else:
                raise CorpusError(
                    f"{_describe(sample)}: none of input_ids, messages, prompt/response or"
                    f" {self.text_field!r}; fields are {sorted(sample)}"
                )
        if texts or chats or pairs:
            backend = self._require_backend(samples[(texts or chats or pairs)[0]])
            groups = [(texts, self._encode_texts)]
            if pairs and backend.chat_template is None:
                groups.append((pairs, self._encode_pairs))
            else:
                chats = sorted(chats + pairs)
            groups.append((chats, self._encode_chats))
            for indices, encode in groups:
                encoded = encode(backend, [samples[i] for i in indices])
                for i, doc in zip(indices, encoded, strict=True):
                    docs[i] = doc
        return [doc for doc in docs if doc is not None]

    def _require_backend(self, sample: Mapping[str, Any]) -> _Backend:
        if self._backend is None:
            raise ConfigError(
                f"{_describe(sample)}: text or SFT samples need a tokenizer; pass tokenizer="
            )
        return self._backend

    def _affixes(self, backend: _Backend) -> tuple[list[int], list[int]]:
        head = backend.special(backend.bos_id, "BOS", "add_bos") if self.add_bos else []
        tail = backend.special(backend.eos_id, "EOS", "add_eos") if self.add_eos else []
        return head, tail

    def _encode_texts(
        self, backend: _Backend, samples: Sequence[Mapping[str, Any]]
    ) -> list[EncodedDoc]:
        if not samples:
            return []
        head, tail = self._affixes(backend)
        encoded = backend.encode([_text(sample, self.text_field) for sample in samples])
        if head or tail:
            first, last = np.array(head, np.int64), np.array(tail, np.int64)
            encoded = [np.concatenate([first, ids, last]) for ids in encoded]
        return [EncodedDoc(ids, None) for ids in encoded]

    def _encode_pairs(
        self, backend: _Backend, samples: Sequence[Mapping[str, Any]]
    ) -> list[EncodedDoc]:
        head, tail = self._affixes(backend)
        texts = [_text(sample, "prompt") for sample in samples]
        texts += [_text(sample, "response") for sample in samples]
        encoded = backend.encode(texts)
        docs = []
        for k in range(len(samples)):
            prompt = np.concatenate([np.array(head, np.int64), encoded[k]])
            response = np.concatenate([encoded[len(samples) + k], np.array(tail, np.int64)])
            mask = np.zeros(len(prompt) + len(response), dtype=bool)
            mask[len(prompt) :] = True
            docs.append(EncodedDoc(np.concatenate([prompt, response]), mask))
        return docs

    def _encode_chats(
        self, backend: _Backend, samples: Sequence[Mapping[str, Any]]
    ) -> list[EncodedDoc]:
        if not samples:
            return []
        if backend.chat_template is None:
            raise ConfigError(
                f"{_describe(samples[0])}: chat messages need a tokenizer with a chat"
                f" template, and {backend.name} has none; load it with transformers.AutoTokenizer"
                " and set tokenizer.chat_template"
            )
        renderer = backend.renderer()
        rendered = [
            renderer.render_turns(_messages(sample), _describe(sample)) for sample in samples
        ]
        return [EncodedDoc(ids, mask) for ids, mask in renderer.encode(rendered)]


def _text(sample: Mapping[str, Any], field: str) -> str:
    value = sample.get(field)
    if not isinstance(value, str):
        raise CorpusError(
            f"{_describe(sample)}: field {field!r} must be a string, got {type(value).__name__}"
        )
    return value


def _messages(sample: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if "messages" not in sample:
        return [
            {"role": "user", "content": _text(sample, "prompt")},
            {"role": "assistant", "content": _text(sample, "response")},
        ]
    messages = sample["messages"]
    if not isinstance(messages, Sequence) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages
    ):
        raise CorpusError(
            f"{_describe(sample)}: messages must be a list of {{role, content}} dicts"
        )
    return list(messages)
