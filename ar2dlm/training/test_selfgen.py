import copy
import json

import pytest
import torch

from ar2dlm.data.tokenize import DataConfig, load_examples
from ar2dlm.errors import Ar2dlmError
from ar2dlm.testing import tiny_model
from ar2dlm.training.selfgen import degenerate_reason, generate_self_corpus, metadata_path, user_turn_prefix


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(vocab_size=len(tok))


def read_jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("   \n ", "empty"),
    ("hi", "short"),
    ("the the the the", "repetitive"),
    ("!!!!!!!!!!", "repetitive"),
    ("I am. I am. I am. I am. I am. I am. I am. I am.", "repetitive"),
    ("go to the shop go to the shop go to the shop go to the shop", "repetitive"),
    ("abababababababababababababababababababababab", "repetitive"),
    ("Natalia sold 48 clips in April and half as many in May.", None),
    ("def add(a, b):\n    return a + b\n", None),
    ("1 2 3", None),
])
def test_degenerate_reason(text, reason):
    assert degenerate_reason(text, min_chars=4) == reason


def test_user_turn_prefix(tok):
    prefix, eot = user_turn_prefix(tok)
    assert prefix == "<|im_start|>user\n" and eot == tok.convert_tokens_to_ids("<|im_end|>")
    t = copy.deepcopy(tok)
    t.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
                       "{% endif %}" + tok.chat_template)
    assert user_turn_prefix(t)[0] == "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"


def test_chat_corpus_generated_cached_and_reused(tmp_path, tok, model, monkeypatch):
    path = tmp_path / "self.jsonl"
    rng = torch.get_rng_state()
    out = generate_self_corpus(model, tok, n_samples=3, max_new_tokens=6, cache_path=path, seed=0, batch_size=4,
                               min_chars=1)
    assert out == path and torch.equal(torch.get_rng_state(), rng) and tok.padding_side == "right"
    recs = read_jsonl(path)
    assert len(recs) == 3
    for r in recs:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in r["messages"])
    meta = json.loads(metadata_path(path).read_text())
    assert meta["records"] == 3 and meta["format"] == "chat" and meta["settings"]["seed"] == 0
    assert meta["user_turn_prefix"] == "<|im_start|>user\n" and isinstance(meta["filtered"], dict)
    assert load_examples(DataConfig("self", seq_len=64), tok, self_corpus_path=path)

    # same seed -> same corpus
    again = generate_self_corpus(model, tok, 3, 6, tmp_path / "again.jsonl", seed=0, batch_size=4, min_chars=1)
    assert read_jsonl(again) == recs

    # a cache with enough records is reused without generating; a short one is regenerated
    def boom(*a, **k):
        raise AssertionError("generate must not be called")

    monkeypatch.setattr(model, "generate", boom)
    before = path.read_text()
    assert generate_self_corpus(model, tok, 2, 6, path, seed=1, batch_size=4, min_chars=1) == path
    assert path.read_text() == before
    with pytest.raises(AssertionError, match="must not be called"):
        generate_self_corpus(model, tok, 4, 6, path, seed=1, batch_size=4, min_chars=1)
    assert path.read_text() == before  # a failed run leaves the old cache intact


def test_text_corpus_for_non_chat_model(tmp_path, plain_tok, model):
    path = generate_self_corpus(model, plain_tok, 2, 6, tmp_path / "t.jsonl", seed=0, batch_size=2, min_chars=1)
    recs = read_jsonl(path)
    assert len(recs) == 2 and all(set(r) == {"text"} and r["text"].strip() for r in recs)
    assert json.loads(metadata_path(path).read_text())["format"] == "text"


