"""Prompt-lookup drafts: the tokens that followed the last earlier occurrence of a sequence's final n-gram.

Answers copy their prompt a lot (names, numbers, code identifiers, a question restated), and an n-gram seen before
is often followed by what followed it then. Such drafts cost no model work, only positions in the verify forward;
the verify policy uses them where its model has no drafts to offer (`DecodeParams.lookup_drafts`), as Hugging Face's
`prompt_lookup_num_tokens` does for plain AR decoding (Saxena, 2023).
"""

from __future__ import annotations

from collections.abc import Sequence

NGRAM_SIZES = (3, 2)  # longest first; a single repeated token predicts too little to pay for the positions


def lookup_drafts(tokens: Sequence[int], max_drafts: int, ngram_sizes: Sequence[int] = NGRAM_SIZES) -> list[int]:
    """Up to `max_drafts` tokens that followed the latest earlier occurrence of the last n tokens, trying the
    longest n first; [] when none of the n-grams occurred before."""
    if max_drafts < 1:
        return []
    for n in ngram_sizes:
        if len(tokens) <= n:
            continue
        tail = list(tokens[-n:])
        first = tail[0]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest occurrence first
            if tokens[start] == first and list(tokens[start:start + n]) == tail:
                return list(tokens[start + n:start + n + max_drafts])
    return []
