"""A thin adapter over Hugging Face ``tokenizers``: load offline, batch-encode, fingerprint, train.

Encoding never adds the tokenizer's own special tokens (``add_special_tokens=False``); BOS and EOS
are added explicitly by the caller (conversion appends EOS to every document by default), so the
same ids come out whatever the tokenizer's post-processor would do.

`check_tokenizer` refuses a tokenizer whose fingerprint differs from the one a manifest records.
The fingerprint is the sha256 of the vocabulary (token -> id, added tokens included) and of which
added tokens are special: two tokenizers with the same fingerprint map ids to the same strings.
Which token plays EOS or BOS is recorded beside it, not in it, so loading ``tokenizer.json`` alone
or its directory (with ``tokenizer_config.json``) gives the same fingerprint.

Shards of chat data rendered at conversion also record the sha256 of the chat template's text
(`TokenizerInfo.chat_template`); `check_tokenizer` then refuses a tokenizer with another template.
`train_bpe_tokenizer` can write `DEFAULT_CHAT_TEMPLATE`, a ChatML-like template.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shardloader.chat_template import read_chat_template, template_hash, template_text
from shardloader.errors import ConfigError

if TYPE_CHECKING:
    import tokenizers

    from shardloader.manifest import Manifest

log = logging.getLogger(__name__)

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>")
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
# ChatML-like: "<|im_start|>{role}\n{content}<|im_end|>\n" per turn. The assistant's content and
# end of turn sit in {% generation %}, so transformers' apply_chat_template(...,
# return_assistant_tokens_mask=True) marks the tokens shardloader trains on; the generation prompt
# is the assistant header, so renderings of a conversation's prefixes are prefixes of it.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>\\n' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo:
    """What a manifest records about the tokenizer of tokenized shards."""

    fingerprint: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    eos_token: str | None
    bos_token: str | None
    chat_template: str | None = None  # sha256 of the template, for chat rendered at conversion

    @property
    def dtype(self) -> str:
        """Smallest unsigned dtype that holds every id: ``uint16`` or ``uint32``."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest (``chat_template`` only when set)."""
        out: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
        }
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out


def _special(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """A loaded tokenizer.

    Args:
        path: A ``tokenizer.json`` file, or a local Hugging Face tokenizer directory.
        eos_token: Override the end-of-document token (default: from ``tokenizer_config.json``,
            else the first of ``EOS_CANDIDATES`` in the vocabulary).
        bos_token: Override the beginning-of-document token, found the same way.
    """

    def __init__(
        self, path: str, *, eos_token: str | None = None, bos_token: str | None = None
    ) -> None:
        self.path = str(path)
        p = Path(path)
        # The directory's chat template (None for a bare tokenizer.json): checked against shards
        # rendered at conversion; rendering itself needs a transformers tokenizer.
        self.chat_template = read_chat_template(p)
        config: dict[str, Any] = {}
        if p.is_dir():
            config_file = p / "tokenizer_config.json"
            if config_file.exists():
                config = json.loads(config_file.read_text(encoding="utf-8"))
            self._tok = self._load_dir(p)
        elif p.is_file():
            self._tok = self._load_file(p)
        else:
            raise ConfigError(f"{path}: no tokenizer here (expected tokenizer.json or a directory)")
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.eos_token = (
            eos_token or _special(config, "eos_token") or _first_in(EOS_CANDIDATES, vocab)
        )
        self.bos_token = (
            bos_token or _special(config, "bos_token") or _first_in(BOS_CANDIDATES, vocab)
        )
        self.eos_id = self._token_id(self.eos_token, vocab, "eos")
        self.bos_id = self._token_id(self.bos_token, vocab, "bos")
        special = sorted(
            token.content
            for token in self._tok.get_added_tokens_decoder().values()
            if token.special
        )
        self._fingerprint = _fingerprint(vocab, special)

    def _load_file(self, p: Path) -> tokenizers.Tokenizer:
        import tokenizers  # here, not at import: reading token shards needs no tokenizer

        try:
            return tokenizers.Tokenizer.from_file(str(p))
        except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exception
            raise ConfigError(f"{p}: not a readable tokenizer.json ({err})") from err

    def _load_dir(self, p: Path) -> tokenizers.Tokenizer:
        if (p / "tokenizer.json").exists():
            return self._load_file(p / "tokenizer.json")
        try:  # slow tokenizers (sentencepiece, vocab files): let transformers convert them
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True, use_fast=True)
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds
            raise ConfigError(f"{p}: cannot load a tokenizer from this directory ({err})") from err
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ConfigError(f"{p}: the tokenizer has no fast (Rust) version to use")
        return backend

    def _token_id(self, token: str | None, vocab: dict[str, int], what: str) -> int | None:
        if token is None:
            return None
        if token not in vocab:
            raise ConfigError(f"{self.path}: {what} token {token!r} is not in the vocabulary")
        return vocab[token]

    @property
    def info(self) -> TokenizerInfo:
        """Fingerprint and special ids, as a manifest records them."""
        return TokenizerInfo(
            fingerprint=self._fingerprint,
            vocab_size=self.vocab_size,
            eos_id=self.eos_id,
            bos_id=self.bos_id,
            eos_token=self.eos_token,
            bos_token=self.bos_token,
        )

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = True
    ) -> list[np.ndarray]:
        """Encode texts into id arrays (int64), with BOS/EOS added as asked.

        Raises:
            ConfigError: EOS (or BOS) was asked for but the tokenizer has none.
        """
        if add_eos and self.eos_id is None:
            raise ConfigError(f"{self.path}: no EOS token found; pass eos_token or add_eos=False")
        if add_bos and self.bos_id is None:
            raise ConfigError(f"{self.path}: no BOS token found; pass bos_token or add_bos=False")
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        return [np.array(head + e.ids + tail, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Decode ids back to text."""
        return str(self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens))


def _first_in(candidates: Sequence[str], vocab: dict[str, int]) -> str | None:
    return next((c for c in candidates if c in vocab), None)


def _fingerprint(vocab: dict[str, int], special: list[str]) -> str:
    canonical = json.dumps(
        {"vocab": sorted(vocab.items(), key=lambda kv: kv[1]), "special": special},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The vocabulary fingerprint of a TextTokenizer or Hugging Face fast tokenizer.

    It is the one ``shardloader convert`` records in the manifest (vocabulary plus which added
    tokens are special), so the two kinds of tokenizer loaded from one directory agree.

    Raises:
        ConfigError: ``tokenizer`` is neither kind.
    """
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer.info.fingerprint
    rust = getattr(tokenizer, "backend_tokenizer", None)
    if rust is None:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} is neither a shardloader.TextTokenizer nor"
            " a Hugging Face fast tokenizer; load one with AutoTokenizer (use_fast=True)"
        )
    vocab = rust.get_vocab(with_added_tokens=True)
    special = sorted(t.content for t in rust.get_added_tokens_decoder().values() if t.special)
    return _fingerprint(vocab, special)


