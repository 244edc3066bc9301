"""HumanEval: complete a Python function from its signature and docstring; correct when its unit tests pass.

Records: {"task_id", "prompt", "canonical_solution", "test", "entry_point"} (the hub's `openai/openai_humaneval`).
The expected completion is the function body continuing the prompt. A completion that instead holds a full
```python block or writes `def <entry_point>(` again is accepted too: that definition is appended after the prompt
(which keeps the prompt's imports and helper functions) and replaces the header-only one.

Correctness is the exit status of prompt + completion + test + `check(entry_point)` in the sandbox, nothing else.
"""

from __future__ import annotations

from ar2dlm.data.records import require_fields
from ar2dlm.data.tokenize import render_chat
from ar2dlm.evaluation.sandbox import run_python
from ar2dlm.evaluation.tasks.base import Sample, Task
from ar2dlm.evaluation.tasks.code_extraction import (
    compiles, cut_bare_continuation, defines, fenced_blocks, longest_compiling_prefix, pick_block,
    strip_leading_prose,
)

CHAT_INSTRUCTION = "Complete the following Python function. Answer with the whole function in a ```python block."
# Where a bare continuation of a base model usually goes off the function (the Codex paper's stop words).
STOP_PLAIN = ("\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "\n```")


def _first_code_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def assemble_solution(prompt: str, completion: str, entry_point: str) -> str:
    """The program (without tests) that the completion stands for; see the module docstring for the shapes."""
    first = _first_code_line(completion)
    if not first or first[0].isspace():  # a body continuing the prompt (possibly closed by a fence, then prose)
        body = cut_bare_continuation(completion)
        return prompt + longest_compiling_prefix(body, header=prompt)
    blocks = fenced_blocks(completion)
    code = pick_block(blocks, entry_point) if blocks else cut_bare_continuation(strip_leading_prose(completion))
    if not defines(code, entry_point):  # a fenced body, or something else: read it as a continuation
        if _first_code_line(code)[:1].isspace():
            return prompt + longest_compiling_prefix(code, header=prompt)
        return prompt
    header = prompt.rstrip("\n") + "\n\n\n" if compiles(prompt) else ""
    return header + longest_compiling_prefix(code, header=header)


def program_with_tests(solution: str, test: str, entry_point: str) -> str:
    return f"{solution}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(Task):
    name = "humaneval"
    default_hub = ("openai/openai_humaneval", None, "test")
    fewshot_hub = None  # zero-shot only, as the benchmark is defined

    def __init__(self, timeout_s: float = 10.0, memory_mb: int | None = 1024):
        super().__init__()
        self.timeout_s, self.memory_mb = timeout_s, memory_mb

    def parse_record(self, where: str, index: int, rec: object) -> Sample:
        rec = require_fields(where, rec, {"task_id": str, "prompt": str, "canonical_solution": str, "test": str,
                                          "entry_point": str})
        return Sample(id=rec["task_id"], prompt=rec["prompt"], reference=rec["canonical_solution"],
                      data={"test": rec["test"], "entry_point": rec["entry_point"]})

    def build_prompt(self, sample: Sample, tokenizer=None, chat: bool = True, fewshot: int = 0) -> str:
        self.fewshot_examples(fewshot)  # raises for fewshot > 0
        if not chat:
            return sample.prompt
        user = f"{CHAT_INSTRUCTION}\n\n```python\n{sample.prompt}```"
        # Pre-filling the answer with the header makes small chat models write the body rather than talk about it.
        return render_chat(tokenizer, [{"role": "user", "content": user}]) + "```python\n" + sample.prompt

    def stop_sequences(self, chat: bool = True) -> tuple[str, ...]:
        return STOP_PLAIN if not chat else ("\n```",)

    def score(self, sample: Sample, completion: str) -> dict:
        entry = sample.data["entry_point"]
        solution = assemble_solution(sample.prompt, completion, entry)
        result = run_python(program_with_tests(solution, sample.data["test"], entry), timeout_s=self.timeout_s,
                            memory_mb=self.memory_mb)
        return {"correct": result.passed, "status": result.status, "seconds": round(result.seconds, 3),
                "stderr_tail": result.stderr[-1000:], "solution": solution}
