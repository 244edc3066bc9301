import gzip
import json
from pathlib import Path

import pytest

from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.tasks.code_extraction import fenced_blocks, longest_compiling_prefix
from ar2dlm.evaluation.tasks.humaneval import HumanEval, assemble_solution
from ar2dlm.evaluation.tasks.mbpp import MBPP, extract_code, function_name
from ar2dlm.testing import tiny_tokenizer

HUMANEVAL_FILE = Path(__file__).parents[3] / ".." / "shared" / "data" / "humaneval.jsonl.gz"

HE_RECORD = {
    "task_id": "Toy/0",
    "prompt": 'from typing import List\n\n\ndef _helper(x):\n    return x\n\n\ndef add_all(xs: List[int]) -> int:\n'
              '    """Sum of xs.\n    >>> add_all([1, 2])\n    3\n    """\n',
    "canonical_solution": "    return sum(_helper(x) for x in xs)\n",
    "test": "\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
    "entry_point": "add_all",
}
MBPP_RECORDS = [
    {"task_id": 1, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 2, "prompt": "Write a function to square a number.", "code": "def sq(x):\n    return x * x",
     "test_list": ["assert sq(3) == 9", "assert sq(0) == 0"]},
]


@pytest.fixture
def humaneval(tmp_path):
    path = tmp_path / "he.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(HE_RECORD) + "\n")
    task = HumanEval(timeout_s=10)
    return task, task.load(source=str(path))[0]


def test_fenced_blocks_and_prefix():
    text = "Here:\n```python\na = 1\n```\nand\n```bash\nls\n```\n```\nb = 2\n"
    assert fenced_blocks(text) == ["a = 1\n", "b = 2\n"]
    assert longest_compiling_prefix("x = 1\ndef f():\n    return (\n") == "x = 1\n"


@pytest.mark.parametrize("completion", [
    "    return sum(xs)\n",  # a bare body
    "    return sum(xs)\n```\n\nThis sums the list.\n",  # a pre-filled chat answer closing its fence, then prose
    "    return sum(xs)\n\n\nprint(add_all([1]))\nassert False\n",  # a base model testing its own work
    "    return total(xs)\n\n\ndef total(xs):\n    return sum(xs)\n\n\ndef broken(:\n",  # helper kept, cut-off tail
    "Sure! Here it is:\n```python\ndef add_all(xs):\n    return sum(_helper(x) for x in xs)\n```\nDone.",
    "```python\nfrom typing import List\n\ndef add_all(xs: List[int]) -> int:\n    return sum(xs)\n```",
    "def add_all(xs):\n    return sum(xs)\n\nThat is all.",  # a full definition without a fence
    "```python\n    return sum(xs)\n```",  # a fenced body
])
def test_humaneval_accepts_completion_shapes(humaneval, completion):
    task, sample = humaneval
    r = task.score(sample, completion)
    assert r["correct"], (r["status"], r["stderr_tail"], r["solution"])


@pytest.mark.parametrize("completion", [
    "", "    return 0\n", "    return sum(xs) +\n", "I cannot do that.", "```python\ndef other(xs):\n    return 3\n```",
    "    import sys; sys.exit(0)\n",
])
def test_humaneval_rejects_wrong_or_empty(humaneval, completion):
    task, sample = humaneval
    assert not task.score(sample, completion)["correct"]


def test_humaneval_prompts(humaneval):
    task, sample = humaneval
    assert task.build_prompt(sample, chat=False) == sample.prompt
    tok = tiny_tokenizer()
    chat = task.build_prompt(sample, tok, chat=True)
    assert chat.startswith("<|im_start|>user\nComplete the following Python function.")
    assert chat.endswith("<|im_start|>assistant\n```python\n" + sample.prompt)
    with pytest.raises(Ar2dlmError, match="few-shot"):
        task.build_prompt(sample, chat=False, fewshot=1)


