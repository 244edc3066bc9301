"""Pulling the program out of a model's completion for the code tasks (HumanEval, MBPP).

Completions arrive in three shapes: a bare continuation of the prompt (base models, or a chat answer pre-filled
with the function header), a fenced ```python block inside prose (chat models), or a whole definition written
again without a fence. Generation usually runs to a fixed length, so the tail is often a half-written function or
unrelated text: we cut at lines that cannot belong to the program and then keep the longest prefix (by lines) that
compiles, so one truncated trailing helper does not sink an otherwise correct answer.
"""

from __future__ import annotations

import re

_FENCE_OPEN = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$")
_FENCE_CLOSE = re.compile(r"^[ \t]*```[ \t]*$")
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
# A line at column 0 that starts (or continues) a Python program; any other column-0 line ends a bare body.
_CODE_START = re.compile(r"^(def |async def |class |import |from |@)")


def fenced_blocks(text: str) -> list[str]:
    """Contents of ``` fenced blocks tagged python (or untagged); an unclosed last block runs to the end."""
    blocks: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i])
        if m is None:
            i += 1
            continue
        tag = m.group(1).lower()
        body = []
        i += 1
        while i < len(lines) and not _FENCE_CLOSE.match(lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # skip the closing fence
        if tag in _PYTHON_TAGS:
            blocks.append("\n".join(body) + "\n")
    return blocks


def compiles(source: str) -> bool:
    """Whether `source` is valid Python (compile only; nothing runs)."""
    try:
        compile(source, "<completion>", "exec")
        return True
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False


def longest_compiling_prefix(code: str, header: str = "") -> str:
    """The longest line-prefix of `code` such that `header + code_prefix` compiles ('' when none does)."""
    lines = code.splitlines(keepends=True)
    if compiles(header + code):
        return code
    for end in range(len(lines) - 1, 0, -1):
        candidate = "".join(lines[:end])
        if compiles(header + candidate):
            return candidate
    return ""


def cut_bare_continuation(text: str) -> str:
    """A continuation of a prompt ends at the first column-0 line that is not the start of a definition or import
    (prose, a closing fence, `if __name__`, a test call, a top-level comment)."""
    kept = []
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        if stripped and not stripped[0].isspace() and not _CODE_START.match(stripped):
            break
        kept.append(line)
    return "".join(kept)


def cut_at_line_prefixes(text: str, prefixes: tuple[str, ...]) -> str:
    """Everything before the first line that starts with one of `prefixes` (at column 0)."""
    kept = []
    for line in text.splitlines(keepends=True):
        if line.startswith(prefixes):
            break
        kept.append(line)
    return "".join(kept)


def strip_leading_prose(text: str) -> str:
    """Drop leading lines that are not Python (e.g. 'Here is the code:') when a definition or import follows."""
    lines = text.splitlines(keepends=True)
    first = next((line.strip() for line in lines if line.strip()), "")
    if not first or _CODE_START.match(first) or compiles(first):
        return text
    for i, line in enumerate(lines):
        if _CODE_START.match(line):
            return "".join(lines[i:])
    return text


def defines(code: str, name: str) -> bool:
    """Whether `code` has a top-level `def name(`."""
    return re.search(rf"^(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def pick_block(blocks: list[str], entry_point: str | None) -> str:
    """The block defining `entry_point`, else the first one defining any function, else the first block."""
    if entry_point:
        for block in blocks:
            if defines(block, entry_point):
                return block
    for block in blocks:
        if re.search(r"^(async\s+)?def\s", block, re.MULTILINE):
            return block
    return blocks[0]
