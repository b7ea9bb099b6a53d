"""Reading ``.npz`` files that may come from elsewhere without running pickled code; writing them atomically.

``np.load(..., allow_pickle=False)`` refuses object arrays (the only way an .npz can carry a pickle);
this wrapper turns numpy's errors into messages that name the file and the key.
"""
from __future__ import annotations

import contextlib
import os
import zipfile

import numpy as np

from rear_ds.tmpfile import ClaimedTmp


class NpzError(ValueError):
    """An .npz file is missing, unreadable, unsafe (pickled objects) or lacks a key."""


def array_header(zf: zipfile.ZipFile, key: str) -> tuple:
    """(shape, dtype, data bytes the member holds) of ``key`` in an open .npz, from its header only."""
    info = zf.getinfo(key + ".npy")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return shape, dtype, info.file_size - f.tell()


def load_npz(path: str, what: str = "npz file", keys: tuple = None) -> dict:
    """Read every array (or only ``keys``) of ``path`` into memory; object arrays are refused unread.

    Returns ``{key: np.ndarray}``. Raises :class:`NpzError` naming the file (and key) on any problem,
    among them a file that is not a zip (a .npy under an .npz name) and a header whose shape claims more
    bytes than the member holds (numpy would try to allocate them first).
    """
    if not os.path.isfile(path):
        raise NpzError(f"{what} {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # what np.load looks at to choose .npz over .npy
                raise NpzError(f"{what} {path!r} is not an .npz file (not a zip archive)")
        with zipfile.ZipFile(path) as zf, np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            wanted = names if keys is None else list(keys)
            missing = [k for k in wanted if k not in names]
            if missing:
                raise NpzError(f"{what} {path!r} lacks the key(s) {missing} (it has {names})")
            out = {}
            for k in wanted:
                shape, dtype, held = array_header(zf, k)
                claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if not dtype.hasobject and claimed > held:
                    raise NpzError(f"{what} {path!r}: key {k!r} claims shape {shape} of {dtype} ({claimed} bytes) "
                                   f"but holds {held} bytes")
                try:
                    out[k] = data[k]
                except ValueError as e:
                    if "pickle" in str(e).lower():
                        raise NpzError(f"{what} {path!r} was refused: key {k!r} holds pickled Python objects, "
                                       f"which are never loaded (only plain numeric/string arrays are "
                                       f"accepted)") from None
                    raise NpzError(f"{what} {path!r}: cannot read key {k!r}: {e}") from None
            return out
    except NpzError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, MemoryError) as e:
        raise NpzError(f"{what} {path!r} is not a readable .npz file: {type(e).__name__}: {e}") from None


def npz_keys(path: str, what: str = "npz file") -> list:
    """The array names stored in ``path`` (reads only the zip directory)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError) as e:
        raise NpzError(f"{what} {path!r} is not a readable .npz file: {e}") from None


def write_npz_atomic(path: str, **arrays) -> None:
    """``np.savez`` into the locked scratch folder ``<path>.tmp/`` (:mod:`rear_ds.tmpfile`), fsync, rename:
    readers see the whole file or none. A second live writer of the same file (two array tasks on one chunk
    after a requeue) waits for the first instead of deleting its temporary file; a killed writer's leftover
    is taken over by the next one. An OS error (a full disk) names the file; nothing is left behind."""
    with naming_os_errors(path), ClaimedTmp(path) as claim:
        with open(claim.tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        claim.commit()


@contextlib.contextmanager
def naming_os_errors(path: str):
    """Re-raise an OSError inside as one that names ``path`` (a failed write() of a full disk names no file)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
