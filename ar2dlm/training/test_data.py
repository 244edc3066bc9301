import copy
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.training import data as D
from ar2dlm.training.data import Batcher, DataConfig, Example, load_examples, load_examples_with_stats, split_heldout

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"
EOT = "<|im_end|>"


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def masked_text(tok, ex):
    return tok.decode([i for i, m in zip(ex.input_ids, ex.maskable) if m])


def unmasked_text(tok, ex):
    return tok.decode([i for i, m in zip(ex.input_ids, ex.maskable) if not m])


# ---------------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("rec,prompt,answer", [
    ({"question": "How many clips?", "answer": "48 clips.\n#### 48"}, "How many clips?", "48 clips.\n#### 48"),
    ({"prompt": "add 1 and 2", "completion": "3"}, "add 1 and 2", "3"),
    ({"instruction": "Sum", "input": "4 5", "output": "9"}, "Sum\n\n4 5", "9"),
    ({"input": "the fox", "response": "jumps over"}, "the fox", "jumps over"),
    ({"messages": [{"role": "user", "content": "hi fox"}, {"role": "assistant", "content": "quick dog"}]},
     "hi fox", "quick dog"),
    ({"conversations": [{"from": "human", "value": "hi fox"}, {"from": "gpt", "value": "lazy dog"}]},
     "hi fox", "lazy dog"),
])
def test_instruction_and_chat_mask_exactly_the_answer(tmp_path, tok, rec, prompt, answer):
    path = write_jsonl(tmp_path / "d.jsonl", [rec, rec])
    examples, stats = load_examples_with_stats(DataConfig(str(path), seq_len=128), tok)
    assert len(examples) == 2 and stats.used_chat_template
    ex = examples[0]
    assert len(ex.input_ids) == len(ex.maskable)
    assert masked_text(tok, ex) == answer + EOT
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    assert unmasked_text(tok, ex) == rendered + "\n"  # the prompt, plus the newline after the final end-of-turn
    # the prompt tokens are exactly what the model sees at inference time
    n_prompt = ex.maskable.index(True)
    assert ex.input_ids[:n_prompt] == tok(rendered, add_special_tokens=False)["input_ids"]


def test_multi_turn_all_assistant_turns_maskable(tmp_path, tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1 + 2"},
            {"role": "assistant", "content": "3"}, {"role": "user", "content": "times 4"},
            {"role": "assistant", "content": "12"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    (ex,) = load_examples(DataConfig(str(path)), tok)
    assert masked_text(tok, ex) == "3" + EOT + "12" + EOT
    # maskable positions form two contiguous runs, each ending on an end-of-turn token
    eot_id = tok.convert_tokens_to_ids(EOT)
    runs, prev = [], False
    for i, m in enumerate(ex.maskable):
        if m and not prev:
            runs.append([i, i])
        if m:
            runs[-1][1] = i
        prev = m
    assert len(runs) == 2 and all(ex.input_ids[end] == eot_id for _, end in runs)


def test_template_whose_generation_prompt_differs_still_masks_the_answer(tmp_path, tok):
    t = copy.deepcopy(tok)
    t.chat_template = t.chat_template.replace("{% if add_generation_prompt %}<|im_start|>assistant\n",
                                              "{% if add_generation_prompt %}<|im_start|>assistant (gen)\n")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "say 3 then 3"},
                                                            {"role": "assistant", "content": "3"}]}])
    (ex,) = load_examples(DataConfig(str(path)), t)
    assert masked_text(t, ex) == "3" + EOT
    assert unmasked_text(t, ex).startswith("<|im_start|>user\nsay 3 then 3<|im_end|>\n<|im_start|>assistant\n")


def test_no_chat_template_uses_prompt_newline_response_eos(tmp_path, tok, plain_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "How many?", "answer": "72 clips"}])
    for t, cfg in ((plain_tok, DataConfig(str(path))), (tok, DataConfig(str(path), chat=False))):
        (ex,), stats = load_examples_with_stats(cfg, t)
        assert not stats.used_chat_template
        assert masked_text(t, ex) == "72 clips" + t.eos_token
        assert unmasked_text(t, ex) == "How many?\n"
        assert ex.input_ids[-1] == t.eos_token_id


