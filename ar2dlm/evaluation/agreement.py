"""What the jobs that set a dLM's answers beside its AR parent's share (compare, bench, eval's fidelity prompts): the
built-in prompts, reading a prompts file, and how two answers' token lists are cut and compared."""

from __future__ import annotations

from ar2dlm.errors import Ar2dlmError

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that returns the largest number in a list.",
    "Give me three tips for sleeping better.",
    "Explain what photosynthesis is in two sentences.",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "What is the difference between a list and a tuple in Python?",
    "Write a short poem about the sea.",
]


def load_prompts(path: str | None) -> list[str]:
    """One prompt per non-blank line of `path` (the built-in ones without a path); none at all is an error."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise Ar2dlmError(f"cannot read prompts from {path}: {e}") from None
    if not prompts:
        raise Ar2dlmError(f"no prompts in {path} (one prompt per line)")
    return prompts


def trim_at_stop(tokens: list[int], stops) -> list[int]:
    """The tokens up to and including the first stop token (Hugging Face `generate` pads finished rows after it)."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


def leading_agreement(a: list[int], b: list[int]) -> float:
    """Share of the longer answer covered by the common prefix (1.0 = identical)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b), 1)
