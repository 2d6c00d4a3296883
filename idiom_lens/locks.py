"""One writer per results folder or cache entry: an advisory lock held for a run's lifetime.

Two `idiom-lens run --out results` at once would overwrite each other's stages and report, and
both would exit 0. So every command that writes into a folder (and `run_study`, `train_lens`)
holds `folder_lock(folder)` while it runs: an exclusive `flock` on `<folder>/.idiom-lens.lock`,
which records the holder's PID and command. A second process gets `FolderInUse` (an `InputError`:
the CLI prints one line naming the folder and the holder's PID, and exits 2).

The kernel drops a `flock` when its process dies, however it dies, so a lock is never stuck: a
lock file that can be locked but still names a PID was left by a process that died mid-run, and
the next run takes it over with one log line. A clean release deletes the file while still
holding it; a process that opened the deleted file notices (its inode is no longer the path's)
and opens the new one, so two processes never hold two files of one name.

Locks are per process and re-entrant: `run_study` inside a locked `idiom-lens run` does not lock
itself out. Ray workers write parts for their own driver, which holds the lock; they take none.
A cache entry that any process may need (the converted embedded model) is locked with `wait=True`:
a second process waits for the first to finish building it, then uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from idiom_lens.errors import InputError

LOCK_FILE = ".idiom-lens.lock"

_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth


class FolderInUse(InputError):
    """Another live process holds the lock of the folder this one wants to write."""


def _describe_holder(text: str) -> str:
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    pid = fields.get("pid", "?")
    command = fields.get("command", "")
    return f"PID {pid}" + (f" ({command})" if command else "")


@contextlib.contextmanager
def lock_file(path: str | Path, *, what: str, wait: bool = False,
              log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file `path` (created if missing) for the block.
    `what` names the locked thing in messages. When another live process holds it: raises
    `FolderInUse`, or with `wait` logs one line and waits for it."""
    path = Path(path).absolute()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, what, wait=wait, log=log)
    try:
        left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if left:
            log(f"taking over the lock of {what} left by {_describe_holder(left)}, which is no longer running")
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()}\ncommand={command}\n".encode(), 0)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
            path.unlink(missing_ok=True)  # still locked: a clean release leaves no file behind
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _acquire(path: Path, what: str, *, wait: bool, log: Callable[[str], None]) -> int:
    """An open descriptor of `path`, exclusively flocked, that is still the file at `path` (a
    holder that released meanwhile unlinked the one this process opened: then open the new one)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            if not wait:
                os.close(fd)
                raise FolderInUse(f"{what} is in use by another idiom-lens process, {_describe_holder(holder)}: "
                                  "wait for it to finish or write somewhere else") from None
            log(f"waiting for {what}: another idiom-lens process, {_describe_holder(holder)}, is writing it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def folder_lock(folder: str | Path, *, log: Callable[[str], None] = print) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of the folder `folder` (created if missing) for the block; see the module."""
    folder = Path(folder)
    return lock_file(folder / LOCK_FILE, what=f"the folder {folder}", log=log)
