"""`draft_len auto`: the chooser's arithmetic, and the engine choosing per forward with output still the AR model's."""

from __future__ import annotations

import argparse

import pytest

from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.engine.draft_length import DraftLengthChooser, verify_width
from ar2dlm.engine.params import add_decode_args, decode_params_from_args
from ar2dlm.engine.test_verify import PROMPTS, _hf_greedy, _random_adapter_drafter, parent_and_dlm, tok  # noqa: F401
from ar2dlm.errors import Ar2dlmError


def test_width_of_a_verify_forward():
    assert [verify_width(d, False) for d in (1, 2, 3)] == [4, 6, 8]
    assert [verify_width(d, True) for d in (1, 2, 3)] == [6, 12, 20]


def _chooser(costs: dict[int, float], every_length=False, max_drafts=3):
    seen = []

    def cost(masks):
        seen.append(dict(masks))
        return {w: costs[w] for w in masks}

    chooser = DraftLengthChooser(max_drafts, every_length, cost)
    # measured once, each width with its mask block: d + 1 masks, or (d + 1)^2 with every_length
    assert seen == [{verify_width(d, every_length): (d + 1) ** (2 if every_length else 1)
                     for d in range(1, max_drafts + 1)}]
    return chooser


def test_flat_cost_drafts_as_far_as_it_can_and_steep_cost_needs_acceptance():
    flat = _chooser({4: 1.0, 6: 1.0, 8: 1.0})
    assert flat.choose() == 3
    steep = _chooser({4: 1.0, 6: 1.3, 8: 1.6})
    for _ in range(50):  # drafts almost never accepted: one draft is all that pays
        steep.record(checked=3, accepted=0)
    assert steep.rates()[0] < 0.05 and steep.choose() == 1
    for _ in range(500):  # then always accepted (the old forwards fade): T(3) ~ 4 tokens for 1.6x the cost of T(1) ~ 2
        steep.record(checked=3, accepted=3)
    assert steep.expected_tokens(3) == pytest.approx(4.0, abs=0.15) and steep.choose() == 3


def test_record_counts_drafts_reached_only():
    chooser = _chooser({4: 1.0, 6: 1.0, 8: 1.0})
    chooser.record(checked=3, accepted=1)  # draft 1 accepted, draft 2 rejected, draft 3 never judged
    assert chooser.offered == [1, 1, 0] and chooser.accepted == [1, 0, 0]
    chooser.record(checked=1, accepted=1)  # the earlier forward now counts 0.98
    assert chooser.offered == pytest.approx([1.98, 0.98, 0]) and chooser.accepted == pytest.approx([1.98, 0, 0])


def test_auto_is_a_draft_len_everywhere():
    assert DecodeParams.from_spec("verify:auto").draft_len == "auto"
    assert DecodeParams.from_spec("verify:auto+all").label == "verify:auto+all"
    assert DecodeParams.from_mapping({"policy": "verify", "draft_len": "auto"}).draft_len == "auto"
    assert DecodeParams.from_mapping({"policy": "verify", "draft_len": 2}).draft_len == 2
    parser = argparse.ArgumentParser()
    add_decode_args(parser)
    assert decode_params_from_args(parser.parse_args(["--draft-len", "auto"])).draft_len == "auto"
    assert decode_params_from_args(parser.parse_args(["--draft-len", "3"])).draft_len == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["--draft-len", "often"])
    for bad in ("often", 0, True, 2.5):
        with pytest.raises(Ar2dlmError, match="draft_len"):
            DecodeParams.from_mapping({"policy": "verify", "draft_len": bad})


@pytest.mark.parametrize("every_length", [False, True])
def test_engine_auto_chooses_per_forward_and_keeps_the_output(tok, parent_and_dlm, every_length):  # noqa: F811
    parent, _ = parent_and_dlm
    drafter = _random_adapter_drafter(tok)
    engine = Engine(drafter, tok, max_running=2)
    params = DecodeParams(policy="verify", draft_len="auto", max_new_tokens=14, stop_token_ids=(),
                          draft_every_length=every_length)
    results = engine.generate_batch(PROMPTS, params)
    assert [r.tokens for r in results] == [_hf_greedy(parent, tok(p)["input_ids"], 14) for p in PROMPTS]
    chooser = engine._choosers[every_length]
    assert sum(chooser.offered) > 0 and set(chooser.cost) == {1, 2, 3}
