"""Temporary files that a killed writer cannot leak.

A big output (an exported model, the ADM evaluator's 9.8 GB ``samples_adm.npz``) is written under a
temporary name and renamed into place. With a name made unique by the process id, every preemption
leaves one more temporary file behind, since the requeued job has a new pid (and writers such as
safetensors' ``save_file`` make their own randomly named temporary files beside the target).

Instead every writer of ``<path>`` works in the one scratch folder ``<path>.tmp/`` and holds an
exclusive ``flock`` on its ``lock`` file while writing. The lock dies with its process, so the folder
of a killed writer is free: the next writer takes it over and first deletes what is in it. A live
writer makes the next one wait (``wait=True``) or fail (``TmpBusyError``) instead of writing into the
same files. On a file system without ``flock`` the folder gets a per-process name instead (a killed
writer then leaves it behind, as before) and a warning says so.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys


class TmpBusyError(RuntimeError):
    """Another live process is writing the same file."""


def _clear(folder: str) -> None:
    """Delete everything in ``folder`` but its lock file."""
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        if name == "lock":
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


class ClaimedTmp:
    """The scratch folder ``<path>.tmp/``, locked for this process and emptied; write ``self.tmp`` (or
    anything else inside ``self.dir``), then :meth:`commit` renames ``self.tmp`` to ``path``.
    :meth:`release` (also on leaving a ``with`` block) deletes the folder."""

    def __init__(self, path: str, wait: bool = True):
        self.path, self.dir, self._fd, self._released = path, path + ".tmp", None, False
        self.tmp = os.path.join(self.dir, os.path.basename(path))
        while self._fd is None:
            os.makedirs(self.dir, exist_ok=True)
            lock = os.path.join(self.dir, "lock")
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the folder was just released by its holder: make it again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise TmpBusyError(f"{self.dir} is in use by another live process writing {path} (it holds "
                                   f"{lock}): wait for it, or write elsewhere") from None
            except OSError as e:  # no flock on this file system
                os.close(fd)
                self.dir = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
                self.tmp = os.path.join(self.dir, os.path.basename(path))
                os.makedirs(self.dir, exist_ok=True)
                print(f"warning: cannot lock {lock} ({e}); writing in {self.dir} instead, which a killed process "
                      "leaves behind", file=sys.stderr)
                return
            # ours only if it is still the lock file at that name: the holder we waited for may have
            # released (deleted) the folder, and then nobody else would contend for this inode
            if self._holds(fd):
                self._fd = fd
                _clear(self.dir)  # a killed writer's leftovers
            else:
                os.close(fd)

    def _holds(self, fd: int) -> bool:
        try:
            st, mine = os.stat(os.path.join(self.dir, "lock")), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)
        self.release()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._fd is None:  # the per-process folder
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        # Empty the folder while locked; the lock file goes last, so a waiter (which then finds no lock file
        # of its own inode and starts over) never sees our files.
        _clear(self.dir)
        os.remove(os.path.join(self.dir, "lock"))
        try:
            os.rmdir(self.dir)
        except OSError:  # a newcomer already made its lock file in it: the folder is its now
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "ClaimedTmp":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