def test_chat_true_without_template_is_an_error(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(Ar2dlmError, match="no chat template"):
        load_examples(DataConfig(str(path), chat=True), plain_tok)


def test_plain_text_is_packed_into_full_chunks(tmp_path, tok):
    docs = [f"the quick brown fox number {i} jumps over the lazy dog {i * 7}" for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    seq_len = 64
    examples, stats = load_examples_with_stats(DataConfig(str(path), seq_len=seq_len), tok)
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_full = len(stream) // seq_len
    tail = len(stream) - n_full * seq_len
    assert stats.packed_chunks == len(examples) == n_full + (tail * 2 >= seq_len)
    assert all(len(e) == seq_len for e in examples[:n_full])
    assert all(all(e.maskable) for e in examples)
    joined = [i for e in examples for i in e.input_ids]
    assert joined == stream[:len(joined)]
    assert stream.count(tok.eos_token_id) == len(docs)


def test_packing_tail_rule(tok):
    recs = [D._Record("text", "x", text="the quick brown fox jumps over the lazy dog", origin="text")]
    n = len(tok(recs[0].text, add_special_tokens=False)["input_ids"]) + 1  # + eos
    kept = D.tokenize_records(recs, tok, DataConfig("x", seq_len=2 * n))  # tail == seq_len / 2: kept
    assert len(kept) == 1 and len(kept[0]) == n
    stats = D.LoadStats()
    assert D.tokenize_records(recs, tok, DataConfig("x", seq_len=2 * n + 2), stats) == []  # shorter: dropped
    assert stats.dropped_tail_tokens == n


def test_file_types(tmp_path, tok):
    recs = [{"question": "q one", "answer": "a one"}, {"question": "q two", "answer": "a two"}]
    write_jsonl(tmp_path / "a.jsonl", recs)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.json").write_text(json.dumps({"data": recs}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.jsonl.gz", "a.json", "b.json", "a.parquet"):
        examples = load_examples(DataConfig(str(tmp_path / name)), tok)
        assert [masked_text(tok, e) for e in examples] == ["a one" + EOT, "a two" + EOT], name


def test_txt_paragraphs_are_documents(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\n\nthird para\n  \nfourth\n")
    recs = [D.parse_record(w, r) for w, r in D.iter_records(DataConfig(str(tmp_path / "a.txt")))]
    assert [r.text for r in recs] == ["first line\nsecond line", "third para", "fourth"]
    assert [r.where.rsplit(":", 1)[1] for r in recs] == ["1", "5", "7"]
    assert load_examples(DataConfig(str(tmp_path / "a.txt"), seq_len=8), tok)


def test_text_field_and_max_records(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": f"doc {i} the quick brown fox", "question": "x"}
                                              for i in range(10)])
    examples, stats = load_examples_with_stats(DataConfig(str(path), text_field="body", max_records=3, seq_len=8),
                                               tok)
    assert stats.records == 3 and stats.text_records == 3 and all(all(e.maskable) for e in examples)
    with pytest.raises(Ar2dlmError, match=rf"{path}:1: no field 'nope'"):
        load_examples(DataConfig(str(path), text_field="nope"), tok)


def test_truncation_drops_and_counts(tmp_path, tok):
    long_prompt = "the quick brown fox jumps over the lazy dog " * 20
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": long_prompt, "answer": "gone"},  # response entirely beyond seq_len
        {"question": "short", "answer": "kept but cut " * 20},  # response partly kept
        {"question": "short", "answer": "fits"},
    ])
    examples, stats = load_examples_with_stats(DataConfig(str(path), seq_len=48), tok)
    assert stats.dropped_truncated == 1 and stats.truncated == 1 and len(examples) == 2
    assert all(len(e) <= 48 for e in examples) and all(any(e.maskable) for e in examples)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad,msg", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"foo": 1}', "unknown record format"),
    ('{"question": "q"}', "has 'question' but none of"),
    ('{"question": 3, "answer": "a"}', "'question' must be a string"),
    ('{"text": ["a"]}', "'text' must be a string"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": 5}]}', "string 'content'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
])
def test_malformed_record_names_file_and_line(tmp_path, tok, bad, msg):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}, "", bad])
    with pytest.raises(Ar2dlmError, match=msg) as e:
        load_examples(DataConfig(str(path)), tok)
    assert str(e.value).startswith(f"{path}:3: ") and "\n" not in str(e.value)