class ScriptedModel(torch.nn.Module):
    """Stands in for an AR model: each generate() call continues every prompt with the next scripted text."""

    def __init__(self, tok, texts):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.texts, self.calls = tok, list(texts), []
        self.config = type("Cfg", (), {"_name_or_path": "scripted", "model_type": "scripted"})()

    def generate(self, input_ids, attention_mask, eos_token_id, pad_token_id, max_new_tokens, **kw):
        self.calls.append(self.tok.batch_decode(input_ids, skip_special_tokens=False))
        rows = []
        for _ in range(input_ids.shape[0]):
            text = self.texts.pop(0)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            ids = ids + [eos_token_id[0]] if len(ids) < max_new_tokens else ids[:max_new_tokens]  # else: unfinished
            rows.append(ids + [pad_token_id] * (max_new_tokens - len(ids)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_filtering_is_counted_and_prompts_are_right(tmp_path, tok):
    users = ["How many clips did she sell?", "", "the the the the the", "What is 2 + 3?"]
    answers = ["She sold 72 clips.", "no no no no no no"]
    users2 = ["Why is the sky blue?", "x", "Add 4 and 5.", "!!!!!!!!!!"]
    answers2 = ["Because of scattering.", "4 + 5 = 9"]
    model = ScriptedModel(tok, users + answers + users2 + answers2)
    path = generate_self_corpus(model, tok, 3, 64, tmp_path / "s.jsonl", seed=0, batch_size=4, min_chars=3)
    recs = read_jsonl(path)
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in recs] == [
        ("How many clips did she sell?", "She sold 72 clips."), ("Why is the sky blue?", "Because of scattering."),
        ("Add 4 and 5.", "4 + 5 = 9")]
    assert model.calls[0] == ["<|im_start|>user\n"] * 4
    assert model.calls[1][0].endswith("<|im_start|>user\nHow many clips did she sell?<|im_end|>\n"
                                      "<|im_start|>assistant\n")
    meta = json.loads(metadata_path(path).read_text())
    assert meta["filtered"] == {"user_empty": 1, "user_repetitive": 2, "assistant_repetitive": 1, "user_short": 1}
    assert meta["attempted"] == 8 and meta["records"] == 3


def test_all_filtered_is_an_error(tmp_path, tok):
    model = ScriptedModel(tok, [""] * 8)
    with pytest.raises(Ar2dlmError, match="empty or degenerate"):
        generate_self_corpus(model, tok, 2, 8, tmp_path / "x.jsonl", seed=0, batch_size=4, max_rounds=2)
    assert not (tmp_path / "x.jsonl").exists()


def test_unfinished_outputs_counted_or_dropped(tmp_path, tok):
    long = "the quick brown fox jumps over the lazy dog and then some more words"
    script = ["add 1 and 2", long, "the answer is 3", "the lazy dog sleeps"]
    meta_of = lambda p: json.loads(metadata_path(p).read_text())  # noqa: E731
    p = generate_self_corpus(ScriptedModel(tok, script), tok, 2, 12, tmp_path / "a.jsonl", seed=0, batch_size=2)
    assert len(read_jsonl(p)) == 2 and meta_of(p)["unfinished"] == 1 and meta_of(p)["filtered"] == {}
    script = ["add 1 and 2", long, "the answer is 3"]
    p = generate_self_corpus(ScriptedModel(tok, script), tok, 2, 12, tmp_path / "b.jsonl", seed=0, batch_size=2,
                             keep_unfinished=False, max_rounds=1)
    assert [r["messages"][0]["content"] for r in read_jsonl(p)] == ["add 1 and 2"]
    assert meta_of(p)["filtered"] == {"user_unfinished": 1} and meta_of(p)["unfinished"] == 0


def test_parent_answers_replace_the_datas_answers(tmp_path, tok, model, monkeypatch):
    """Each record's turns before its first assistant turn are rendered as a chat prompt and answered by the model;
    the record keeps those turns and gets the model's answer (plain text records have no prompt to answer)."""
    from ar2dlm.training.selfgen import write_parent_answers

    data = tmp_path / "qa.jsonl"
    rows = [{"question": "What is 2 + 2?", "answer": "4"}, {"text": "plain text has no prompt"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "Hello"}]},
            {"question": "Name a colour.", "answer": "Blue"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    reply = tok("the quick fox", add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]

    def generate(input_ids, attention_mask, max_new_tokens, do_sample, **kw):
        seen.extend(tok.decode(row[mask.bool()]) for row, mask in zip(input_ids, attention_mask))
        assert not do_sample and max_new_tokens == 5  # temperature 0: greedy
        return torch.cat([input_ids, torch.tensor([reply] * len(input_ids))], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    path = tmp_path / "answers.jsonl"
    assert write_parent_answers(model, tok, str(data), path, max_records=3, max_new_tokens=5, temperature=0.0,
                                seed=0, batch_size=2) == path
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}], rows[2]["messages"][:2]]
    assert seen == [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    assert read_jsonl(path) == [{"messages": p + [{"role": "assistant", "content": "the quick fox"}]}
                                for p in prompts]
    assert json.loads(metadata_path(path).read_text())["n_samples"] == 2

    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("the cache must be reused"))
    assert write_parent_answers(model, tok, str(data), path, 3, 5, 0.0, 0) == path
    text_only = tmp_path / "text.jsonl"
    text_only.write_text(json.dumps({"text": "no prompts"}) + "\n")
    with pytest.raises(Ar2dlmError, match="no chat or instruction records"):
        write_parent_answers(model, tok, str(text_only), tmp_path / "none.jsonl", None, 5, 0.0, 0)


