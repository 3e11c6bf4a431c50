"""Crash-safe files for ``segvit.train``'s work dir: a file is either its previous complete version or its new
complete version, whenever the process dies (SIGKILL, power loss) and wherever.

Every write goes to a temporary file in the same folder (``.NAME.PID-N.segvit-tmp``), is flushed and fsynced, and is
renamed onto its name with ``os.replace`` (atomic on POSIX and Windows); then the folder is fsynced, so the rename
itself survives a power loss. A kill leaves at most a stray temporary file, which ``remove_stale_temporaries``
deletes at the next start.

Test-only fault injection: ``SEGVIT_FAULT_AT="LABEL:N:PHASE[,...]"`` SIGKILLs the process itself at the N-th
(1-based, counted in this process) write labelled LABEL, at PHASE: ``write`` (after ``SEGVIT_FAULT_BYTES``, default
65536, bytes of the temporary file, or at its end if it is shorter: a partial, unsynced file), ``synced`` (the
temporary file is complete and fsynced, not yet renamed) or ``replaced`` (renamed, the folder not yet fsynced).
``fault_point(label, phase)`` marks further points (``segvit.train`` uses ``step:N:end``, after the N-th iteration of
the process). Nothing reads these variables outside tests; unset, every hook is one dict lookup.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import warnings

TEMP_SUFFIX = ".segvit-tmp"
_TEMP_RE = re.compile(r"^\..+\.\d+-\d+" + re.escape(TEMP_SUFFIX) + "$")
_FAULT_ENV = "SEGVIT_FAULT_AT"
_names = itertools.count()
_seen: dict[str, int] = {}  # label -> how many times fault_point(label, first phase) was reached in this process


# -- test-only fault injection ------------------------------------------------------------------------------

def _fault_specs() -> list[tuple[str, int, str]]:
    spec = os.environ.get(_FAULT_ENV)
    if not spec:
        return []
    out = []
    for item in spec.split(","):
        label, n, phase = item.strip().split(":")
        out.append((label, int(n), phase))
    return out


def _armed(label: str, phase: str) -> bool:
    return any(l == label and n == _seen.get(label, 0) and p == phase for l, n, p in _fault_specs())


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def count(label: str) -> None:
    """Count one more occurrence of ``label`` (test-only fault injection; see the module docstring)."""
    if os.environ.get(_FAULT_ENV):
        _seen[label] = _seen.get(label, 0) + 1


def fault_point(label: str, phase: str) -> None:
    """SIGKILL this process here if ``SEGVIT_FAULT_AT`` asks for it (test-only)."""
    if os.environ.get(_FAULT_ENV) and _armed(label, phase):
        _die()


class _KillAfter:
    """A file wrapper that SIGKILLs the process once ``limit`` bytes have gone to the file (test-only)."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) >= self.left:
            self.f.write(data[:self.left])
            self.f.flush()
            _die()
        self.left -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


# -- atomic writes ------------------------------------------------------------------------------------------

def fsync_dir(directory: str) -> None:
    """fsync a folder, so that renames and deletions in it are durable (a no-op where folders cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}-{next(_names)}{TEMP_SUFFIX}")


def _replace(tmp: str, path: str, label: str) -> None:
    fault_point(label, "synced")
    os.replace(tmp, path)
    fault_point(label, "replaced")
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _discard(tmp: str, exc: BaseException, note: str) -> None:
    """After a failed write: remove the temporary file, and say on the error (not on a KeyboardInterrupt or a
    SystemExit) which file it was about."""
    try:
        os.unlink(tmp)
    except OSError:
        pass
    if isinstance(exc, Exception):
        exc.add_note(note)


def atomic_write(path: str, write, label: str = "file") -> None:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object (a temporary in the same folder), which
    is flushed, fsynced and renamed onto ``path``. On any error the temporary is removed and ``path`` is
    untouched; the error says which file."""
    count(label)
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            write(_KillAfter(f, int(os.environ.get("SEGVIT_FAULT_BYTES", 65536)))
                  if _armed(label, "write") else f)
            fault_point(label, "write")  # a shorter file: killed at its end, before the fsync
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path, label)
    except BaseException as exc:
        _discard(tmp, exc, f"while writing {path} (through the temporary {tmp}; {os.path.basename(path)} is "
                           "unchanged)")
        raise


def atomic_save(obj, path: str, label: str = "file") -> None:
    """``torch.save(obj, path)``, atomically (see ``atomic_write``)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), label)


def atomic_write_text(path: str, text: str, label: str = "file") -> None:
    atomic_write(path, lambda f: f.write(text.encode()), label)


def atomic_link(source: str, path: str, label: str = "file") -> str:
    """Make ``path`` the same complete file as ``source``, atomically: a hard link to ``source`` under a temporary
    name, renamed onto ``path`` (no data copied). Where the filesystem has no hard links, a copy written by
    ``atomic_write``. Returns "link" or "copy"."""
    count(label)
    if os.path.exists(path) and os.path.samefile(source, path):
        return "link"  # already (and rename() of one link onto another of the same file does nothing)
    tmp = _temp_name(path)
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as src:
            _seen[label] = _seen.get(label, 1) - 1  # atomic_write counts this write again
            atomic_write(path, lambda f: shutil.copyfileobj(src, f, 1 << 24), label)
        return "copy"
    try:
        _replace(tmp, path, label)
    except BaseException as exc:
        _discard(tmp, exc, f"while pointing {path} at {source}")
        raise
    return "link"


def remove(path: str) -> None:
    """Delete ``path`` if it exists (durably: the folder is fsynced)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete the temporaries that killed writers left in ``directory``; returns their names."""
    removed = []
    for name in sorted(os.listdir(directory)):
        if _TEMP_RE.match(name):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    if removed:
        fsync_dir(directory)
    return removed


# -- JSON lines ---------------------------------------------------------------------------------------------

def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file ([] if it does not exist). A last line cut short by a kill is dropped; a
    bad line elsewhere is an error naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            if number == len(lines):  # no newline after it: the write was cut short
                warnings.warn(f"{path}: dropped its last line, cut short ({line[:60]!r}...)", stacklevel=2)
                continue
            raise ValueError(f"{path}, line {number}: not a JSON record ({exc})") from exc
    return records
