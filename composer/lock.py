"""The destination lock: one run at a time writes a given output folder."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from composer.errors import OutputError

LOCK = ".composer-lock"  # `.OUT.composer-lock` beside the destination: held while a run writes it


def check_unlocked(out: Path) -> None:
    """Refuse a destination another run holds (see locked) before any work: a probe, the lock is taken later."""
    try:
        fd = os.open(out.parent / f".{out.name}{LOCK}", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return  # no lock file: nobody is writing it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _held(fd, out) from None
    finally:
        os.close(fd)


def _held(fd: int, out: Path) -> OutputError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    return OutputError(f"another compose run (pid {holder}) is writing {out}: wait for it to finish, or choose "
                       "another folder")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the lock of destination `out` (an flock on `.OUT.composer-lock` beside it), so that a second run to
    the same destination is refused while one is writing it. The lock goes with the process, however it ends;
    the file is removed while still held, and a run that opened it just before sees a removed file and tries
    again, so two runs never both hold a lock for one destination."""
    path = out.parent / f".{out.name}{LOCK}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _held(fd, out)
            os.close(fd)
            raise error from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the refusal's message; a full disk may refuse it
        except OSError:
            pass
        yield
    finally:
        os.unlink(path)
        os.close(fd)
