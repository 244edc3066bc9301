"""`draft_len auto`: the chooser's arithmetic, and the engine choosing per forward with output still the AR model's."""

from __future__ import annotations

import argparse
import math

import pytest

from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.engine.draft_length import DECAY, MIN_EVIDENCE, Choice, DraftLengthChooser, verify_shape, verify_width
from ar2dlm.engine.lookup import lookup_drafts
from ar2dlm.engine.params import add_decode_args, decode_params_from_args
from ar2dlm.engine.test_verify import PROMPTS, _hf_greedy, _random_adapter_drafter, parent_and_dlm, tok  # noqa: F401
from ar2dlm.errors import Ar2dlmError
from ar2dlm.testing import record_forwards


def test_shapes_of_verify_forwards():
    assert [verify_width(d, False) for d in (1, 2, 3)] == [4, 6, 8]
    assert [verify_width(d, True) for d in (1, 2, 3)] == [6, 12, 20]
    assert verify_shape(0, 0, False) == verify_shape(0, 0, True) == (1, 0)  # a plain forward
    assert verify_shape(0, 2, False) == verify_shape(0, 2, True) == (4, 3)  # no drafts yet: one block of 3 masks
    assert verify_shape(3, 0, False) == (4, 0)  # prompt-lookup drafts checked by a plain forward
    assert verify_shape(2, 2, True) == (12, 9)


def _chooser(costs, every_length=False, max_drafts=3, lookup=False):
    """A chooser over a cost function of (width, masks); checks it asks for every shape it needs, once."""
    seen = []

    def cost(shapes, rows):
        assert rows == 1
        seen.append(set(shapes))
        return {shape: costs(*shape) for shape in shapes}

    chooser = DraftLengthChooser(max_drafts, every_length, cost, lookup)
    lengths = range(max_drafts + 1)
    looked_up = {verify_shape(d or max_drafts, d, every_length) for d in lengths} if lookup else set()
    assert seen == [{verify_shape(d, d, every_length) for d in lengths} | {verify_shape(0, d, every_length)
                    for d in lengths} | looked_up]
    return chooser


def _flat(width, masks):
    return 1.0


def _steep(width, masks):  # a CPU: a forward of 8 positions costs 1.7x one of 1
    return 1.0 + 0.1 * (width - 1)


def test_flat_cost_drafts_as_far_as_it_can():
    assert _chooser(_flat).choose().drafts == 3
    assert _chooser(_flat, every_length=True).choose().drafts == 3


def test_steep_cost_drafts_only_when_acceptance_pays_and_else_runs_plain_forwards():
    steep = _chooser(_steep)
    assert steep.choose().drafts >= 1  # no evidence on the drafts yet: try them
    for _ in range(50):  # drafts never accepted: plain forwards are fastest
        steep.record(checked=3, accepted=0, model_drafts=True)
        steep.record(checked=0, accepted=0, model_drafts=False)  # the forward after a rejection has no drafts
    assert steep.model.rates()[0] < 0.05 and steep.choose().drafts == 0
    assert steep.rate(Choice(0, 0)) == pytest.approx(1.0)
    for _ in range(500):  # then always accepted (the old forwards fade): T(3) = 4 tokens for 1.7x the cost
        steep.record(checked=3, accepted=3, model_drafts=True)
    assert steep.model.expected(3)[0] == pytest.approx(4.0, abs=0.15) and steep.choose().drafts == 3


def test_two_states_a_rejection_costs_a_forward_without_drafts():
    """Half the first drafts accepted, every later one: drafting 3 would commit T = 1 + 0.5 * 3 = 2.5 tokens a
    forward if every forward had drafts, but half the time the next forward has none (1 token for the price of a
    forward drafting 3); the chain's rate says so."""
    chooser = _chooser(lambda width, masks: 1.0 + 0.05 * (width - 1))
    for _ in range(400):
        chooser.record(checked=3, accepted=0, model_drafts=True)
        chooser.record(checked=3, accepted=3, model_drafts=True)
    tokens, kept = chooser.model.expected(3)
    assert tokens == pytest.approx(2.5, abs=0.05) and kept == pytest.approx(0.5, abs=0.05)
    with_drafts, free = 1.0 + 0.05 * 7, 1.0 + 0.05 * 4  # widths 8 and 5
    expected = (tokens + (1 - kept) * 1.0) / (with_drafts + (1 - kept) * free)
    assert chooser.rate(Choice(3, 0)) == pytest.approx(expected)
    assert chooser.rate(Choice(3, 0)) < tokens / with_drafts