def test_malformed_in_json_array_and_parquet(tmp_path, tok):
    (tmp_path / "a.json").write_text(json.dumps([{"question": "q", "answer": "a"}, {"foo": 1}]))
    with pytest.raises(Ar2dlmError, match=r"a\.json: item 1: unknown record format"):
        load_examples(DataConfig(str(tmp_path / "a.json")), tok)


def test_missing_empty_and_unknown_sources(tmp_path, tok):
    with pytest.raises(Ar2dlmError, match="not found"):
        load_examples(DataConfig(str(tmp_path / "nope.jsonl")), tok)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(Ar2dlmError, match="no records"):
        load_examples(DataConfig(str(tmp_path / "empty.jsonl")), tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(Ar2dlmError, match="unsupported file type"):
        load_examples(DataConfig(str(tmp_path / "x.csv")), tok)
    with pytest.raises(Ar2dlmError, match="neither a file"):
        load_examples(DataConfig("not a dataset!"), tok)
    with pytest.raises(Ar2dlmError, match="needs the generated corpus"):
        load_examples(DataConfig("self"), tok)


def test_self_source_reads_the_given_corpus(tmp_path, tok):
    path = write_jsonl(tmp_path / "self.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": "a b"}]}])
    (ex,) = load_examples(DataConfig("self"), tok, self_corpus_path=path)
    assert masked_text(tok, ex) == "a b" + EOT


# ---------------------------------------------------------------------------------------------------- hub


def test_hub_id_parsing():
    assert D.parse_hub_id("openai/gsm8k:main@train") == ("openai/gsm8k", "main", "train")
    assert D.parse_hub_id("openai/gsm8k") == ("openai/gsm8k", None, "train")
    assert D.parse_hub_id("user/ds@test[:100]") == ("user/ds", None, "test[:100]")


