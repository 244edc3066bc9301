"""Raw records: reading JSON lines, and recognising what one record holds (a conversation or plain text).

Record formats, detected per record (first match wins):
  * chat:        `{"messages": [{"role": ..., "content": ...}, ...]}` (also ShareGPT `conversations` with
                 `from`/`value`); every assistant turn is a response.
  * instruction: a prompt field (`prompt`, `instruction`, `question`, `input`) and a response field
                 (`response`, `output`, `answer`, `completion`); `instruction` + non-empty `input` are joined
                 with a blank line; an optional `system` string becomes a system turn.
  * plain text:  `{"text": ...}` (or the field named by `text_field`, which forces plain text).

A record that fits none is an `Ar2dlmError` naming where it came from, never skipped silently.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ar2dlm.errors import Ar2dlmError

PROMPT_KEYS = ("prompt", "instruction", "question", "input")
RESPONSE_KEYS = ("response", "output", "answer", "completion")
CHAT_KEYS = ("messages", "conversations")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant"}


# ----------------------------------------------------------------------------------------------- JSON lines
def first_line(e: BaseException) -> str:
    """The first line of an exception's message, short enough for a one-line error."""
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def read_text_lines(path: Path, opener=open) -> list[str]:
    """All lines of a UTF-8 text file; unreadable or non-UTF-8 input is one error line naming the file."""
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise Ar2dlmError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise Ar2dlmError(f"{path}: cannot read ({first_line(e)})") from None


def iter_jsonl(path: Path, lines) -> Iterator[tuple[str, object]]:
    """(`file:line`, parsed record) for every non-blank line; invalid JSON is an error naming its line."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{i}", json.loads(line)
        except json.JSONDecodeError as e:
            raise Ar2dlmError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None


def iter_jsonl_file(path: Path) -> Iterator[tuple[str, object]]:
    """Records of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    yield from iter_jsonl(path, read_text_lines(path, opener))


def require_fields(where: str, rec: object, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """Check that `rec` is an object holding `fields` of the given types; one error line naming the location."""
    if not isinstance(rec, dict):
        raise Ar2dlmError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key, kind in fields.items():
        if key not in rec:
            raise Ar2dlmError(f"{where}: missing field {key!r}")
        if not isinstance(rec[key], kind):
            raise Ar2dlmError(f"{where}: field {key!r} has type {type(rec[key]).__name__}")
    return rec


# ----------------------------------------------------------------------------------------------- formats
@dataclass
class Record:
    """One raw record, recognised: a conversation to learn the assistant turns of, or text to pack."""

    kind: str  # "chat" or "text"
    where: str  # file:line (or dataset row) for error messages
    messages: list[dict] = field(default_factory=list)
    text: str = ""
    origin: str = ""  # "chat", "instruction" or "text": the format the record came in


def _messages(where: str, raw, key: str) -> list[dict]:
    """A chat record's turns as {"role", "content"} dicts (ShareGPT `from`/`value` mapped to roles)."""
    if not isinstance(raw, list) or not raw:
        raise Ar2dlmError(f"{where}: '{key}' must be a non-empty list of turns")
    out = []
    for j, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise Ar2dlmError(f"{where}: {key}[{j}] must be an object, got {type(turn).__name__}")
        if "role" in turn or "content" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:
            role, content = turn.get("from"), turn.get("value")
            role = _SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
        if not isinstance(role, str) or not role:
            raise Ar2dlmError(f"{where}: {key}[{j}] needs a string 'role'")
        if not isinstance(content, str):
            raise Ar2dlmError(f"{where}: {key}[{j}] needs a string 'content', got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise Ar2dlmError(f"{where}: '{key}' has no assistant turn to learn from")
    return out


def _string_field(where: str, rec: dict, key: str) -> str:
    if not isinstance(rec[key], str):
        raise Ar2dlmError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def _instruction_messages(where: str, rec: dict, pkey: str, rkey: str) -> list[dict]:
    """[system,] user, assistant turns of an instruction record."""
    prompt, response = _string_field(where, rec, pkey), _string_field(where, rec, rkey)
    if pkey == "instruction" and isinstance(rec.get("input"), str) and rec["input"].strip():
        prompt = f"{prompt}\n\n{rec['input']}"
    messages = []
    if rec.get("system") is not None:
        messages.append({"role": "system", "content": _string_field(where, rec, "system")})
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def parse_record(where: str, rec, text_field: str | None = None) -> Record:
    """Detect the format of one raw record; raise Ar2dlmError naming `where` if it fits none."""
    if not isinstance(rec, dict):
        raise Ar2dlmError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if text_field is not None:
        if text_field not in rec:
            raise Ar2dlmError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, rec)) or 'none'})")
        return Record("text", where, text=_string_field(where, rec, text_field), origin="text")
    for key in CHAT_KEYS:
        if key in rec:
            return Record("chat", where, messages=_messages(where, rec[key], key), origin="chat")
    pkey = next((k for k in PROMPT_KEYS if k in rec), None)
    rkey = next((k for k in RESPONSE_KEYS if k in rec), None)
    if pkey is not None and rkey is not None:
        return Record("chat", where, messages=_instruction_messages(where, rec, pkey, rkey), origin="instruction")
    if "text" in rec:
        return Record("text", where, text=_string_field(where, rec, "text"), origin="text")
    if pkey is not None or rkey is not None:
        have, want = (pkey, RESPONSE_KEYS) if pkey else (rkey, PROMPT_KEYS)
        raise Ar2dlmError(f"{where}: has {have!r} but none of {', '.join(want)}")
    raise Ar2dlmError(
        f"{where}: unknown record format (fields: {', '.join(map(str, rec)) or 'none'}); expected 'messages', "
        f"a prompt field ({'/'.join(PROMPT_KEYS)}) with a response field ({'/'.join(RESPONSE_KEYS)}), or 'text'"
    )