def test_drafts_of_every_length_never_lose_their_drafts():
    chooser = _chooser(_flat, every_length=True)
    for _ in range(400):
        chooser.record(checked=3, accepted=0, model_drafts=True)
        chooser.record(checked=3, accepted=3, model_drafts=True)
    assert chooser.rate(Choice(3, 0)) == pytest.approx(chooser.model.expected(3)[0])


def test_lookup_statistics_price_the_forwards_without_model_drafts():
    chooser = _chooser(_steep, lookup=True)
    for _ in range(300):  # lookup always finds drafts and all are accepted; the model's never are
        chooser.record(checked=3, accepted=0, model_drafts=True)
        chooser.record(checked=3, accepted=3, model_drafts=False, looked_up=True)
    assert chooser.lookup_found / chooser.lookup_tries == pytest.approx(1.0)
    assert chooser.choose() == Choice(0, 3)  # plain forwards checking 3 lookup drafts: ~4 tokens for width 4's cost
    assert chooser.rate(Choice(0, 3)) == pytest.approx(4.0 / _steep(4, 0), rel=0.1)  # the prior still counts a bit
    for _ in range(300):  # now lookup finds drafts but they are always wrong: forwards without it are cheaper
        chooser.record(checked=3, accepted=0, model_drafts=False, looked_up=True)
    assert chooser.choose() == Choice(0, 0)
    found = chooser.lookup_found
    chooser.record(checked=0, accepted=0, model_drafts=False, looked_up=False, plain=True)
    assert chooser.lookup_found == found  # a forward that did not look teaches nothing about lookup


def test_a_feature_drafter_looks_up_first_where_lookup_pays():
    """A feature drafter's forwards check lookup drafts where found (no drafter call before them) and its own
    elsewhere: the chooser prices that mix, and drops lookup where its drafts are wrong."""
    def cost(shapes, rows):
        return {shape: _steep(*shape) for shape in shapes}

    chooser = DraftLengthChooser(3, False, cost, lookup=True, drafter_cost=lambda rows: 0.05)
    assert chooser.seconds(3, 3, chooser.cost_at(1)) == pytest.approx(_steep(4, 0) + 0.05)  # + the drafter's call
    for _ in range(300):  # lookup finds drafts in half the forwards, all accepted; the model's: 3 or 1 accepted
        chooser.record(checked=3, accepted=3, model_drafts=False, looked_up=True)
        chooser.record(checked=3, accepted=3, model_drafts=True, looked_up=True)  # looked, found none
        chooser.record(checked=3, accepted=1, model_drafts=True, looked_up=True)
        chooser.record(checked=3, accepted=3, model_drafts=False, looked_up=True)
    assert chooser.lookup_found / chooser.lookup_tries == pytest.approx(0.5, abs=0.01)
    model_tokens, _ = chooser.model.expected(3)
    lookup_tokens, _ = chooser.looked_up.expected(3)
    want = (0.5 * lookup_tokens + 0.5 * model_tokens) / (0.5 * _steep(4, 0) + 0.5 * (_steep(4, 0) + 0.05))
    assert chooser.rate(Choice(3, 3)) == pytest.approx(want, rel=0.02)
    assert chooser.choose() == Choice(3, 3)  # better than either alone
    assert chooser.rate(Choice(3, 3)) > max(chooser.rate(Choice(3, 0)), chooser.rate(Choice(0, 3)))
    for _ in range(300):  # lookup drafts now always wrong: the drafter's alone are better
        chooser.record(checked=3, accepted=0, model_drafts=False, looked_up=True)
        chooser.record(checked=3, accepted=3, model_drafts=True, looked_up=True)
        chooser.record(checked=3, accepted=1, model_drafts=True, looked_up=True)
    assert chooser.choose().lookup == 0


