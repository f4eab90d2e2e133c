"""Staged inputs: a merge's input tensors read from disk with O_DIRECT into one reused buffer, ahead of the chunks
that need them, where the file map would fault them in page by page.

Only the merge engine's own reads of a merged tensor's direct inputs see the staged bytes (composer.blocks passes
`staged=True`); every other read of the same input goes through the map, so a staged input's room is reused only
once every reader that can see it is done.

Why: on this project's machines (a virtual machine) the first read of a page the disk has just put in the page
cache is what a cold merge pays most for. A cold TIES of three 1.1B models spent 16.4 CPU-s (11.9 of them user
time in the loads of the first pass over fresh pages) where the same run over cached pages spent 7.8; `cat` of the
same files alone costs 1.6-5.9 s of system time. O_DIRECT reads the disk straight into pages we already hold:
6.6 GB in 3.8 s for 0.3 s of system time with three readers. The staged bytes are the file's bytes, so the merge
is the same bit for bit.

What is staged: each input that merged tensors read directly (a re-indexed vocabulary's or a computed stand-in's
reads, and a cast's, go through the map), of STAGE_MIN bytes to a quarter of the buffer, whose pages are not
already mostly in the page cache when its turn comes (a warm input is read through the map, as before: re-reading
it from disk would be slower). Readers go through the plan in output order and wait for room in the buffer; a
merged tensor that wants an input not yet being read reads it through the map instead, and the readers skip it.
An input's room is given back when every merged tensor that reads it has been served. Where O_DIRECT, the
cachestat system call (Linux 6.5) or the buffer is unavailable, nothing is staged. COMPOSER_NO_STAGE=1 turns it off.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
import threading
from collections import deque
from pathlib import Path

from composer.sources import TensorInfo

DIRECT = True  # O_DIRECT reads (tests turn it off to run the same logic on a filesystem without it)
CHECK_CACHE = True  # read cached inputs through the map (tests turn it off: their inputs are always cached)
STAGE_BYTES = 256 * 2**20  # the buffer: 3-4 layers' MLP inputs of three 1.1B models ahead of the workers
STAGE_SHARE = 4  # an input larger than the buffer / this (a 1.1B model's 131 MB embedding) is read through the map
STAGE_MIN = 2**20  # smaller ones cost little through the map and would cost a request each
READERS = 2  # requests in flight: the disk here reads 1.5 GB/s with one, 1.7 GB/s with three
ALIGN = 4096  # O_DIRECT's file offset, length and address alignment (any logical block size up to a page)
RESIDENT = 0.5  # an input with at least this share of its pages cached is read through the map

PENDING, READING, READY, SKIPPED = range(4)


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_CACHESTAT = {"x86_64": 451, "aarch64": 451}.get(platform.machine())  # the same number in both syscall tables
_libc = None


def cached_share(fd: int, offset: int, length: int) -> float | None:
    """The share of the pages of bytes [offset, offset + length) of a file that are in the page cache (cachestat,
    Linux 6.5+), or None where the kernel cannot say."""
    global _libc
    if _CACHESTAT is None or not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    rng, st = _CacheRange(offset, length), _CacheStat()
    if _libc.syscall(ctypes.c_long(_CACHESTAT), ctypes.c_int(fd), ctypes.byref(rng), ctypes.byref(st),
                     ctypes.c_uint(0)) != 0:
        return None
    pages = -(-(offset % mmap.PAGESIZE + length) // mmap.PAGESIZE)
    return st.nr_cache / max(1, pages)


class _Slot:
    """One staged input: its bytes [lo, lo + size) of `file` go to the buffer at `start`; the tensor's own bytes
    begin `delta` after it."""

    __slots__ = ("key", "file", "offset", "nbytes", "lo", "size", "delta", "state", "ready", "start", "users")

    def __init__(self, info: TensorInfo) -> None:
        self.key, self.file, self.offset, self.nbytes = (info.file, info.offset), info.file, info.offset, info.nbytes
        self.lo = info.offset - info.offset % ALIGN
        self.size = -(-(info.offset + info.nbytes - self.lo) // ALIGN) * ALIGN
        self.delta = info.offset - self.lo
        self.state, self.ready, self.start, self.users = PENDING, threading.Event(), -1, 0


def stageable(plan, budget: int | None = None) -> dict[tuple[Path, int], _Slot]:
    """The inputs that may be staged, in the order the output needs them, each with the number of merged tensors
    that read it."""
    largest = (STAGE_BYTES if budget is None else budget) // STAGE_SHARE
    slots: dict[tuple[Path, int], _Slot] = {}
    for shard in plan.shards:
        for entry in shard.entries:
            t = entry.tensor
            if not t.is_merge:
                continue
            for info in t.inputs:
                if type(info) is not TensorInfo or info.file is None:
                    continue
                if not STAGE_MIN <= info.nbytes <= largest:
                    continue
                slot = slots.setdefault((info.file, info.offset), _Slot(info))
                slot.users += 1
    return slots


class Stager:
    """Reads the plan's stageable inputs into one buffer ahead of the workers (see the module's docstring)."""

    def __init__(self, plan, budget: int | None = None, direct: bool | None = None,
                 check_cache: bool | None = None) -> None:
        self._budget = STAGE_BYTES if budget is None else budget
        self._slots = stageable(plan, self._budget)
        self._order = list(self._slots.values())
        self._by_tensor = {t.name: [self._slots[(i.file, i.offset)] for i in t.inputs
                                    if type(i) is TensorInfo and (i.file, i.offset) in self._slots]
                           for t in plan.tensors if t.is_merge}
        first, room = set(), self._budget  # what the readers put in the empty buffer, before the workers start
        for key, slot in self._slots.items():
            if slot.size > room:
                break
            first.add(key)
            room -= slot.size
        self._first = first
        self._direct = DIRECT if direct is None else direct
        self._check = CHECK_CACHE if check_cache is None else check_cache
        self._cond = threading.Condition()
        self._ring: deque[list] = deque()  # [start, end, released] in the order the room was taken
        self._next = 0
        self._staged = 0  # inputs read into the buffer so far
        self._stop = False
        self._fds: dict[Path, int] = {}
        self._buffer: mmap.mmap | None = None
        self._threads: list[threading.Thread] = []

    @property
    def active(self) -> bool:
        return bool(self._order)

    def start(self) -> None:
        if not self._order:
            return
        self._buffer = mmap.mmap(-1, self._budget, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._buffer.madvise(mmap.MADV_HUGEPAGE)
        for n in range(READERS):
            thread = threading.Thread(target=self._read_all, name=f"composer-stage-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop reading and wait for the readers (the buffer itself lives while a tensor views it)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        for fd in self._fds.values():
            if fd >= 0:
                os.close(fd)
        self._fds.clear()

    def counts(self) -> dict[str, int]:
        """How many inputs are pending, being read, in the buffer now, and read through the map (or done with),
        and how many were read into the buffer in all ("staged")."""
        with self._cond:
            states = [slot.state for slot in self._order]
            staged = self._staged
        return {"staged": staged, **{name: states.count(state) for name, state in
                (("pending", PENDING), ("reading", READING), ("ready", READY), ("skipped", SKIPPED))}}

    def held(self) -> int:
        """Rooms of the buffer not given back yet."""
        with self._cond:
            return sum(not room[2] for room in self._ring)

    def _slot(self, info) -> _Slot | None:
        """The slot of a source tensor (any stand-in: None)."""
        return self._slots.get((getattr(info, "file", None), getattr(info, "offset", None)))

    def claim(self, info) -> bool:
        """Whether the early read (composer.reading.read_ahead, while torch imports) should read `info` into the
        page cache: any input the stager does not stage, and a stageable one past the buffer's first fill, which
        the readers then leave to the map (the disk would otherwise idle until the workers free room)."""
        slot = self._slot(info)
        if slot is None:
            return True
        with self._cond:
            if slot.state == PENDING and slot.key not in self._first:
                slot.state = SKIPPED
                self._cond.notify_all()
            return slot.state == SKIPPED

    def planned(self, info) -> bool:
        """Whether `info` is an input the readers will read or have read (the kernel's read-ahead is not asked
        for it)."""
        slot = self._slot(info)
        return slot is not None and slot.state in (PENDING, READING, READY)

    def view(self, info: TensorInfo) -> tuple[mmap.mmap, int] | None:
        """(buffer, byte offset of the tensor's first element) once `info` is staged; None where it is read through
        the map: not staged, given up, or not yet started (then never: its readers skip it)."""
        slot = self._slot(info)
        if slot is None:
            return None
        with self._cond:
            if slot.state == PENDING:
                slot.state = SKIPPED
                self._cond.notify_all()  # a reader waiting for room for it moves on
                return None
            if slot.state == SKIPPED:
                return None
        slot.ready.wait()
        return (self._buffer, slot.start + slot.delta) if slot.state == READY else None

    def served(self, name: str) -> None:
        """A merged tensor has been written whole: the room of inputs no other merged tensor still reads is free."""
        with self._cond:
            for slot in self._by_tensor.get(name, ()):
                slot.users -= 1
                if slot.users == 0 and slot.state == READY:
                    self._free(slot)
                elif slot.users == 0 and slot.state == PENDING:  # served without reading it: never read it
                    slot.state = SKIPPED
                    slot.ready.set()

    def _free(self, slot: _Slot) -> None:
        """Give a slot's room back (under the lock); the slot is read through the map from now on, should anything
        still ask for it."""
        slot.state = SKIPPED
        for room in self._ring:
            if room[0] == slot.start:
                room[2] = True
                break
        while self._ring and self._ring[0][2]:
            self._ring.popleft()
        self._cond.notify_all()

    def _room(self, size: int) -> int | None:
        if not self._ring:
            return 0 if size <= self._budget else None
        tail, head = self._ring[0][0], self._ring[-1][1]
        if self._ring[-1][0] >= tail:  # not wrapped: after the newest, else from the start up to the oldest
            if head + size <= self._budget:
                return head
            return 0 if size <= tail else None
        return head if head + size <= tail else None

    def _fd(self, path: Path) -> int:
        """A descriptor for the readers, or -1 where the file cannot be opened so (O_DIRECT refused: tmpfs)."""
        with self._cond:
            fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if self._direct else 0))
            except OSError:
                fd = -1
            with self._cond:
                if path in self._fds:
                    if fd >= 0:
                        os.close(fd)
                else:
                    self._fds[path] = fd
                fd = self._fds[path]
        return fd

    def _read_all(self) -> None:
        """One reader: the next pending input, in the output's order, until none is left or the run stops. Only a
        hint: any failure leaves the input (and, for an unexpected one, the rest of this reader's share) to the
        map, and never a waiting worker."""
        while (slot := self._take()) is not None:
            try:
                if not self._stage(slot):
                    return
            except BaseException:  # noqa: BLE001 - staging is an optimisation: the map reads what is left
                with self._cond:
                    if slot.state == READING:
                        self._free(slot)
                    slot.state = SKIPPED
                slot.ready.set()
                return

    def _take(self) -> _Slot | None:
        with self._cond:
            while self._next < len(self._order) and self._order[self._next].state != PENDING:
                self._next += 1
            if self._stop or self._next == len(self._order):
                return None
            self._next += 1
            return self._order[self._next - 1]

    def _stage(self, slot: _Slot) -> bool:
        """Read one input into the buffer once there is room; False once the run stops."""
        fd = self._fd(slot.file)
        share = cached_share(fd, slot.offset, slot.nbytes) if fd >= 0 and self._check else 0.0
        if fd < 0 or share is None or share >= RESIDENT:
            self._give_up(slot)  # read through the map: already cached (or the kernel cannot say)
            return True
        with self._cond:
            while not self._stop and slot.state == PENDING and (start := self._room(slot.size)) is None:
                self._cond.wait()
            if self._stop or slot.state != PENDING:  # stopped, or a worker read it through the map meanwhile
                if slot.state == PENDING:
                    slot.state = SKIPPED
                slot.ready.set()
                return not self._stop
            slot.start, slot.state = start, READING
            self._ring.append([start, start + slot.size, False])
        ok = self._read(fd, slot)
        with self._cond:
            slot.state = READY if ok else SKIPPED
            self._staged += ok
            if not ok or slot.users == 0:
                self._free(slot)
        slot.ready.set()
        return True

    def _give_up(self, slot: _Slot) -> None:
        with self._cond:
            if slot.state == PENDING:
                slot.state = SKIPPED
        slot.ready.set()

    def _read(self, fd: int, slot: _Slot) -> bool:
        """Read the slot's bytes into its room; False on an error or a short file (the map then reads it, and
        reports what is wrong)."""
        view = memoryview(self._buffer)[slot.start: slot.start + slot.size]
        need = slot.delta + slot.nbytes
        done = 0
        try:
            while done < need:
                got = os.preadv(fd, [view[done:]], slot.lo + done)
                if got <= 0:
                    return False
                done += got
        except OSError:
            return False
        finally:
            view.release()
        return True


def enabled() -> bool:
    return not os.environ.get("COMPOSER_NO_STAGE") and (not DIRECT or hasattr(os, "O_DIRECT"))


def make_stager(plan) -> Stager | None:
    """A Stager for a plan with inputs to stage, where O_DIRECT exists and COMPOSER_NO_STAGE is not set."""
    if not enabled():
        return None
    stager = Stager(plan)
    return stager if stager.active else None


def buffer_bytes(plan) -> int:
    """The memory staging takes for a plan: its buffer, where anything is staged."""
    return STAGE_BYTES if enabled() and plan.computes and stageable(plan) else 0
