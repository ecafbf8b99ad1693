"""Generate a small synthetic chat corpus (JSONL of conversations) to fine-tune on, offline.

The conversations follow a few learnable patterns (add two numbers, reverse words, name the
capital of a made-up country, thank-you follow-ups), some with a system prompt and some with two
exchanges, so a tiny model's loss on the assistant replies falls within a few dozen steps.

    python tools/make_chat_corpus.py OUT_DIR --train 2000 --eval 200
    python tools/make_chat_corpus.py OUT_DIR --shape sharegpt    # or alpaca, prompt_response

Writes ``OUT_DIR/train.jsonl`` and ``OUT_DIR/eval.jsonl`` (same patterns, other draws), one
conversation per line, in the shape asked for: OpenAI ``messages`` (default), ShareGPT
``conversations``, Alpaca ``instruction``/``input``/``output`` or ``prompt``/``response`` (the
last two are single exchanges without a system prompt). Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SYLLABLES = ("ka", "lo", "mi", "ren", "to", "va", "shi", "gor", "pel", "dun", "ar", "is")
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "quiet",
    "music",
    "paper",
    "window",
    "garden",
    "silver",
    "orange",
    "mountain",
    "candle",
    "forest",
    "bright",
    "yellow",
    "winter",
    "summer",
    "ocean",
]
SYSTEM = "You are a helpful assistant. Answer briefly."
SHAPES = ("messages", "sharegpt", "alpaca", "prompt_response")


def _countries(rng: random.Random, n: int = 24) -> list[tuple[str, str]]:
    def name(k: int) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(k)).capitalize()

    return [(name(2) + "land", name(3)) for _ in range(n)]


def _exchange(rng: random.Random, countries: Sequence[tuple[str, str]]) -> tuple[str, str, str]:
    """One (instruction, input, answer) of a random task."""
    task = rng.randrange(3)
    if task == 0:
        a, b = rng.randrange(20), rng.randrange(20)
        return "Add the two numbers.", f"{a} and {b}", f"{a} plus {b} is {a + b}."
    if task == 1:
        words = rng.sample(WORDS, rng.randrange(2, 5))
        return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))
    country, capital = rng.choice(countries)
    return f"What is the capital of {country}?", "", f"The capital of {country} is {capital}."


def _prompt(instruction: str, given: str) -> str:
    return f"{instruction}\n{given}" if given else instruction


def conversation(rng: random.Random, countries: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """A conversation as OpenAI messages: maybe a system prompt, one or two exchanges."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    instruction, given, answer = _exchange(rng, countries)
    messages += [
        {"role": "user", "content": _prompt(instruction, given)},
        {"role": "assistant", "content": answer},
    ]
    if rng.random() < 0.3:
        messages += [
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."},
        ]
    return messages


def record(rng: random.Random, countries: Sequence[tuple[str, str]], shape: str) -> dict[str, Any]:
    """One conversation in ``shape``."""
    if shape == "alpaca":
        instruction, given, answer = _exchange(rng, countries)
        return {"instruction": instruction, "input": given, "output": answer}
    if shape == "prompt_response":
        instruction, given, answer = _exchange(rng, countries)
        return {"prompt": _prompt(instruction, given), "response": answer}
    messages = conversation(rng, countries)
    if shape == "sharegpt":
        who = {"system": "system", "user": "human", "assistant": "gpt"}
        turns = [{"from": who[m["role"]], "value": m["content"]} for m in messages]
        return {"conversations": turns}
    return {"messages": messages}


def write_split(path: Path, count: int, rng: random.Random, countries: Any, shape: str) -> None:
    """Write ``count`` conversations to ``path`` as JSONL."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            row = {"id": f"{path.stem}-{i:06d}", **record(rng, countries, shape)}
            f.write(json.dumps(row) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--train", type=int, default=2000, help="conversations in train.jsonl")
    parser.add_argument("--eval", type=int, default=200, help="conversations in eval.jsonl")
    parser.add_argument("--shape", choices=SHAPES, default="messages")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    countries = _countries(random.Random(args.seed))  # the same facts in both splits
    write_split(
        args.output / "train.jsonl", args.train, random.Random(args.seed + 1), countries, args.shape
    )
    write_split(
        args.output / "eval.jsonl", args.eval, random.Random(args.seed + 2), countries, args.shape
    )
    print(f"wrote {args.train} + {args.eval} {args.shape} conversations to {args.output}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