def test_a_feature_drafters_batch_is_as_wide_as_its_longest_lookup_drafts():
    """In a batch, a row that found lookup drafts widens the whole forward to them: the chooser prices a forward at
    the lookup drafts' width whenever any row may have found some, so long lookup drafts beside short model drafts
    cost what they do."""
    def cost(shapes, rows):
        return {shape: _steep(*shape) for shape in shapes}

    chooser = DraftLengthChooser(7, False, cost, lookup=True, drafter_cost=lambda rows: 0.05)
    for _ in range(300):  # lookup finds drafts in a third of the forwards
        chooser.record(checked=7, accepted=2, model_drafts=False, looked_up=True)
        chooser.record(checked=1, accepted=1, model_drafts=True, looked_up=True)
        chooser.record(checked=1, accepted=0, model_drafts=True, looked_up=True)
    chooser.rows = 4
    found = (chooser.lookup_found + 0.5) / (chooser.lookup_tries + 1.0)
    any_found = 1 - (1 - found) ** 4
    tokens = found * chooser.looked_up.expected(7)[0] + (1 - found) * chooser.model.expected(1)[0]
    wide, narrow = _steep(8, 0) + 0.05, _steep(2, 0) + 0.05
    assert chooser.rate(Choice(1, 7)) == pytest.approx(tokens / (any_found * wide + (1 - any_found) * narrow))


def _plain_records_until_retry(chooser) -> int:
    plain = 0
    while chooser.choose().drafts == 0:
        chooser.record(checked=0, accepted=0, model_drafts=False, plain=True)
        plain += 1
    return plain


def test_plain_forwards_fade_the_evidence_until_drafts_are_tried_again():
    chooser = _chooser(_steep)
    for _ in range(100):  # ~43 forwards' worth of evidence (the older ones decayed)
        chooser.record(checked=3, accepted=0, model_drafts=True)
    assert chooser.choose().drafts == 0
    plain = _plain_records_until_retry(chooser)
    assert 550 < plain < 900  # faded to MIN_EVIDENCE forwards' worth: try the drafts again
    tries = 0
    while chooser.choose().drafts > 0:  # until twice MIN_EVIDENCE, even though they are still wrong
        chooser.record(checked=chooser.choose().drafts, accepted=0, model_drafts=True)
        tries += 1
    assert 3 < tries < 10


def _feature_chooser(max_drafts=3, lookup=False):
    return DraftLengthChooser(max_drafts, False, lambda shapes, rows: {s: _steep(*s) for s in shapes}, lookup=lookup,
                              drafter_cost=lambda rows: 0.3)


def test_a_feature_drafter_tries_its_drafts_again_soon():
    """Its drafts cost one drafter call and a few positions more, so a bad stretch (a dozen forwards at the start of
    an answer) must not switch them off for hundreds of forwards: the evidence ages at DECAY in plain forwards."""
    feature, masks = _feature_chooser(), _chooser(_steep)
    for chooser in (feature, masks):
        for _ in range(100):
            chooser.record(checked=3, accepted=0, model_drafts=True)
        assert chooser.choose().drafts == 0
    evidence = feature.model.offered[0]
    plain = _plain_records_until_retry(feature)
    assert plain <= math.log(evidence / MIN_EVIDENCE) / -math.log(DECAY) + 1  # at the latest at MIN_EVIDENCE
    assert plain * 5 < _plain_records_until_retry(masks)


def test_a_feature_drafter_may_look_up_while_exploring():
    """Where lookup finds none its drafter's drafts are checked, so exploring need not give lookup up."""
    chooser = _feature_chooser(lookup=True)
    for _ in range(3):  # lookup finds drafts and all are accepted
        chooser.record(checked=3, accepted=3, model_drafts=False, looked_up=True)
    assert chooser.exploring and chooser.choose().drafts > 0 and chooser.choose().lookup > 0


def _forwards_until_lookup_is_tried_again(chooser, most: int = 400) -> int:
    for forwards in range(most):
        choice = chooser.choose()
        if choice.lookup:
            return forwards
        chooser.record(checked=choice.drafts, accepted=min(choice.drafts, 1), model_drafts=True)
    return most