def test_assemble_solution_keeps_prompt_helpers_for_full_definitions():
    program = assemble_solution(HE_RECORD["prompt"], "def add_all(xs):\n    return 1\n", "add_all")
    assert program.startswith(HE_RECORD["prompt"].rstrip("\n")) and program.endswith("    return 1\n")


def test_humaneval_real_canonical_solutions_pass():
    if not HUMANEVAL_FILE.is_file():
        pytest.skip(f"{HUMANEVAL_FILE} not present")
    task = HumanEval(timeout_s=10)
    samples = task.load(limit=5, source=HUMANEVAL_FILE)
    assert [s.id for s in samples] == [f"HumanEval/{i}" for i in range(5)]
    for s in samples:
        assert task.score(s, s.reference)["correct"], s.id
        assert task.score(s, f"```python\n{s.prompt}{s.reference}```")["correct"], s.id
        assert not task.score(s, "")["correct"], s.id


@pytest.fixture
def mbpp(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MBPP_RECORDS), encoding="utf-8")
    return MBPP(fewshot_source=path, timeout_s=10), MBPP(timeout_s=10).load(source=path)


def test_mbpp_load_and_function_name(mbpp):
    _, samples = mbpp
    assert [s.id for s in samples] == ["mbpp/1", "mbpp/2"]
    assert samples[1].prompt == "Write a function to square a number."  # the sanitized 'prompt' field
    assert samples[0].data["entry_point"] == "add"
    assert function_name('assert set(similar_elements((3, 4), (5, 4))) == set((4,))') == "similar_elements"
    assert function_name("assert math.isclose(area(2), 12.56, rel_tol=0.01)") == "area"


@pytest.mark.parametrize("completion", [
    "def add(a, b):\n    return a + b\n",
    "def add(a, b):\n    return a + b\n\n\nassert add(1, 1) == 5\n",  # the model's own wrong test is cut
    'def add(a, b):\n    return a + b\n"""\nWrite a function to multiply\n',  # the next plain problem is cut
    "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds.",
    "import operator\n\ndef add(a, b):\n    return operator.add(a, b)\n\ndef half(:",
])
def test_mbpp_accepts(mbpp, completion):
    task, samples = mbpp
    r = task.score(samples[0], completion)
    assert r["correct"], (r["status"], r["stderr_tail"], r["solution"])


@pytest.mark.parametrize("completion", ["", "def add(a, b):\n    return a - b\n", "def plus(a, b):\n    return a + b\n",
                                        "def add(a, b):\n    while True:\n        pass\n"])
def test_mbpp_rejects(mbpp, completion):
    task, samples = mbpp
    task.timeout_s = 1.5
    assert not task.score(samples[0], completion)["correct"]


def test_mbpp_reference_solutions_pass(mbpp):
    task, samples = mbpp
    for s in samples:
        assert task.score(s, s.reference)["correct"]


def test_mbpp_prompts(mbpp):
    task, samples = mbpp
    plain = task.build_prompt(samples[1], chat=False, fewshot=1)
    assert plain == ('"""\nWrite a function to add two numbers.\nassert add(1, 2) == 3\n"""\n'
                     'def add(a, b):\n    return a + b\n\n\n'
                     '"""\nWrite a function to square a number.\nassert sq(3) == 9\n"""\n')
    chat = task.build_prompt(samples[1], tiny_tokenizer(), chat=True, fewshot=1)
    assert "<|im_start|>assistant\n```python\ndef add(a, b):\n    return a + b\n```<|im_end|>" in chat
    assert chat.endswith("square a number.\n\nassert sq(3) == 9<|im_end|>\n<|im_start|>assistant\n")
    assert "assert sq(0)" not in chat  # only the first test is shown


def test_mbpp_malformed_tests(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**MBPP_RECORDS[0], "test_list": []}) + "\n", encoding="utf-8")
    with pytest.raises(Ar2dlmError, match=r"bad\.jsonl:1: .*test_list"):
        MBPP().load(source=path)


def test_extract_code_prefers_block_defining_the_function():
    text = "```python\nprint('demo')\n```\n```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(text, "add").startswith("def add")