def test_hub_loading_and_errors_are_wrapped(monkeypatch, tok):
    import datasets

    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return [{"question": "q", "answer": "a"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    (ex,) = load_examples(DataConfig("openai/gsm8k:main@test"), tok)
    assert calls == [("openai/gsm8k", "main", "test")] and masked_text(tok, ex) == "a" + EOT

    def failing_load(*a, **k):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub\nlong traceback text")

    monkeypatch.setattr(datasets, "load_dataset", failing_load)
    with pytest.raises(Ar2dlmError, match="could not load dataset 'x/y'") as e:
        load_examples(DataConfig("x/y"), tok)
    assert "\n" not in str(e.value)


def test_hub_offline_fails_fast_with_one_line_error(tmp_path):
    code = ("from ar2dlm.training.data import DataConfig, iter_records\nfrom ar2dlm.errors import Ar2dlmError\n"
            "try:\n    list(iter_records(DataConfig('no-such-user/no-such-dataset')))\n"
            "except Ar2dlmError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERR ")]
    assert len(lines) == 1 and "could not load dataset" in lines[0], out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------------- split + batch


def make_examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        ids = [10 + i] * length
        out.append(Example(ids, [j >= length // 2 for j in range(length)]))
    return out


def test_split_heldout_deterministic_and_disjoint():
    ex = make_examples(30)
    train, held = split_heldout(ex, 5, seed=3)
    train2, held2 = split_heldout(ex, 5, seed=3)
    assert [e.input_ids for e in held] == [e.input_ids for e in held2] and len(held) == 5 and len(train) == 25
    assert {id(e) for e in train} | {id(e) for e in held} == {id(e) for e in ex}
    assert not {id(e) for e in train} & {id(e) for e in held}
    assert [e.input_ids for e in split_heldout(ex, 5, seed=4)[1]] != [e.input_ids for e in held]
    assert split_heldout(ex, 0, seed=0) == (ex, [])
    with pytest.raises(Ar2dlmError):
        split_heldout(ex, 30, seed=0)


def rows(batch):
    return [tuple(r[:n].tolist()) for r, n in zip(batch.input_ids, batch.lengths)]


def test_batcher_shapes_padding_and_determinism():
    ex = make_examples(23)
    a, b = Batcher(ex, 4, seed=1, pad_id=0), Batcher(ex, 4, seed=1, pad_id=0)
    for _ in range(12):
        x, y = next(a), next(b)
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.maskable, y.maskable)
        assert x.input_ids.dtype == torch.long and x.maskable.dtype == torch.bool and x.lengths.dtype == torch.long
        n, width = x.input_ids.shape
        assert n == 4 and width % 8 == 0 and width >= int(x.lengths.max()) and width - int(x.lengths.max()) < 8
        for i, length in enumerate(x.lengths.tolist()):
            assert not x.maskable[i, length:].any() and (x.input_ids[i, length:] == 0).all()
            e = next(e for e in ex if tuple(e.input_ids) == tuple(x.input_ids[i, :length].tolist()))
            assert x.maskable[i, :length].tolist() == e.maskable
    c = Batcher(ex, 4, seed=2, pad_id=0)
    assert any(rows(next(c)) != rows(next(Batcher(ex, 4, seed=1, pad_id=0))) for _ in range(3))


def test_batcher_epochs_cover_every_example_once():
    ex = make_examples(10)
    bt = Batcher(ex, 4, seed=0, pad_id=0)
    seen = [r for _ in range(5) for r in rows(next(bt))]  # 20 rows = exactly two epochs
    assert bt.state_dict() == {"epoch": 2, "index": 0}
    ids = sorted(tuple(e.input_ids) for e in ex)
    assert sorted(seen[:10]) == ids and sorted(seen[10:]) == ids and seen[:10] != seen[10:]
    ordered = Batcher(ex, 5, seed=0, pad_id=0, shuffle=False)
    assert rows(next(ordered)) == [tuple(e.input_ids) for e in ex[:5]]


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_batcher_exact_resume(k):
    ex = make_examples(17)
    ref = Batcher(ex, 3, seed=5, pad_id=0)
    expected = [next(ref) for _ in range(k + 6)][k:]
    first = Batcher(ex, 3, seed=5, pad_id=0)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = Batcher(ex, 3, seed=5, pad_id=0)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.maskable, want.maskable)


def test_batcher_ddp_shards_are_disjoint_and_in_step():
    ex = make_examples(26)
    world = 3
    ranks = [Batcher(ex, 2, seed=9, pad_id=0, rank=r, world_size=world) for r in range(world)]
    single = Batcher(ex, 2 * world, seed=9, pad_id=0)
    for _ in range(6):
        parts = [rows(next(b)) for b in ranks]
        glob = rows(next(single))
        assert all(len(p) == 2 for p in parts)
        for r in range(world):
            assert parts[r] == glob[r::world]
        flat = [x for p in parts for x in p]
        assert sorted(flat) == sorted(glob)
    assert len({json.dumps(b.state_dict()) for b in ranks}) == 1


def test_batcher_rejects_bad_state_and_args():
    ex = make_examples(5)
    with pytest.raises(Ar2dlmError):
        Batcher(ex, 2, seed=0, pad_id=0).load_state_dict({"epoch": 0, "index": 99})
    with pytest.raises(Ar2dlmError):
        Batcher([], 2, seed=0, pad_id=0)
    with pytest.raises(Ar2dlmError):
        Batcher(ex, 2, seed=0, pad_id=0, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not GSM8K.is_file(), reason="shared gsm8k data not present")
def test_real_gsm8k_file(tok):
    examples, stats = load_examples_with_stats(DataConfig(str(GSM8K), seq_len=2048, max_records=50), tok)
    assert stats.instruction_records == 50 and stats.used_chat_template and stats.truncated == 0
    with open(GSM8K) as f:
        answers = [json.loads(next(f))["answer"] for _ in range(50)]
    assert [masked_text(tok, e) for e in examples] == [a + EOT for a in answers]