def test_lookup_left_out_by_choice_is_tried_again():
    """A low estimate of lookup's drafts ages in the forwards that leave lookup out, until lookup is tried again;
    without the aging it would be kept for good (those forwards teach nothing about lookup)."""
    aging, kept = _feature_chooser(lookup=True), _feature_chooser(lookup=True)
    kept.plain_fade = 1.0
    for chooser in (aging, kept):
        for _ in range(100):  # lookup finds drafts in half the forwards, all wrong; the model's first draft is right
            chooser.record(checked=3, accepted=0, model_drafts=False, looked_up=True)
            chooser.record(checked=3, accepted=1, model_drafts=True, looked_up=True)
        assert chooser.choose().lookup == 0
    assert _forwards_until_lookup_is_tried_again(aging) < 400 == _forwards_until_lookup_is_tried_again(kept)


def test_a_batch_fades_per_forward_not_per_row():
    single, batch = _chooser(_flat), _chooser(_flat)
    for chooser in (single, batch):
        for _ in range(100):
            chooser.record(checked=3, accepted=0, model_drafts=True)
    single.rate = batch.rate = lambda choice: -choice.drafts  # plain forwards win whatever the costs
    batch.rows = 4  # each forward records one plain forward per row
    assert _plain_records_until_retry(batch) == pytest.approx(4 * _plain_records_until_retry(single), abs=4)


def test_exploring_drafts_without_lookup():
    """A forward whose lookup drafts are partly accepted leaves no model drafts, so exploring with lookup could wait
    forever for the evidence it needs."""
    chooser = _chooser(_steep, lookup=True)
    for _ in range(3000):
        choice = chooser.choose()
        assert choice.drafts == 0 or choice.lookup == 0 or not chooser.exploring
        if choice.drafts and not choice.lookup:  # the fresh forward drafts; the next one checks them: all wrong
            chooser.record(checked=0, accepted=0, model_drafts=False)
            chooser.record(checked=choice.drafts, accepted=0, model_drafts=True)
        else:  # lookup finds 2 drafts, the first one right
            chooser.record(checked=2, accepted=1, model_drafts=False, looked_up=True, plain=choice.drafts == 0)
    assert chooser.model.offered[0] >= MIN_EVIDENCE or chooser.exploring
    assert chooser.choose() == Choice(0, 3)


def test_a_batch_prices_its_rows_together():
    """On a CPU a forward's cost grows with all the positions of its rows: drafts that pay for one sequence do not
    for eight, whose forward is padded to the widest row's. Each batch-size bucket is measured once, when first run."""
    asked = []

    def cost(shapes, rows):
        asked.append(rows)
        return {(width, masks): 1.0 + 0.1 * (rows * width - 1) for width, masks in shapes}

    chooser = DraftLengthChooser(3, False, cost)
    for _ in range(100):  # the first draft right 70% of the time, the later ones 50%
        chooser.record(checked=3, accepted=0, model_drafts=True)
        chooser.record(checked=3, accepted=0, model_drafts=True)
        chooser.record(checked=3, accepted=0, model_drafts=True)
        for accepted in (1, 1, 1, 1, 2, 2, 3):
            chooser.record(checked=3, accepted=accepted, model_drafts=True)
    assert chooser.choose().drafts >= 1
    chooser.rows = 8
    assert chooser.choose().drafts == 0
    chooser.rows = 11  # the bucket of 8, already measured
    assert chooser.choose().drafts == 0 and asked == [1, 8]
    chooser.rows = 1
    assert chooser.choose().drafts >= 1 and asked == [1, 8]


def test_record_counts_drafts_reached_only():
    chooser = _chooser(_flat)
    chooser.record(checked=3, accepted=1, model_drafts=True)  # draft 1 accepted, 2 rejected, 3 never judged
    assert chooser.model.offered == [1, 1, 0] and chooser.model.accepted == [1, 0, 0]
    chooser.record(checked=1, accepted=1, model_drafts=True)  # the earlier forward now counts 0.98
    assert chooser.model.offered == pytest.approx([1.98, 0.98, 0])
    assert chooser.model.accepted == pytest.approx([1.98, 0, 0])
    chooser.record(checked=2, accepted=0, model_drafts=False, looked_up=True)  # lookup drafts: their own counts
    assert chooser.looked_up.offered == [1, 0, 0] and chooser.lookup_tries == chooser.lookup_found == 1


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
    chooser = engine._choosers[(every_length, False, False)]
    assert sum(chooser.model.offered) > 0 and (1, 0) in chooser.cost_at(1)


