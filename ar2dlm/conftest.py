"""Fixtures shared by the tests: the tiny offline tokenizer, with and without a chat template."""

import copy

import pytest

from ar2dlm.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    t = copy.deepcopy(tiny_tokenizer())
    t.chat_template = None
    return t
