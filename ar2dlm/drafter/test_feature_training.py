"""`ar2dlm convert --drafter-kind feature` on a tiny model: the feature cache (built once, reused, refused for
another parent / layer set / data, a cut-off chunk rewritten), training that learns, a loadable drafter whose verify
output is the parent's, and exact resume after a kill."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ar2dlm.data.tokenize import Example
from ar2dlm.drafter.feature import WEIGHTS_FILE
from ar2dlm.drafter.feature_cache import FeatureCache, chunk_path
from ar2dlm.drafter.feature_training import anchor_positions, draft_vocabulary, make_batch
from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.open import load_dlm
from ar2dlm.recipes.convert import run
from ar2dlm.testing import qa_records, tiny_base, write_jsonl
from ar2dlm.training.config import ConvertConfig

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature")
    return tiny_base(root), write_jsonl(root / "qa.jsonl", qa_records()), root


def config(base, data, root, out, **extra):
    settings = dict(drafter_kind="feature", model=str(base), data=str(data), output=str(root / out), seq_len=48,
                    batch_size=4, heldout=8, max_steps=40, warmup_steps=2, lr=1e-2, save_every=10, device="cpu",
                    block_size=4, feature_window=8, feature_cache=str(root / "features"), draft_vocab=64)
    settings.update(extra)
    return ConvertConfig(**settings)


def test_training_learns_and_the_drafter_decodes_as_the_parent(setup):
    base, data, root = setup
    summary = run(config(base, data, root, "run"))
    drafter = summary["drafter"]
    assert drafter["kind"] == "feature" and drafter["draft_vocab"] > 0
    assert summary["heldout_after"]["heldout_loss"] < summary["heldout_before"]["heldout_loss"]
    assert drafter["after"]["tokens_per_verify_step"] > drafter["before"]["tokens_per_verify_step"]
    dlm, tok = load_dlm(root / "run" / "model")
    parent, _ = load_dlm(root / "run" / "model")
    vocab = set(dlm.draft_vocab.tolist())
    engine = Engine(dlm, tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Question 1?"}], add_generation_prompt=True,
                                     tokenize=False)
    params = DecodeParams(policy="verify", draft_len=3, max_new_tokens=16, stop_token_ids=())
    res = engine.generate(prompt, params)
    want = Engine(parent, tok).generate(prompt, DecodeParams(policy="ar", max_new_tokens=16, stop_token_ids=()))
    assert res.tokens == want.tokens
    rid = engine.add_request(prompt, params)
    state = engine.requests[rid].state
    while engine.has_unfinished():
        engine.step()
        assert set(state.drafts) <= vocab  # drafts come from the draft vocabulary only


def test_init_drafter_continues_with_the_runs_own_draft_vocabulary(setup):
    """--init-drafter starts from the saved weights (the same held-out numbers before as the first run's after);
    the draft vocabulary is the new run's (its size and tokens), since the head is rows of the parent's."""
    base, data, root = setup
    first = run(config(base, data, root, "init-first", max_steps=4))
    same = run(config(base, data, root, "init-same", max_steps=1, init_drafter=str(root / "init-first" / "model")))
    assert same["drafter"]["before"] == first["drafter"]["after"]
    smaller = run(config(base, data, root, "init-smaller", max_steps=1, draft_vocab=20,
                         init_drafter=str(root / "init-first" / "model")))
    assert smaller["drafter"]["draft_vocab"] == 20
    dlm, _ = load_dlm(root / "init-smaller" / "model")
    first_vocab, _ = load_dlm(root / "init-first" / "model")
    assert dlm.draft_vocab.numel() == 20 and set(dlm.draft_vocab.tolist()) < set(first_vocab.draft_vocab.tolist())


def test_the_cache_is_reused_and_refused_for_another_layer_set(setup):
    base, data, root = setup
    folder = root / "features"
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("chunk-*")}
    run(config(base, data, root, "again", max_steps=2))
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("chunk-*")} == before  # read, not written again
    with pytest.raises(Ar2dlmError, match="feature layers"):
        run(config(base, data, root, "other-layers", max_steps=2, feature_layers="1"))


def _examples(n=10):
    return [Example(list(range(3, 3 + 5 + i)), [False] * 3 + [True] * (2 + i)) for i in range(n)]


def _fake_features(ids, mask):
    return ids[..., None].float().expand(*ids.shape, 4) * mask[..., None]


def test_a_cut_off_chunk_is_found_and_written_again(tmp_path):
    examples = _examples()
    cache = FeatureCache(tmp_path / "c", "parent-a", [1, 2], 4, examples, chunk_size=4)
    cache.build(_fake_features)
    assert cache.missing_chunks() == []
    chunk = chunk_path(tmp_path / "c", cache.digests[1])
    chunk.write_bytes(chunk.read_bytes()[:-40])  # cut off mid-write
    tmp = chunk_path(tmp_path / "c", cache.digests[2])
    tmp.with_name(tmp.name + ".tmp").write_bytes(b"half")
    assert cache.missing_chunks() == [1]
    with pytest.raises(Ar2dlmError, match="chunk 1"):
        cache.load()
    cache.build(_fake_features)
    assert not list((tmp_path / "c").glob("*.tmp"))
    loaded = cache.load()
    assert [ids.tolist() for ids, _, _ in loaded] == [e.input_ids for e in examples]
    for (ids, _, feats), e in zip(loaded, examples):
        assert torch.equal(feats.float(), _fake_features(ids[None], torch.ones(1, len(ids)))[0])


def test_a_cache_of_another_parent_is_refused_and_more_data_reuses_its_chunks(tmp_path):
    folder = tmp_path / "c"
    FeatureCache(folder, "parent-a", [1, 2], 4, _examples(), chunk_size=4).build(_fake_features)
    with pytest.raises(Ar2dlmError, match="parent"):
        FeatureCache(folder, "parent-b", [1, 2], 4, _examples(), chunk_size=4)
    with pytest.raises(Ar2dlmError, match="feature layers"):
        FeatureCache(folder, "parent-a", [1, 3], 4, _examples(), chunk_size=4)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("chunk-*")}
    grown = _examples(10) + [Example([7] * 6, [False, False] + [True] * 4) for _ in range(3)]
    cache = FeatureCache(folder, "parent-a", [1, 2], 4, grown, chunk_size=4)
    assert cache.missing_chunks() == [2, 3]  # examples 0-7 unchanged; 8-11 and 12 are new chunks
    cache.build(_fake_features)
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("chunk-*")}
    assert {n: after[n] for n in before} == before  # the old chunks were read, not written again
    assert len(after) == len(before) + 2 and [p.name for p in cache.other_chunks()] == \
        [chunk_path(folder, FeatureCache(folder, "parent-a", [1, 2], 4, _examples(), chunk_size=4).digests[2]).name]
    loaded = cache.load()
    assert [ids.tolist() for ids, _, _ in loaded] == [e.input_ids for e in grown]
    for ids, _, feats in loaded:
        assert torch.equal(feats.float(), _fake_features(ids[None], torch.ones(1, len(ids)))[0])


def test_anchors_and_targets_line_up():
    ids = torch.arange(10, 20)
    maskable = torch.tensor([False] * 4 + [True] * 6)
    feats = torch.arange(10).float()[:, None].expand(10, 3).half()
    positions = anchor_positions(maskable)
    assert positions.tolist() == [3, 4, 5, 6, 7, 8]  # the next token is an answer token
    batch = make_batch([(ids, maskable, feats)], [(0, positions)], window=2, drafts=3, decay=0.5)
    assert batch.anchors.tolist() == ids[3:9].tolist()
    assert batch.targets[0].tolist() == [14, 15, 16] and batch.targets[-1].tolist() == [19, -1, -1]
    window = batch.features[batch.index][:, :, 0]  # the features of the two positions before each anchor
    assert window[0].tolist() == [1.0, 2.0] and window[-1].tolist() == [6.0, 7.0]
    assert batch.weights.tolist() == [1.0, 0.5, 0.25]


def test_draft_vocabulary_is_the_most_frequent_answer_tokens():
    examples = [Example([1, 5, 5, 7], [False, True, True, True]), Example([9, 5, 8], [True, True, False])]
    assert draft_vocabulary(examples, 2).tolist() == [5, 7] or draft_vocabulary(examples, 2).tolist() == [5, 9]
    assert draft_vocabulary(examples, 100).tolist() == [5, 7, 9]


def test_resume_after_a_kill_is_exact(setup):
    base, data, root = setup
    argv = ["convert", "--drafter-kind", "feature", "--model", str(base), "--data", str(data), "--seq-len", "48",
            "--batch-size", "4", "--heldout", "8", "--max-steps", "8", "--warmup-steps", "2", "--lr", "1e-2",
            "--save-every", "2", "--device", "cpu", "--block-size", "4", "--feature-window", "8", "--draft-vocab", "64",
            "--feature-cache", str(root / "features")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(out, *extra, fault=None):
        e = {**env, **({"AR2DLM_FAULT_AT_STEP": str(fault)} if fault else {})}
        return subprocess.run([sys.executable, "-m", "ar2dlm", *argv, "--output", str(root / out), *extra],
                              capture_output=True, text=True, env=e, timeout=300)

    assert cli("whole").returncode == 0
    killed = cli("resumed", fault=4)
    assert killed.returncode != 0
    resumed = cli("resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(root / "whole" / "model" / WEIGHTS_FILE))
    b = load_file(str(root / "resumed" / "model" / WEIGHTS_FILE))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_feature_settings_are_refused_before_any_data_is_written(setup, capsys):
    from ar2dlm.cli import main

    base, data, root = setup
    with pytest.raises(Ar2dlmError, match="--feature-layers"):
        ConvertConfig(drafter_kind="feature", feature_layers="low,high")
    with pytest.raises(Ar2dlmError, match="outside the parent"):
        run(config(base, data, root, "bad-layers", feature_layers="9", feature_cache=str(root / "bad-cache")))
    assert not (root / "bad-cache").exists()
    assert main(["convert", "--drafter-kind", "feature", "--block-size", "1", "--model", str(base)]) == 2
    assert "--block-size >= 2" in capsys.readouterr().err
