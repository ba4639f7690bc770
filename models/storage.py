"""Files that several processes or a crash may touch: the cache root, atomic writes, folder locks and
append-only JSON-lines logs. At the bottom of the import graph: it imports nothing of the project."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """Where generated data, pretrained bases and heads are cached ($TRAP2_DATA, default ./data)."""
    return Path(os.environ.get("TRAP2_DATA", Path(__file__).resolve().parent.parent / "data"))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling to write (a file or a folder) that replaces `path` only once the block ends
    without error, so a crash never leaves a half-written result; per process, as parallel runs may build
    the same cache entry."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


LOCK_FILE = ".lock"


class FolderBusy(OSError):
    """Another live process writes this folder."""


class FolderLock:
    """An exclusive lock on a run or sweep folder, held until `release()` or the process ends (the kernel
    drops it on a crash, so a stale lock never blocks a rerun). A second writer fails at once, naming the
    process that holds it. `release()` removes the lock file, so a finished folder holds none."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise FolderBusy(f"{folder} is being written by another process (pid {holder}); wait for it to finish "
                             f"or stop it, or use another output folder") from None
        try:
            same_file = os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # its holder released and removed it as we opened it: the folder was busy
            os.close(self.fd)
            raise FolderBusy(f"{folder} was just being written by another process; run again")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody can lock a file on its way out
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def read_jsonl(path: Path) -> list[dict]:
    """The complete records of a log; a line cut by a crash is skipped (its point is simply redone)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def append_jsonl(path: Path, record: dict) -> None:
    """Appends one record in a single write, under an exclusive lock on the file; a torn last line (a crash
    mid-write) is cut off first, so the new record never glues onto it."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
            cut = tail.rfind(b"\n")
            os.ftruncate(fd, size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
