import json
from pathlib import Path

import pytest

from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.tasks.base import Sample
from ar2dlm.evaluation.tasks.gsm8k import GSM8K, answers_match, extract_answer, normalize_answer
from ar2dlm.testing import tiny_tokenizer

GSM8K_TRAIN = Path(__file__).parents[3] / ".." / "shared" / "data" / "gsm8k_train.jsonl"


@pytest.mark.parametrize("completion, answer, method", [
    ("She sold 48 + 24 = 72 clips.\n#### 72", "72", "hash"),
    ("#### $1,200.50 dollars", "1200.50", "hash"),
    ("#### 72 clips.\nQuestion: next #### 5", "72", "hash"),
    ("The answer is \\boxed{18}.", "18", "boxed"),
    ("So \\boxed{\\$1,000} in total, not 5.", "1000", "boxed"),
    ("First 3 apples, then 48-24 = 24, so the answer is 24.", "24", "last_number"),
    ("It costs $5.", "5", "last_number"),
    ("A loss of -7 dollars", "-7", "last_number"),
    ("no numbers here", None, "none"),
    ("", None, "none"),
])
def test_extract_answer(completion, answer, method):
    assert extract_answer(completion) == (answer, method)


def test_normalise_and_compare():
    assert normalize_answer(" $1,000. ") == "1000"
    assert normalize_answer("72 clips") == "72"
    assert normalize_answer("Seventy.") == "seventy"
    assert answers_match("72.0", "72") and answers_match("72", "72.00")
    assert not answers_match("72.5", "72") and not answers_match(None, "72")
    assert answers_match("seventy", "seventy")


def _task_with_shots(tmp_path, n=3):
    shots = tmp_path / "train.jsonl"
    shots.write_text("".join(json.dumps({"question": f"Shot question {i}?",
                                         "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}) + "\n"
                             for i in range(n)), encoding="utf-8")
    return GSM8K(fewshot_source=shots)


def test_score():
    task = GSM8K()
    s = Sample("gsm8k/0", "q", "72")
    assert task.score(s, "48 + 24 = 72\n#### 72")["correct"]
    r = task.score(s, "48 + 24 = 71\n#### 71")
    assert not r["correct"] and r["extracted"] == "71" and r["expected"] == "72"
    # A plain few-shot continuation that goes on to invent the next question is cut first.
    assert task.score(s, " 72 clips in total.\n\nQuestion: Tom has 5 apples. #### 5")["correct"]
    assert task.score(s, "so \\boxed{72.0}")["correct"]


def test_plain_fewshot_prompt(tmp_path):
    task = _task_with_shots(tmp_path)
    sample = Sample("gsm8k/9", "How many?", "4")
    prompt = task.build_prompt(sample, chat=False, fewshot=2)
    assert prompt == ("Question: Shot question 0?\nAnswer: 0 + 1 = 1\n#### 1\n\n"
                      "Question: Shot question 1?\nAnswer: 1 + 1 = 2\n#### 2\n\n"
                      "Question: How many?\nAnswer:")
    assert task.build_prompt(sample, chat=False) == "Question: How many?\nAnswer:"
    assert task.stop_sequences(chat=False) == ("Question:",)
    # The sample itself is never one of its own shots.
    own = Sample("gsm8k/0", "Shot question 0?", "1")
    assert "Shot question 0?\nAnswer: 0" not in task.build_prompt(own, chat=False, fewshot=2)
    with pytest.raises(Ar2dlmError, match="3 few-shot"):
        task.build_prompt(own, chat=False, fewshot=3)
    with pytest.raises(Ar2dlmError):
        task.build_prompt(sample, chat=False, fewshot=-1)


def test_chat_prompt_uses_template(tmp_path):
    task = _task_with_shots(tmp_path)
    tok = tiny_tokenizer()
    sample = Sample("gsm8k/9", "How many?", "4")
    prompt = task.build_prompt(sample, tok, chat=True, fewshot=1)
    assert prompt.startswith("<|im_start|>user\nShot question 0?")
    assert "<|im_start|>assistant\n0 + 1 = 1\n#### 1<|im_end|>" in prompt
    assert prompt.endswith("How many?\nSolve the problem step by step. At the end, write the final answer as a "
                           "number after '####'.<|im_end|>\n<|im_start|>assistant\n")
    tok.chat_template = None
    with pytest.raises(Ar2dlmError, match="chat template"):
        task.build_prompt(sample, tok, chat=True)


def test_real_train_records_score_their_own_solutions():
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"{GSM8K_TRAIN} not present")
    task = GSM8K(fewshot_source=GSM8K_TRAIN)
    samples = task.load(limit=50, source=GSM8K_TRAIN)
    assert samples[0].reference == "72"
    for s in samples:
        assert task.score(s, s.data["solution"])["correct"], s.id
    prompt = task.build_prompt(samples[0], chat=False, fewshot=3)
    assert prompt.count("Question:") == 4 and "<<" not in prompt
    assert prompt.endswith(f"Question: {samples[0].prompt}\nAnswer:")
    assert samples[0].prompt not in prompt.split("Question:")[1]  # skipped as its own shot
