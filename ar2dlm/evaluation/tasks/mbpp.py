"""MBPP: write a short Python function from a one-line description; correct when all its asserts pass.

Records: {"task_id", "text" (or "prompt", as in the sanitized config), "code", "test_list": [assert lines],
optional "test_setup_code"} (the hub's `google-research-datasets/mbpp`, config `full`). The prompt shows the
description and the first assert (which fixes the function's name and signature). The completion is the code: a
```python block when there is one, else the text itself, cut where the program plainly ends.

Correctness is the exit status of code + setup + all asserts in the sandbox, nothing else.
"""

from __future__ import annotations

import re

from ar2dlm.data.records import require_fields
from ar2dlm.data.tokenize import render_chat
from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.sandbox import run_python
from ar2dlm.evaluation.tasks.base import Sample, Task
from ar2dlm.evaluation.tasks.code_extraction import (
    cut_at_line_prefixes, fenced_blocks, longest_compiling_prefix, pick_block, strip_leading_prose,
)

CHAT_INSTRUCTION = "Write a Python function for the task below. Your code should pass this test:"
# Column-0 line starts after which a plain continuation is no longer the solution: the next few-shot problem,
# a fence, or the model testing its own code.
STOP_LINES = ('"""', "'''", "```", "if __name__", "assert ", "print(", "# Test", "# test")
_CALLED = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:set\(|sorted\(|math\.isclose\(|abs\()?\s*([A-Za-z_]\w*)\s*\(")


def function_name(test: str) -> str | None:
    """The function an MBPP assert calls, e.g. 'assert remove_Occ("hello","l") == "heo"' -> 'remove_Occ'."""
    m = _CALLED.search(test)
    return m.group(1) if m else None


def extract_code(completion: str, entry_point: str | None = None) -> str:
    blocks = fenced_blocks(completion)
    if blocks:
        code = pick_block(blocks, entry_point)
    else:
        code = cut_at_line_prefixes(strip_leading_prose(completion), STOP_LINES)
    return longest_compiling_prefix(code)


def program_with_tests(code: str, setup: str, tests: list[str]) -> str:
    return f"{code}\n\n{setup}\n\n" + "\n".join(tests) + "\n"


class MBPP(Task):
    name = "mbpp"
    default_hub = ("google-research-datasets/mbpp", "full", "test")
    fewshot_hub = ("google-research-datasets/mbpp", "full", "prompt")  # the split MBPP sets aside for shots

    def __init__(self, fewshot_source=None, timeout_s: float = 10.0, memory_mb: int | None = 1024):
        super().__init__(fewshot_source)
        self.timeout_s, self.memory_mb = timeout_s, memory_mb

    def parse_record(self, where: str, index: int, rec: object) -> Sample:
        if isinstance(rec, dict) and "text" not in rec and "prompt" in rec:
            rec = {**rec, "text": rec["prompt"]}
        rec = require_fields(where, rec, {"task_id": (int, str), "text": str, "code": str, "test_list": list})
        tests = rec["test_list"]
        if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise Ar2dlmError(f"{where}: field 'test_list' must be a non-empty list of assert statements")
        setup = rec.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise Ar2dlmError(f"{where}: field 'test_setup_code' has type {type(setup).__name__}")
        return Sample(id=f"{self.name}/{rec['task_id']}", prompt=rec["text"].strip(), reference=rec["code"],
                      data={"test_list": list(tests), "test_setup_code": setup,
                            "entry_point": function_name(tests[0])})

    @staticmethod
    def _plain_problem(sample: Sample) -> str:
        return f'"""\n{sample.prompt}\n{sample.data["test_list"][0]}\n"""\n'

    def build_prompt(self, sample: Sample, tokenizer=None, chat: bool = True, fewshot: int = 0) -> str:
        shots = self.fewshot_examples(fewshot, exclude=sample)
        if chat:
            messages = []
            for s in shots + [sample]:
                messages.append({"role": "user",
                                 "content": f"{CHAT_INSTRUCTION}\n\n{s.prompt}\n\n{s.data['test_list'][0]}"})
                if s is not sample:
                    messages.append({"role": "assistant", "content": f"```python\n{s.reference.strip()}\n```"})
            return render_chat(tokenizer, messages)
        solved = "".join(f"{self._plain_problem(s)}{s.reference.strip()}\n\n\n" for s in shots)
        return solved + self._plain_problem(sample)

    def stop_sequences(self, chat: bool = True) -> tuple[str, ...]:
        return ("\n```",) if chat else ('\n"""', "\nassert ", "\nif __name__", "\nprint(")

    def score(self, sample: Sample, completion: str) -> dict:
        code = extract_code(completion, sample.data["entry_point"])
        result = run_python(program_with_tests(code, sample.data["test_setup_code"], sample.data["test_list"]),
                            timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return {"correct": result.passed, "status": result.status, "seconds": round(result.seconds, 3),
                "stderr_tail": result.stderr[-1000:], "solution": code}
