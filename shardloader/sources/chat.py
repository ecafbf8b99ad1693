r"""Chat and instruction records: detect their shape, normalize them to ``messages``, check them.

Four shapes are read, each normalized to a list of ``{"role", "content"}`` turns (roles
``system``, ``user``, ``assistant``), the shape the packer renders with a chat template:

- ``messages``: OpenAI style, ``{"messages": [{"role": ..., "content": ...}, ...]}``;
- ``sharegpt``: ``{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}``;
- ``alpaca``: ``{"instruction", "input" (optional), "output"}`` -> one user turn (the instruction,
  then ``"\n\n"`` and the input when it is not empty) and one assistant turn;
- ``prompt_response``: ``{"prompt", "response"}`` -> one user and one assistant turn.

A conversation is bad (reported to `BadRecords` with its file:line, so counted under
``on_bad_record="skip"``) when a turn has an unknown or missing role or non-string content, an
assistant turn is empty, there is no assistant turn, or the last turn is not the assistant's;
a record without the shape's fields is bad too (``bad_chat_shape``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shardloader.sources.records import BadRecords, Document, RecordSpec, make_document, type_name

SCHEMAS = ("auto", "text", "messages", "sharegpt", "alpaca", "prompt_response")
CHAT_SCHEMAS = ("messages", "sharegpt", "alpaca", "prompt_response")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# The fields each chat shape reads (Parquet columns to load), in order of detection.
SCHEMA_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_response": ("prompt", "response"),
}


def detect_schema(record: Mapping[str, Any], text_field: str = "text") -> str:
    """The shape of one record: ``text`` when it has ``text_field``, else the chat shape it fits.

    A record with a text field stays ``text`` (so text corpora convert as before); one that fits
    no chat shape is ``text`` too, and the text reader then reports the missing field.
    """
    if text_field in record:
        return "text"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "response" in record:
        return "prompt_response"
    return "text"


def dump_messages(messages: list[dict[str, str]]) -> str:
    """The canonical JSON text of a conversation, as shards store ``json`` fields."""
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def make_chat_document(
    record: Mapping[str, Any], default_id: str, where: str, spec: RecordSpec, bad: BadRecords
) -> Document | None:
    """Like `make_document` for a chat record: its text is the canonical JSON of its turns.

    ``None`` if the conversation (or its id or a kept field) is bad, reported to ``bad``.
    """
    turns = record_messages(record, spec.schema, where, bad)
    if turns is None:
        return None
    return make_document(
        {**record, spec.text_field: dump_messages(turns)}, default_id, where, spec, bad
    )


def record_messages(
    record: Mapping[str, Any], schema: str, where: str, bad: BadRecords
) -> list[dict[str, str]] | None:
    """Normalize one record of chat shape ``schema`` to checked turns; ``None`` if it is bad.

    A bad record is reported to ``bad`` (which raises unless it skips) under its kind.
    """
    if schema == "messages":
        turns = _turns(record, "messages", "role", "content", None, where, bad)
    elif schema == "sharegpt":
        turns = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES, where, bad)
    elif schema == "alpaca":
        turns = _pair(record, ("instruction", "output"), where, bad, extra="input")
    else:
        turns = _pair(record, ("prompt", "response"), where, bad)
    if turns is None:
        return None
    return turns if _check_conversation(turns, where, bad) else None


def _wrong_shape(record: Mapping[str, Any], what: str, where: str, bad: BadRecords) -> None:
    present = ", ".join(sorted(record)[:8]) or "none"
    bad.report(
        "bad_chat_shape",
        where,
        f"{what} (fields present: {present}); choose the shape with --schema",
    )


def _turns(
    record: Mapping[str, Any],
    key: str,
    role_key: str,
    content_key: str,
    role_map: Mapping[str, str] | None,
    where: str,
    bad: BadRecords,
) -> list[dict[str, str]] | None:
    value = record.get(key)
    if not isinstance(value, list) or not value:
        found = "missing" if key not in record else f"{type_name(value)}"
        if isinstance(value, list):
            found = "an empty array"
        _wrong_shape(record, f"field {key!r} is {found}, expected an array of turns", where, bad)
        return None
    known = role_map if role_map is not None else {r: r for r in ROLES}
    turns = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            _wrong_shape(
                record, f"{key}[{index}] is {type_name(turn)}, expected an object", where, bad
            )
            return None
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in known:
            what = "has no role" if role is None else f"has unknown role {role!r:.40}"
            bad.report(
                "bad_role",
                where,
                f"{key}[{index}] {what} ({role_key!r}); expected one of {', '.join(known)}",
            )
            return None
        content = turn.get(content_key)
        if not isinstance(content, str):
            bad.report(
                "bad_content",
                where,
                f"{key}[{index}] {content_key!r} is {type_name(content)}, expected a string",
            )
            return None
        turns.append({"role": known[role], "content": content})
    return turns


def _pair(
    record: Mapping[str, Any],
    keys: tuple[str, str],
    where: str,
    bad: BadRecords,
    extra: str | None = None,
) -> list[dict[str, str]] | None:
    prompt_key, reply_key = keys
    missing = [k for k in keys if k not in record]
    if missing:
        _wrong_shape(record, f"no {' or '.join(map(repr, missing))} field", where, bad)
        return None
    for key in (*keys, *([extra] if extra else [])):
        value = record.get(key)
        if not isinstance(value, str) and not (key == extra and value is None):
            bad.report(
                "bad_content", where, f"field {key!r} is {type_name(value)}, expected a string"
            )
            return None
    prompt = record[prompt_key]
    if extra and record.get(extra):
        prompt = f"{prompt}\n\n{record[extra]}"
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": record[reply_key]},
    ]


def _check_conversation(turns: list[dict[str, str]], where: str, bad: BadRecords) -> bool:
    roles = [t["role"] for t in turns]
    if "assistant" not in roles:
        bad.report("no_assistant_turn", where, "the conversation has no assistant turn to train on")
        return False
    for index, turn in enumerate(turns):
        if turn["role"] == "assistant" and not turn["content"]:
            bad.report("empty_assistant_turn", where, f"turn {index} (assistant) is empty")
            return False
    if roles[-1] != "assistant":
        bad.report(
            "not_ending_with_assistant",
            where,
            f"the conversation ends with a {roles[-1]} turn, expected an assistant turn",
        )
        return False
    return True
