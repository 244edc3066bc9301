"""GSM8K: grade-school maths word problems, scored by the final number of the answer.

Records: {"question": str, "answer": str ending with "#### <number>"} (the hub's `openai/gsm8k`, config `main`).
The model's answer is, in order of preference: the number after '####', else the content of the last
\\boxed{...}, else the last number in the text. Both sides are normalised (dollar signs, thousands separators, a
trailing full stop and unit words are dropped) and compared as numbers when both parse, so '$1,000.00' matches
'1000'.
"""

from __future__ import annotations

import math
import re

from ar2dlm.data.records import require_fields
from ar2dlm.data.tokenize import render_chat
from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.tasks.base import Sample, Task

# A number not glued to a preceding word, digit or dot (so '48-24' yields 48 and 24, not -24); thousands
# separators only in groups of three, so a list '3,4' stays two numbers.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, e.g. 48/2 = <<48/2=24>>24
INSTRUCTION = "Solve the problem step by step. At the end, write the final answer as a number after '####'."
STOP_PLAIN = ("Question:",)


def normalize_answer(text: str) -> str:
    """The first number in `text` without '$' and thousands separators, else the lower-cased stripped text."""
    cleaned = text.replace("$", "").strip()
    m = _NUMBER.search(cleaned)
    if m:
        return m.group(0).replace(",", "")
    return cleaned.rstrip(".").strip().lower()


def _boxed_contents(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced (\\boxed{\\frac{1}{2}} keeps its inner braces)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def extract_answer(completion: str) -> tuple[str | None, str]:
    """(normalised answer or None, how it was found: 'hash' | 'boxed' | 'last_number' | 'none')."""
    if "####" in completion:
        line = completion.split("####", 1)[1].strip().splitlines()
        if line and line[0].strip():
            return normalize_answer(line[0]), "hash"
    boxed = _boxed_contents(completion)
    if boxed is not None and boxed.strip():
        return normalize_answer(boxed), "boxed"
    numbers = _NUMBER.findall(completion.replace("$", ""))
    if numbers:
        return numbers[-1].replace(",", ""), "last_number"
    return None, "none"


def answers_match(predicted: str | None, expected: str) -> bool:
    """Numeric comparison when both parse ('72.0' == '72'), exact string comparison otherwise."""
    if predicted is None:
        return False
    try:
        return math.isclose(float(predicted), float(expected), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return predicted == expected


def clean_solution(answer: str) -> str:
    """A reference solution as a few-shot answer: without the calculator annotations."""
    return _CALCULATOR.sub("", answer).strip()


class GSM8K(Task):
    name = "gsm8k"
    default_hub = ("openai/gsm8k", "main", "test")
    fewshot_hub = ("openai/gsm8k", "main", "train")

    def parse_record(self, where: str, index: int, rec: object) -> Sample:
        rec = require_fields(where, rec, {"question": str, "answer": str})
        if "####" not in rec["answer"]:
            raise Ar2dlmError(f"{where}: field 'answer' has no '#### <final answer>' line")
        gold = normalize_answer(rec["answer"].rsplit("####", 1)[1])
        return Sample(id=f"{self.name}/{index}", prompt=rec["question"].strip(), reference=gold,
                      data={"solution": rec["answer"]})

    def build_prompt(self, sample: Sample, tokenizer=None, chat: bool = True, fewshot: int = 0) -> str:
        shots = self.fewshot_examples(fewshot, exclude=sample)
        if chat:
            messages = []
            for shot in shots:
                messages.append({"role": "user", "content": f"{shot.prompt}\n{INSTRUCTION}"})
                messages.append({"role": "assistant", "content": clean_solution(shot.data["solution"])})
            messages.append({"role": "user", "content": f"{sample.prompt}\n{INSTRUCTION}"})
            return render_chat(tokenizer, messages)
        parts = [f"Question: {s.prompt}\nAnswer: {clean_solution(s.data['solution'])}\n\n" for s in shots]
        return "".join(parts) + f"Question: {sample.prompt}\nAnswer:"

    def stop_sequences(self, chat: bool = True) -> tuple[str, ...]:
        return () if chat else STOP_PLAIN

    def score(self, sample: Sample, completion: str) -> dict:
        # A plain few-shot prompt invites the model to write the next "Question:"; only its own answer counts.
        answer_part = completion.split(STOP_PLAIN[0], 1)[0]
        predicted, method = extract_answer(answer_part)
        return {"correct": answers_match(predicted, sample.reference), "extracted": predicted,
                "expected": sample.reference, "method": method}
