"""Checks on the files of a model folder before they are read: regular files (not a FIFO that blocks, a folder, a
device), inside the folder, of a sane size, JSON without duplicate keys, and each file's identity for noticing
later that it changed."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from composer.errors import CorruptFileError, SourceError

MAX_SIDE_FILE = 100 * 1024 * 1024  # an index or config.json; a real one is at most a few MB


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def not_regular(mode: int) -> str | None:
    """What a file that is not a regular file is ("a FIFO"), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def is_regular(path: Path) -> bool:
    """Whether `path` is a regular file (following links); False when it does not exist. Something else in its
    place (a FIFO, which would block the first read forever, a folder, a device) is refused by name."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror}: check its permissions") from None
    what = not_regular(mode)
    if what:
        raise SourceError(f"{path} is {what}, not a file: put the file itself there")
    return True


def check_inside(folder: Path, file: Path) -> None:
    """Refuse a file that resolves outside its model folder (a symlink out of it, or a path with '..'). A Hub
    cache snapshot's files are links into the repo's blobs folder, which is where they belong."""
    real, home = file.resolve(), folder.resolve()
    allowed = [home]
    if home.parent.name == "snapshots":
        allowed.append(home.parent.parent / "blobs")
    if not any(real == a or a in real.parents for a in allowed):
        raise SourceError(f"{file} resolves to {real}, outside the model folder {folder}: composer reads only "
                          "files inside it; copy the file into the folder")


def read_small(path: Path) -> str:
    """The text of a JSON side file (index, config), refused past MAX_SIDE_FILE bytes: its size comes from the
    model folder, and a real one is at most a few MB."""
    size = path.stat().st_size
    if size > MAX_SIDE_FILE:
        raise CorruptFileError(f"{path} is {size} bytes, more than the {MAX_SIDE_FILE} composer reads for such a file: "
                               "it is not a real one; re-download it")
    return path.read_text()


class DuplicateKey(ValueError):
    pass


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: json.loads keeps the last of two entries of one tensor, silently."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def file_stamp(st: os.stat_result) -> tuple[int, ...]:
    """What identifies one version of a file without reading it: device, inode, size, modification and change
    times. Writing in place, truncating or replacing the file changes it."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def stamps_of(files: tuple[Path, ...]) -> dict[Path, tuple[int, ...]]:
    return {f: file_stamp(os.stat(f)) for f in files}
