import gzip
import json
import os
import time
from pathlib import Path

import pytest

from ar2dlm.evaluation.sandbox import run_python

HUMANEVAL = Path(__file__).parents[2] / ".." / "shared" / "data" / "humaneval.jsonl.gz"


def _gone(pid: int) -> bool:
    """True when no live process has this pid (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_passing_code_passes():
    r = run_python("x = sum(range(10))\nassert x == 45\nprint('ok')", timeout_s=10)
    assert r.passed and r.status == "passed" and r.returncode == 0
    assert r.stdout.strip() == "ok"


def test_failing_assert_fails_with_traceback():
    r = run_python("assert 1 + 1 == 3, 'bad maths'", timeout_s=10)
    assert not r.passed and r.status == "failed"
    assert "AssertionError" in r.stderr and "bad maths" in r.stderr


def test_syntax_error_is_error_status():
    r = run_python("def f(:\n  pass", timeout_s=10)
    assert not r.passed and r.status == "error" and "SyntaxError" in r.stderr


@pytest.mark.parametrize("escape", ["import sys; sys.exit(0)", "raise SystemExit(0)", "exit()",
                                    "import os; os._exit(0)"])
def test_leaving_early_is_not_a_pass(escape):
    r = run_python(f"{escape}\nassert False", timeout_s=10)
    assert not r.passed and r.status == "failed"


def test_printed_claims_are_not_trusted():
    r = run_python("print('passed'); print('ALL TESTS PASSED', flush=True)\nraise RuntimeError('no')", timeout_s=10)
    assert not r.passed and r.status == "failed"


def test_infinite_loop_times_out_and_the_whole_group_is_killed():
    code = ("import os, time\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    while True: time.sleep(0.01)\n"
            "print(os.getpid(), child, flush=True)\n"
            "while True: pass\n")
    t0 = time.monotonic()
    r = run_python(code, timeout_s=1.5)
    assert time.monotonic() - t0 < 6
    assert r.status == "timeout" and not r.passed and r.returncode is None
    pids = [int(x) for x in r.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 3
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids)


def test_background_process_is_killed_after_normal_exit():
    code = ("import os, time\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    time.sleep(60)\n"
            "    os._exit(0)\n"
            "print(child, flush=True)\n")
    r = run_python(code, timeout_s=10)
    assert r.passed
    pid = int(r.stdout.split()[0])
    deadline = time.monotonic() + 3
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)


def test_huge_allocation_fails_under_memory_limit():
    r = run_python("x = bytearray(8 * 1024 ** 3)\nprint(len(x))", timeout_s=10, memory_mb=256)
    assert not r.passed and r.status == "failed" and "MemoryError" in r.stderr


@pytest.mark.parametrize("snippet", [
    "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "import _socket\n_socket.socket()",
    "import socket\nsocket.socket(socket.AF_UNIX).connect('/var/run/docker.sock')",
    "import socket\nsocket.getaddrinfo('example.com', 80)",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)",
])
def test_opening_a_socket_fails(snippet):
    r = run_python(snippet, timeout_s=10)
    assert not r.passed and r.status == "failed"
    assert "network access is disabled" in r.stderr


def test_local_socketpair_and_asyncio_still_work():
    code = ("import asyncio, socket\n"
            "a, b = socket.socketpair()\n"
            "a.sendall(b'x'); assert b.recv(1) == b'x'\n"
            "async def main():\n"
            "    await asyncio.sleep(0)\n"
            "    return 3\n"
            "assert asyncio.run(main()) == 3\n")
    r = run_python(code, timeout_s=10)
    assert r.passed, r.stderr


def test_runs_in_fresh_temp_dir_with_stdin_closed():
    code = ("import os, sys\n"
            "assert sorted(os.listdir('.')) == ['.stderr', '.stdout', 'program.py']\n"
            "assert sys.stdin.read() == ''\n"
            "assert 'ar2dlm-sandbox-' in os.getcwd()\n"
            "open('scratch.txt', 'w').write('x')\n")
    r = run_python(code, timeout_s=10)
    assert r.passed, r.stderr


def test_output_is_truncated_to_its_tail():
    r = run_python("print('a' * 100000 + 'END')", timeout_s=10, max_output_chars=50)
    assert r.passed and len(r.stdout) <= 50 and r.stdout.rstrip().endswith("END")


def _humaneval_records(n):
    if not HUMANEVAL.is_file():
        pytest.skip(f"{HUMANEVAL} not present")
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    for rec in _humaneval_records(5):
        check = f"\n\n{rec['test']}\n\ncheck({rec['entry_point']})\n"
        good = run_python(rec["prompt"] + rec["canonical_solution"] + check, timeout_s=10)
        assert good.passed, (rec["task_id"], good.stderr)
        empty = run_python(rec["prompt"] + check, timeout_s=10)
        assert not empty.passed, rec["task_id"]
