"""Atomic file and folder writes: a reader never sees a half-written result, a crash leaves the old one intact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ar2dlm.errors import Ar2dlmError


def check_output_file(path: str | os.PathLike | None, flag: str) -> None:
    """Refuse an output file that cannot be written, before any expensive work: `path` is a folder, or its nearest
    existing ancestor is a file or not writable. Missing folders are fine (atomic_write creates them)."""
    if path is None:
        return
    if Path(path).expanduser().is_dir():
        raise Ar2dlmError(f"{flag} {path} is a folder; name a file")
    _check_folder_creatable(Path(path).expanduser().absolute().parent, flag, path)


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Like check_output_file, for an output folder: refuse a file at `path` or in the way of its parents."""
    if Path(path).expanduser().exists() and not Path(path).expanduser().is_dir():
        raise Ar2dlmError(f"{flag} {path} is a file; name a folder")
    _check_folder_creatable(Path(path).expanduser().absolute(), flag, path)


def _check_folder_creatable(folder: Path, flag: str, path) -> None:
    """`folder` exists or can be made: its nearest existing ancestor is a folder we may write in."""
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise Ar2dlmError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise Ar2dlmError(f"{flag} {path}: no permission to write in {folder}")


def _cannot_write(path: Path, e: OSError, name_file: bool = True) -> Ar2dlmError:
    where = f" ({e.filename})" if name_file and e.filename else ""  # e.g. the file that is in a folder's way
    return Ar2dlmError(f"cannot write {path}: {e.strerror or e}{where}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Open a temp file beside `path`; on success fsync and rename it over `path`, on error delete it.

    A destination that cannot be created or replaced (a file where a folder should be, `path` a folder, no
    permission) is an Ar2dlmError: the one-line error of the CLI, not a traceback after the work is done."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _cannot_write(path, e, name_file=False) from None  # its filename is our temp file
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def appended_records(text: str) -> list:
    """The JSON values of a file that a run appends to a line at a time (a partial file of finished work); a line
    that is not JSON, the last one cut off by a kill mid-write, is left out."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temp folder beside `path`; on success it replaces `path` (old contents removed), on error it goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib Figure as PNG atomically, through the Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