def test_parent_answers_are_written_in_similar_lengths_and_kept_in_order(tmp_path, tok, model, monkeypatch):
    """Batches hold prompts of similar length (the shortest first: little padding); the records keep the data's
    order, each with the answer to its own prompt."""
    from ar2dlm.training.selfgen import write_parent_answers

    questions = ["A much longer question than the others, about the quick brown fox?", "Hi?", "What is 2 + 2?"]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in questions))
    batches = []

    def generate(input_ids, attention_mask, max_new_tokens, **kw):
        asked = [tok.decode(row[mask.bool()]) for row, mask in zip(input_ids, attention_mask)]
        batches.append([next(q for q in questions if q in a) for a in asked])
        replies = [tok(f"answer {questions.index(q)}", add_special_tokens=False).input_ids for q in batches[-1]]
        width = max(len(r) for r in replies)
        end = tok.convert_tokens_to_ids("<|im_end|>")
        return torch.cat([input_ids, torch.tensor([r + [end] * (width + 1 - len(r)) for r in replies])], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    path = write_parent_answers(model, tok, str(data), tmp_path / "a.jsonl", None, 8, 0.0, 0, batch_size=2)
    assert batches == [["Hi?", "What is 2 + 2?"], [questions[0]]]
    assert [r["messages"][-1]["content"] for r in read_jsonl(path)] == ["answer 0", "answer 1", "answer 2"]
    assert [r["messages"][0]["content"] for r in read_jsonl(path)] == questions


def test_parent_answers_resume_after_a_kill(tmp_path, tok, model, monkeypatch):
    """Every finished batch is on disk at once: a run killed in its third batch (its partial line cut off too)
    resumes with that batch, writes what an uninterrupted run writes, and leaves no partial file; a partial file
    of other settings is answered again from the start."""
    from ar2dlm.training.selfgen import write_parent_answers

    questions = [f"Question number {k}?" for k in range(5)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in questions))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    asked = []

    def generate(input_ids, attention_mask, **kw):
        batch = [next(q for q in questions if q in tok.decode(row[m.bool()]))
                 for row, m in zip(input_ids, attention_mask)]
        asked.append(batch)
        if kill_at is not None and len(asked) == kill_at:
            raise KeyboardInterrupt
        replies = [tok(f"answer {questions.index(q)}", add_special_tokens=False).input_ids for q in batch]
        width = max(len(r) for r in replies) + 1
        return torch.cat([input_ids, torch.tensor([r + [end] * (width - len(r)) for r in replies])], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    kill_at = None
    whole = write_parent_answers(model, tok, str(data), tmp_path / "whole.jsonl", None, 8, 0.0, 0, batch_size=2)
    assert len(asked) == 3

    path, asked[:] = tmp_path / "a.jsonl", []
    kill_at = 3
    with pytest.raises(KeyboardInterrupt):
        write_parent_answers(model, tok, str(data), path, None, 8, 0.0, 0, batch_size=2)
    partial = tmp_path / "a.jsonl.partial"
    assert not path.exists() and len(partial.read_text().splitlines()) == 3  # the job line and two batches
    with open(partial, "a") as f:
        f.write('{"start": 4, "answers": [[4, "cut o')  # a line the kill cut off
    asked[:], kill_at = [], None
    assert write_parent_answers(model, tok, str(data), path, None, 8, 0.0, 0, batch_size=2) == path
    assert len(asked) == 1  # only the batch that was never finished
    assert read_jsonl(path) == read_jsonl(whole) and not partial.exists()
    assert json.loads(metadata_path(path).read_text())["n_samples"] == 5

    other = tmp_path / "b.jsonl"
    (tmp_path / "b.jsonl.partial").write_text(json.dumps({"job": {"batch_size": 4}}) + "\n"
                                              + json.dumps({"start": 0, "answers": [[0, "stale", True]]}) + "\n")
    asked[:] = []
    write_parent_answers(model, tok, str(data), other, None, 8, 0.0, 0, batch_size=2)
    assert len(asked) == 3 and read_jsonl(other) == read_jsonl(whole)
