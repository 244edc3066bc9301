"""How closely a converted model reproduces its AR parent: agreement metrics, diversity, and the parent's NLL.

All of it is metrics over outputs that something else generated (no decoding here):
  * exact match: the two answers are the same token sequence (texts: the same after stripping outer whitespace);
  * positional agreement: the share of positions holding the same token, over the shorter answer's length (both
    empty: 1; exactly one empty: 0);
  * prefix agreement: how many leading tokens agree before the first difference, as a count and as a share of the
    longer answer (so it is 1 only for identical answers);
  * distinct-n (n = 1..4): unique n-grams / all n-grams over a set of outputs (corpus level, Li et al. 2016), the
    usual check that fast parallel decoding has not collapsed into repetition;
  * the AR parent's negative log-likelihood per token of a generated completion given its prompt: how plausible the
    parent finds what the converted model wrote.

Texts are compared as tokens when a tokenizer is given (encoded without special tokens), else as whitespace words;
token-id sequences are compared as they are. Means over pairs are unweighted (each answer counts once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.open import context_length

Output = str | Sequence[int]
DISTINCT_ORDERS = (1, 2, 3, 4)


@dataclass(frozen=True)
class PairAgreement:
    exact: bool
    positional: float  # equal positions / shorter length
    prefix_tokens: int  # length of the common leading prefix
    prefix_fraction: float  # prefix_tokens / longer length


def _units(output: Output, tokenizer=None) -> list:
    if isinstance(output, str):
        if tokenizer is not None:
            return list(tokenizer.encode(output, add_special_tokens=False))
        return output.split()
    if isinstance(output, torch.Tensor):
        return output.flatten().tolist()
    return list(output)


def sequence_agreement(ar: Sequence, model: Sequence) -> PairAgreement:
    """Agreement between two token (or word) sequences; `ar` is the parent's, `model` the converted model's."""
    ar, model = list(ar), list(model)
    shorter, longer = min(len(ar), len(model)), max(len(ar), len(model))
    if longer == 0:
        return PairAgreement(True, 1.0, 0, 1.0)
    same = [a == b for a, b in zip(ar, model)]
    prefix = next((i for i, s in enumerate(same) if not s), shorter)
    positional = sum(same) / shorter if shorter else 0.0
    return PairAgreement(ar == model, positional, prefix, prefix / longer)


def pair_agreement(ar: Output, model: Output, tokenizer=None) -> PairAgreement:
    """`sequence_agreement` of two outputs given as texts or token ids (see the module docstring)."""
    result = sequence_agreement(_units(ar, tokenizer), _units(model, tokenizer))
    if isinstance(ar, str) and isinstance(model, str):
        # Texts: exact means the same text (outer whitespace aside), even if a tokenizer would split it differently.
        result = PairAgreement(ar.strip() == model.strip(), result.positional, result.prefix_tokens,
                               result.prefix_fraction)
    return result


def distinct_n(outputs: Sequence[Output], n: int) -> float:
    """Unique n-grams / total n-grams over all outputs (texts: whitespace words; sequences: their items)."""
    if n < 1:
        raise Ar2dlmError(f"distinct-n needs n >= 1, got {n}")
    grams = []
    for out in outputs:
        units = _units(out)
        grams.extend(tuple(units[i:i + n]) for i in range(len(units) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def fidelity_report(ar_outputs: Sequence[Output], model_outputs: Sequence[Output], tokenizer=None) -> dict:
    """Mean agreement of paired answers plus distinct-n of each side, as a flat JSON-ready dict."""
    if len(ar_outputs) != len(model_outputs):
        raise Ar2dlmError(f"fidelity needs paired outputs: {len(ar_outputs)} AR answers, {len(model_outputs)} model "
                          "answers")
    if not ar_outputs:
        raise Ar2dlmError("fidelity needs at least one pair of answers")
    pairs = [pair_agreement(a, m, tokenizer) for a, m in zip(ar_outputs, model_outputs)]
    n = len(pairs)
    report = {
        "pairs": n,
        "exact_match": sum(p.exact for p in pairs) / n,
        "positional_agreement": sum(p.positional for p in pairs) / n,
        "prefix_agreement": sum(p.prefix_fraction for p in pairs) / n,
        "mean_prefix_tokens": sum(p.prefix_tokens for p in pairs) / n,
    }
    for k in DISTINCT_ORDERS:
        report[f"distinct_{k}"] = distinct_n(model_outputs, k)
    for k in DISTINCT_ORDERS:
        report[f"ar_distinct_{k}"] = distinct_n(ar_outputs, k)
    return report


@dataclass(frozen=True)
class CompletionNLL:
    total: float  # summed negative log-likelihood, nats
    tokens: int  # completion tokens scored

    @property
    def per_token(self) -> float:
        return self.total / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.per_token) if self.tokens else float("nan")


def _ids(x: Output, tokenizer, what: str) -> list[int]:
    if isinstance(x, str):
        if tokenizer is None:
            raise Ar2dlmError(f"NLL of a text {what} needs a tokenizer (or pass token ids)")
        return list(tokenizer.encode(x, add_special_tokens=False))
    return [int(t) for t in _units(x)]


@torch.no_grad()
def completion_nll(model, prompt: Output, completion: Output, tokenizer=None) -> CompletionNLL:
    """NLL of `completion` given `prompt` under a HF causal LM (`model(input_ids).logits`); only completion tokens
    are scored. Texts are encoded without special tokens: pass the exact prompt (a rendered chat template carries
    its own BOS) or token ids. The model runs in eval mode for the call (dropout would make the value random)."""
    prompt_ids, completion_ids = _ids(prompt, tokenizer, "prompt"), _ids(completion, tokenizer, "completion")
    if not prompt_ids:
        raise Ar2dlmError("NLL needs at least one prompt token to condition the first completion token on (e.g. BOS)")
    if not completion_ids:
        return CompletionNLL(0.0, 0)
    limit = context_length(model)
    if limit and len(prompt_ids) + len(completion_ids) > limit:
        raise Ar2dlmError(f"prompt + completion is {len(prompt_ids) + len(completion_ids)} tokens, longer than the "
                          f"model's {limit} positions")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(ids).logits[0]
    finally:
        model.train(was_training)
    # The token at position p is predicted from the logits at p - 1.
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1:-1].float(), dim=-1)
    target = torch.tensor(completion_ids, device=device)
    nll = -logprobs.gather(-1, target[:, None]).squeeze(-1)
    return CompletionNLL(float(nll.double().sum()), len(completion_ids))


def mean_completion_nll(model, pairs: Sequence[tuple[Output, Output]], tokenizer=None) -> CompletionNLL:
    """Token-weighted NLL over (prompt, completion) pairs: total nats / total completion tokens."""
    total, tokens = 0.0, 0
    for prompt, completion in pairs:
        r = completion_nll(model, prompt, completion, tokenizer)
        total, tokens = total + r.total, tokens + r.tokens
    return CompletionNLL(total, tokens)
