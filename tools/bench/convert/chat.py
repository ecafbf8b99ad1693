"""The chat case of the conversion benchmark: a chat corpus and a tokenizer with a chat template.

The chat corpus is made from the text corpus, file by file: each document becomes one
conversation (a fixed system turn, then user, assistant, user, assistant turns cut from its text
at quarters), so chat and text runs tokenize about the same text. The tokenizer is a byte-level
BPE (vocab 8192) trained by ``shardloader.train_bpe_tokenizer(chat_template=True)``: its
directory holds the default ChatML-like template that ``shardloader convert --tokenizer`` renders.

The bound for the chat case is the tokenizer alone on the same conversations: N processes that
read their share of the files, parse JSON and encode each conversation's turn contents joined by
newlines (no template, no markup, no offsets), writing nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tools.bench.harness import (
    BENCH_DIR,
    EOS_TOKEN,
    TOKENIZER_SAMPLE_BYTES,
    VOCAB_SIZE,
    Corpus,
    _sample_texts,
)

SYSTEM_PROMPT = "You are a helpful assistant. Answer in the style of the question."


def to_conversation(record: dict[str, Any]) -> dict[str, Any]:
    """One text record as a four-turn conversation (plus a system turn) cut from its text."""
    text = record["text"]
    n = len(text)
    a, b, c = n // 4, n // 2, 3 * n // 4
    return {
        "id": record["id"],
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": text[:a]},
            {"role": "assistant", "content": text[a:b] or "."},
            {"role": "user", "content": text[b:c]},
            {"role": "assistant", "content": text[c:] or "."},
        ],
    }


def contents(record: dict[str, Any]) -> str:
    """The text the tokenizer-alone bound encodes for a conversation: its turns, one per line."""
    return "\n".join(turn["content"] for turn in record["messages"])


def ensure_chat_corpus(corpus: Corpus) -> Corpus:
    """The chat version of ``corpus`` (same documents, as conversations), made once."""
    path = BENCH_DIR / f"chat-{corpus.path.name}"
    if not (path / "corpus.json").exists():
        staging = path.with_name(path.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        started = time.perf_counter()
        num_docs = 0
        for source in corpus.files:
            with source.open("rb") as lines, (staging / source.name).open("w") as out:
                for line in lines:
                    conversation = to_conversation(json.loads(line))
                    out.write(json.dumps(conversation, ensure_ascii=False) + "\n")
                    num_docs += 1
        (staging / "corpus.json").write_text(json.dumps({"num_docs": num_docs}))
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)
        print(f"generated {path} in {time.perf_counter() - started:.1f} s")
    files = tuple(sorted(path.glob("part-*.jsonl")))
    return Corpus(
        path=path,
        files=files,
        num_docs=json.loads((path / "corpus.json").read_text())["num_docs"],
        input_bytes=sum(f.stat().st_size for f in files),
    )


def ensure_chat_tokenizer(corpus: Corpus) -> Path:
    """A tokenizer directory with the default chat template, trained on ``corpus`` once."""
    path = BENCH_DIR / f"tokenizer-chat-{VOCAB_SIZE}-{corpus.path.name}"
    if (path / "tokenizer_config.json").exists():
        return path
    from shardloader.tokenizer import train_bpe_tokenizer

    started = time.perf_counter()
    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    train_bpe_tokenizer(
        _sample_texts(corpus, TOKENIZER_SAMPLE_BYTES),
        str(staging),
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        chat_template=True,
    )
    staging.rename(path)
    print(f"trained {path.name} in {time.perf_counter() - started:.1f} s")
    return path