@pytest.mark.parametrize("lookup", [False, True])
def test_engine_turns_to_plain_forwards_where_drafts_do_not_pay(tok, parent_and_dlm, lookup):  # noqa: F811
    """A drafter whose drafts are wrong on hardware where width costs: after 2 * MIN_EVIDENCE judged drafts the engine
    runs forwards of one position (plus lookup drafts), and the output stays the AR model's."""
    parent, _ = parent_and_dlm
    engine = Engine(_random_adapter_drafter(tok, scale=3.0), tok, max_running=1)
    engine._choosers[(False, lookup, False)] = DraftLengthChooser(
        3, False, lambda shapes, rows: {s: _steep(*s) for s in shapes}, lookup)
    forwards = record_forwards(engine.runner)
    params = DecodeParams(policy="verify", draft_len="auto", max_new_tokens=80, stop_token_ids=(),
                          lookup_drafts=lookup)
    prompt = PROMPTS[0]
    assert engine.generate_batch([prompt], params)[0].tokens == _hf_greedy(parent, tok(prompt)["input_ids"], 80)
    chooser = engine._choosers[(False, lookup, False)]
    assert chooser.model.rates()[0] < 0.3 and chooser.choose().drafts == 0
    widths = [fed for _, fed, _ in forwards[1:]]  # after the prompt's forward
    widest_plain = 1 + (3 if lookup else 0)
    assert widths[-10:] and all(w <= widest_plain for w in widths[-10:])
    assert chooser.model.offered[0] > 0 and max(widths) > 1  # the drafts were tried first


def test_engine_chooses_for_the_batch_it_runs(tok, parent_and_dlm):  # noqa: F811
    parent, _ = parent_and_dlm
    engine = Engine(_random_adapter_drafter(tok), tok, max_running=4)
    asked = []

    def cost(shapes, rows):
        asked.append(rows)
        return {(width, masks): 1.0 + 0.1 * (rows * width - 1) for width, masks in shapes}

    engine._choosers[(False, False, False)] = DraftLengthChooser(3, False, cost)
    params = DecodeParams(policy="verify", draft_len="auto", max_new_tokens=12, stop_token_ids=())
    results = engine.generate_batch(PROMPTS, params)
    assert [r.tokens for r in results] == [_hf_greedy(parent, tok(p)["input_ids"], 12) for p in PROMPTS]
    assert asked[0] == 1 and 4 in asked  # measured at batch 1 when made, then for the 4 rows running


def test_a_lookup_of_a_plan_that_never_ran_is_looked_up_again_and_recorded(tok):  # noqa: F811
    """The scheduler plans new requests to size the prefill group and then plans the chosen ones again: the lookup
    drafts of the first plan must not hide the second one's lookup from the statistics."""
    engine = Engine(_random_adapter_drafter(tok), tok, max_running=1)
    chooser = engine._choosers[(False, True, False)] = DraftLengthChooser(3, False, lambda shapes, rows: {
        s: 1.0 for s in shapes}, lookup=True)
    chooser.model.offered[0] = chooser.model.accepted[0] = 4 * MIN_EVIDENCE  # not exploring: lookup is allowed
    records = []
    chooser.record = lambda *args, **kwargs: records.append((args, kwargs))
    chooser.choose = lambda: Choice(2, 2)
    ids = tok("a b c a b c a b c a b")["input_ids"]
    assert lookup_drafts(ids, 2)  # the prompt's last tokens occurred before
    engine.generate(ids, DecodeParams(policy="verify", draft_len="auto", max_new_tokens=4, stop_token_ids=(),
                                      lookup_drafts=True))
    (checked, _), flags = records[0]
    assert checked == 2 and flags["looked_up"] and not flags["model_drafts"]


@pytest.mark.parametrize("draft_len", [3, "auto"])
def test_sampled_lookup_drafts_cut_by_the_length_limit(tok, parent_and_dlm, draft_len):  # noqa: F811
    """Lookup finds drafts but the length limit leaves none to check: a plain sampled forward, no one-hot of an
    empty draft list."""
    ids = tok("a b c a b c a b c a b")["input_ids"]
    for n in (1, 2, 3):
        result = Engine(_random_adapter_drafter(tok), tok).generate(ids, DecodeParams(
            policy="verify", draft_len=draft_len, max_new_tokens=n, stop_token_ids=(), lookup_drafts=True,
            temperature=0.7, seed=0))
        assert len(result.tokens) == n
