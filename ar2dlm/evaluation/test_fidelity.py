import math
from types import SimpleNamespace

import pytest
import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.fidelity import (
    completion_nll, distinct_n, fidelity_report, mean_completion_nll, pair_agreement, sequence_agreement,
)
from ar2dlm.testing import tiny_model, tiny_tokenizer


def test_sequence_agreement_cases():
    same = sequence_agreement([1, 2, 3], [1, 2, 3])
    assert same.exact and same.positional == 1.0 and same.prefix_tokens == 3 and same.prefix_fraction == 1.0
    r = sequence_agreement([1, 2, 3, 4], [1, 9, 3])  # shorter length 3: positions 0 and 2 agree
    assert not r.exact and r.positional == pytest.approx(2 / 3)
    assert r.prefix_tokens == 1 and r.prefix_fraction == pytest.approx(1 / 4)
    longer = sequence_agreement([1, 2], [1, 2, 5, 6])  # a strict prefix: positions all agree, prefix 2 of 4
    assert not longer.exact and longer.positional == 1.0 and longer.prefix_fraction == 0.5
    assert sequence_agreement([], []).exact and sequence_agreement([], []).positional == 1.0
    one_empty = sequence_agreement([], [7])
    assert not one_empty.exact and one_empty.positional == 0.0 and one_empty.prefix_fraction == 0.0


def test_pair_agreement_on_texts_with_and_without_tokenizer():
    r = pair_agreement("the quick brown fox", "the quick red fox ")
    assert not r.exact and r.positional == 0.75 and r.prefix_tokens == 2
    assert pair_agreement("  answer 72\n", "answer 72").exact
    tok = tiny_tokenizer()
    r = pair_agreement("the quick brown fox", "the quick brown fox", tokenizer=tok)
    assert r.exact and r.positional == 1.0
    assert pair_agreement(torch.tensor([1, 2]), [1, 2]).exact


def test_distinct_n_hand_computed():
    outs = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 unique / 7; bigrams: ab ba ab | ab bc -> 3 unique / 5
    assert distinct_n(outs, 1) == pytest.approx(3 / 7)
    assert distinct_n(outs, 2) == pytest.approx(3 / 5)
    assert distinct_n(outs, 4) == pytest.approx(1.0)  # only "a b a b"
    assert distinct_n(["a b"], 3) == 0.0
    assert distinct_n([[1, 1, 1]], 1) == pytest.approx(1 / 3)
    with pytest.raises(Ar2dlmError):
        distinct_n(outs, 0)


def test_fidelity_report():
    rep = fidelity_report(["a b c", "x y"], ["a b c", "x z"])
    assert rep["pairs"] == 2 and rep["exact_match"] == 0.5
    assert rep["positional_agreement"] == pytest.approx((1 + 0.5) / 2)
    assert rep["prefix_agreement"] == pytest.approx((1 + 0.5) / 2)
    assert rep["mean_prefix_tokens"] == pytest.approx(2)
    assert rep["distinct_1"] == pytest.approx(5 / 5) and rep["ar_distinct_1"] == 1.0
    assert set(rep) >= {f"distinct_{n}" for n in (1, 2, 3, 4)}
    with pytest.raises(Ar2dlmError):
        fidelity_report(["a"], [])
    with pytest.raises(Ar2dlmError):
        fidelity_report([], [])


class _TableLM(torch.nn.Module):
    """A causal LM whose next-token distribution depends only on the current token: probs = TABLE[token]."""

    TABLE = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]])

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.TABLE.log()[input_ids])


def test_completion_nll_hand_computed_on_a_table_model():
    lm = _TableLM()
    # prompt [2, 0]; completion [1, 2]: P(1 | last prompt token 0) = 0.5, P(2 | 1) = 0.7
    r = completion_nll(lm, [2, 0], [1, 2])
    assert r.tokens == 2
    assert r.total == pytest.approx(-math.log(0.5) - math.log(0.7))
    assert r.per_token == pytest.approx((-math.log(0.5) - math.log(0.7)) / 2)
    assert r.perplexity == pytest.approx(math.exp(r.per_token))
    both = mean_completion_nll(lm, [([2, 0], [1, 2]), ([1], [0])])  # + (-log 0.1) over one more token
    assert both.tokens == 3 and both.total == pytest.approx(r.total - math.log(0.1))
    assert completion_nll(lm, [0], []).tokens == 0
    with pytest.raises(Ar2dlmError):
        completion_nll(lm, [], [1])
    with pytest.raises(Ar2dlmError):
        completion_nll(lm, "text", [1])  # text without a tokenizer


def test_completion_nll_on_tiny_random_model_matches_manual_and_hf_loss():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), seed=3)
    prompt_ids = tok.encode("Natalia sold 48 clips", add_special_tokens=False)
    completion_ids = tok.encode(" in April and May", add_special_tokens=False)
    r = completion_nll(model, prompt_ids, completion_ids)
    assert r.tokens == len(completion_ids)

    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    manual = 0.0
    for j, token in enumerate(completion_ids):
        row = logits[len(prompt_ids) + j - 1]
        manual += math.log(sum(math.exp(v) for v in row.tolist())) - row[token].item()
    assert r.total == pytest.approx(manual, rel=1e-5)

    labels = ids.clone()
    labels[0, :len(prompt_ids)] = -100
    with torch.no_grad():
        hf_loss = model(ids, labels=labels).loss.item()
    assert r.per_token == pytest.approx(hf_loss, rel=1e-5)

    # Text input tokenises prompt and completion separately, giving the same ids here.
    text = completion_nll(model, "Natalia sold 48 clips", " in April and May", tokenizer=tok)
    assert text.total == pytest.approx(r.total, rel=1e-6)
    model.train()
    assert completion_nll(model, prompt_ids, completion_ids).total == pytest.approx(r.total, rel=1e-6)
    assert model.training  # mode restored


def test_completion_nll_rejects_overlong_input():
    model = tiny_model(vocab_size=300)
    with pytest.raises(Ar2dlmError):
        completion_nll(model, [1] * 200, [2] * 100)
