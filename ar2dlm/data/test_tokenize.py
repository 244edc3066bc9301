"""Tokenised examples: exactly the answer is maskable, chat templates and plain prompts, packing, truncation."""

import copy
import json
from pathlib import Path

import pytest

from ar2dlm.data.records import Record
from ar2dlm.data.tokenize import (
    DataConfig, LoadStats, load_examples, load_examples_with_stats, render_chat, tokenize_records,
)
from ar2dlm.errors import Ar2dlmError
from ar2dlm.testing import masked_text, write_jsonl

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"
EOT = "<|im_end|>"


def unmasked_text(tok, ex):
    return masked_text(tok, ex, maskable=False)


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


def test_render_chat_is_the_inference_prompt_and_needs_a_template(tok, plain_tok):
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(tok, messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(tok, messages, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"
    for no_template in (plain_tok, None):
        with pytest.raises(Ar2dlmError, match="chat template"):
            render_chat(no_template, messages)


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
    recs = [Record("text", "x", text="the quick brown fox jumps over the lazy dog", origin="text")]
    n = len(tok(recs[0].text, add_special_tokens=False)["input_ids"]) + 1  # + eos
    kept = tokenize_records(recs, tok, DataConfig("x", seq_len=2 * n))  # tail == seq_len / 2: kept
    assert len(kept) == 1 and len(kept[0]) == n
    stats = LoadStats()
    assert tokenize_records(recs, tok, DataConfig("x", seq_len=2 * n + 2), stats) == []  # shorter: dropped
    assert stats.dropped_tail_tokens == n


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


def test_empty_source_and_self_without_a_corpus(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(Ar2dlmError, match="no records"):
        load_examples(DataConfig(str(tmp_path / "empty.jsonl")), tok)
    with pytest.raises(Ar2dlmError, match="needs the generated corpus"):
        load_examples(DataConfig("self"), tok)
    with pytest.raises(Ar2dlmError, match="self-generated corpus not found"):
        load_examples(DataConfig("self"), tok, self_corpus_path=tmp_path / "nope.jsonl")


def test_self_source_reads_the_given_corpus(tmp_path, tok):
    path = write_jsonl(tmp_path / "self.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": "a b"}]}])
    (ex,) = load_examples(DataConfig("self"), tok, self_corpus_path=path)
    assert masked_text(tok, ex) == "a b" + EOT


@pytest.mark.skipif(not GSM8K.is_file(), reason="shared gsm8k data not present")
def test_real_gsm8k_file(tok):
    examples, stats = load_examples_with_stats(DataConfig(str(GSM8K), seq_len=2048, max_records=50), tok)
    assert stats.instruction_records == 50 and stats.used_chat_template and stats.truncated == 0
    with open(GSM8K) as f:
        answers = [json.loads(next(f))["answer"] for _ in range(50)]
    assert [masked_text(tok, e) for e in examples] == [a + EOT for a in answers]