def tokenizer_chat_template(tokenizer: Any) -> str | None:
    """The chat template text of a TextTokenizer (from its directory) or Hugging Face tokenizer."""
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer.chat_template
    return template_text(getattr(tokenizer, "chat_template", None))


def _tokenizer_name(tokenizer: Any) -> str:
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer.path
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_tokenizer(manifest: Manifest, tokenizer: Any, *, where: str = "dataset") -> None:
    """Refuse a tokenizer whose fingerprint differs from the one the shards were tokenized with.

    Text shards (no tokenizer in the manifest) accept any tokenizer. Chat shards rendered at
    conversion also record their chat template's sha256: a tokenizer with another template (or
    none) is refused too.

    Args:
        manifest: The manifest of the shards.
        tokenizer: The tokenizer about to be used with them (a TextTokenizer or a Hugging Face
            fast tokenizer).
        where: The dataset URL, for the message.

    Raises:
        ConfigError: The fingerprints or chat templates differ; the message names both.
    """
    if not manifest.tokenizer:
        return
    expected = manifest.tokenizer.get("fingerprint")
    actual = tokenizer_fingerprint(tokenizer)
    if expected != actual:
        raise ConfigError(
            f"{where}: shards were tokenized with the tokenizer of fingerprint {expected}, but"
            f" {_tokenizer_name(tokenizer)} has fingerprint {actual}; use the tokenizer the"
            " shards were converted with"
        )
    expected_template = manifest.tokenizer.get("chat_template")
    if expected_template is None:
        return
    text = tokenizer_chat_template(tokenizer)
    actual_template = template_hash(text) if text is not None else None
    if actual_template != expected_template:
        has = f"chat template {actual_template}" if actual_template else "no chat template"
        raise ConfigError(
            f"{where}: shards were rendered with the chat template {expected_template}, but"
            f" {_tokenizer_name(tokenizer)} has {has}; use the tokenizer (and template) the"
            " shards were converted with, or reconvert them"
        )


def train_bpe_tokenizer(
    texts: Iterable[str],
    output_dir: str,
    *,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    chat_template: bool = False,
) -> str:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a Hugging Face directory.

    The directory holds ``tokenizer.json`` and ``tokenizer_config.json`` (EOS and BOS are the
    first special token, padding the second), so both :class:`TextTokenizer` and
    ``transformers.AutoTokenizer.from_pretrained(dir)`` load it offline. Byte-level BPE decodes
    back to the exact input text.

    With ``chat_template``, `DEFAULT_CHAT_TEMPLATE` goes into ``tokenizer_config.json`` and its
    markup tokens (`CHAT_SPECIAL_TOKENS`) are added as special tokens.

    Returns:
        The path of the written ``tokenizer.json``.
    """
    special_tokens = list(special_tokens)
    if chat_template:
        special_tokens += [t for t in CHAT_SPECIAL_TOKENS if t not in special_tokens]
    if vocab_size < 256 + len(special_tokens):
        raise ConfigError(f"vocab_size {vocab_size} is too small; byte-level BPE needs >= 260")
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "tokenizer.json")
    tok.save(path)
    eos = special_tokens[0] if special_tokens else None
    pad = special_tokens[1] if len(special_tokens) > 1 else eos
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "bos_token": eos,
        "pad_token": pad,
        "unk_token": None,
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return path
