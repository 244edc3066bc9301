"""Run untrusted (model-written) Python in a separate, limited process and report only how it ended.

Isolation, all of it best effort (this is not a security boundary; run evaluations in a disposable container or VM
when the code may be hostile):
  * a fresh interpreter (`sys.executable -I`: no user site-packages, no PYTHON* variables, no script dir on the
    path) in a fresh temporary directory that is removed afterwards, with a minimal environment and stdin on
    /dev/null;
  * a wall-clock limit: on expiry the whole process group is killed (SIGKILL), so forked children die too; the group
    is also killed after a normal exit, so nothing the program left running in the background survives;
  * resource limits set by the child on itself before the untrusted code runs (RLIMIT_AS memory, RLIMIT_FSIZE file
    size, no core dumps). They are set in the child's start-up code rather than in `preexec_fn`, which the Python
    docs call unsafe in a process with threads (the evaluating process runs torch's thread pools);
  * no network: before the code runs, `socket.socket` / `_socket.socket` are replaced by a class that refuses to
    open a new socket (of any family: a UNIX socket could reach local services), and `create_connection`,
    `getaddrinfo`, `fromfd`, ... by a function that raises. `socket.socketpair()` keeps working (it reaches
    nothing outside the process; asyncio's event loop needs it). Code that reaches the OS another way (ctypes,
    `os.system`, a subprocess running another program) is not stopped;
  * output goes to files (no pipe can fill up and block the child) and only a tail is kept.

The verdict comes only from the exit status of the run, never from anything the program prints. The start-up code
exits 0 only after the whole program has run; `sys.exit()` / `SystemExit` and `os._exit()` inside the program count as
failures, so a program cannot "pass" by leaving before its tests run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROGRAM_FILE = "program.py"
# Exit codes of the start-up code below (any other non-zero code is the program's own, or a signal).
EXIT_FAILED = 1  # the program raised (an assertion included) or tried to exit early
EXIT_COMPILE_ERROR = 3  # the program is not valid Python

# Runs in the child before the untrusted program. Kept free of f-string braces: it is formatted with %.
_BOOTSTRAP = r'''
import builtins, os, resource, sys, traceback
def _limit(kind, value):
    try:
        hard = resource.getrlimit(kind)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # never ask for more than allowed, or the whole call fails
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass
if %(memory_bytes)d > 0:
    _limit(resource.RLIMIT_AS, %(memory_bytes)d)
_limit(resource.RLIMIT_FSIZE, %(file_bytes)d)
_limit(resource.RLIMIT_CORE, 0)

import socket, _socket
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the evaluation sandbox")
def _guarded(base):
    # Wrapping an existing descriptor stays possible (socket.socketpair() does it, and asyncio needs a
    # socketpair for its event loop); opening a new socket of any family, UNIX included, does not.
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:
            _no_network()
        base.__init__(self, family, type, proto, fileno)
    return type("socket", (base,), {"__init__": __init__})
# socket.socket.__init__ calls _socket.socket.__init__ by name, so each module gets a guard over its own class.
_socket.socket = _socket.SocketType = _guarded(_socket.socket)
socket.socket = socket.SocketType = _guarded(socket.socket)
for _mod in (socket, _socket):
    for _name in ("fromfd", "create_connection", "create_server", "getaddrinfo", "gethostbyname",
                  "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _no_network)

class _EarlyExit(BaseException):
    pass
def _refuse_exit(*args, **kwargs):
    raise _EarlyExit("the program tried to exit before finishing")
_real_exit = os._exit
os._exit = _refuse_exit

_path = %(program_path)r
with open(_path, encoding="utf-8") as _f:
    _source = _f.read()
try:
    _code = compile(_source, _path, "exec")
except (SyntaxError, ValueError) as _e:
    traceback.print_exception(_e)
    sys.stderr.flush()
    _real_exit(%(exit_compile)d)
try:
    exec(_code, {"__name__": "__main__", "__file__": _path, "__builtins__": builtins})
except BaseException as _e:  # SystemExit too: leaving before the tests ran is not a pass
    traceback.print_exception(_e)
    try:
        sys.stdout.flush(); sys.stderr.flush()
    except BaseException:
        pass
    _real_exit(%(exit_failed)d)
try:
    sys.stdout.flush(); sys.stderr.flush()
except BaseException:
    _real_exit(%(exit_failed)d)
_real_exit(0)
'''


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # 'passed' | 'failed' (ran and failed) | 'timeout' | 'error' (did not compile, or could not start)
    seconds: float
    returncode: int | None  # None on timeout or when the process could not start; negative: killed by a signal
    stdout: str  # tail
    stderr: str  # tail


def _tail(path: Path, max_chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * max_chars))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return text[-max_chars:]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int | None = 1024, max_output_chars: int = 4000,
               max_file_mb: int = 64) -> SandboxResult:
    """Run `code` as a `__main__` program in a sandboxed child process; passed only if it runs to the end.

    `memory_mb` limits the child's address space (None or 0: no limit); `max_file_mb` caps any file it writes
    (including its captured output); `max_output_chars` is how much of the end of stdout/stderr is kept.
    """
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ar2dlm-sandbox-") as tmp:
        work = Path(tmp)
        program = work / PROGRAM_FILE
        program.write_text(code, encoding="utf-8")
        bootstrap = _BOOTSTRAP % dict(
            memory_bytes=int(memory_mb or 0) * 1024 * 1024, file_bytes=int(max_file_mb) * 1024 * 1024,
            program_path=str(program), exit_compile=EXIT_COMPILE_ERROR, exit_failed=EXIT_FAILED,
        )
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        out_path, err_path = work / ".stdout", work / ".stderr"
        returncode: int | None = None
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", bootstrap], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, start_new_session=True, close_fds=True,
                )
            except OSError as e:
                return SandboxResult(False, "error", time.monotonic() - start, None, "",
                                     f"sandbox could not start: {e}")
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # the child leads its own session, so its pid is the group id
                proc.wait()
        seconds = time.monotonic() - start
        stdout, stderr = _tail(out_path, max_output_chars), _tail(err_path, max_output_chars)
    if timed_out:
        return SandboxResult(False, "timeout", seconds, None, stdout, stderr + f"\n[timed out after {timeout_s} s]")
    if returncode == 0:
        status = "passed"
    elif returncode == EXIT_COMPILE_ERROR:
        status = "error"
    else:
        status = "failed"
    return SandboxResult(returncode == 0, status, seconds, returncode, stdout, stderr)
