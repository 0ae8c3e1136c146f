"""One run per run_dir: rank 0 holds an exclusive lock on `<run_dir>/.lock` for its lifetime
(released by the kernel when the process ends, however it ends)."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class RunDirBusy(RuntimeError):
    """Another run holds the run_dir; the message names it (host, pid) and the fix."""


class RunDirLock:
    def __init__(self, run_dir):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"train.run_dir {str(self.path.parent)!r} is in use by another run ({holder}); stop "
                             "that run or choose another train.run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
