"""Reading JSON-lines data with errors that name the file and line (shared by training data and eval tasks)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from ar2dlm.errors import Ar2dlmError


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, short enough for a one-line error."""
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def read_text_lines(path: Path, opener=open) -> list[str]:
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
