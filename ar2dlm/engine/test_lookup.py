"""Prompt-lookup drafts."""

from __future__ import annotations

from ar2dlm.engine.lookup import lookup_drafts


def test_the_latest_occurrence_of_the_longest_ngram_wins():
    toks = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 6, 1, 2, 3]
    assert lookup_drafts(toks, 3) == [9, 9, 5]  # "1 2 3" was followed by 9 9 5 ...
    assert lookup_drafts(toks, 3, ngram_sizes=(2,)) == [7, 8, 6]  # ... and "2 3", last, by 7 8 6
    assert lookup_drafts(toks, 1) == [9]


def test_no_match_no_drafts_and_the_tail_is_not_its_own_match():
    assert lookup_drafts([1, 2, 3, 4], 3) == []
    assert lookup_drafts([5, 5], 3) == []  # a 2-gram needs an earlier occurrence
    assert lookup_drafts([5, 5, 5], 3) == [5]  # the occurrence may overlap the tail: what followed it is known
    assert lookup_drafts([1, 2, 1, 2], 0) == []
    assert lookup_drafts([1, 2, 1, 2], 5) == [1, 2]  # runs up to the end of the sequence at most
