"""Reading ``.npz`` files that may come from elsewhere without running pickled code.

``np.load(..., allow_pickle=False)`` refuses object arrays (the only way an .npz can carry a pickle);
this wrapper turns numpy's errors into messages that name the file and the key.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np


class NpzError(ValueError):
    """An .npz file is missing, unreadable, unsafe (pickled objects) or lacks a key."""


def load_npz(path: str, what: str = "npz file", keys: tuple = None) -> dict:
    """Read every array (or only ``keys``) of ``path`` into memory; object arrays are refused unread.

    Returns ``{key: np.ndarray}``. Raises :class:`NpzError` naming the file (and key) on any problem.
    """
    if not os.path.isfile(path):
        raise NpzError(f"{what} {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            wanted = names if keys is None else list(keys)
            missing = [k for k in wanted if k not in names]
            if missing:
                raise NpzError(f"{what} {path!r} lacks the key(s) {missing} (it has {names})")
            out = {}
            for k in wanted:
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
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise NpzError(f"{what} {path!r} is not a readable .npz file: {e}") from None


def npz_keys(path: str, what: str = "npz file") -> list:
    """The array names stored in ``path`` (reads only the zip directory)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError) as e:
        raise NpzError(f"{what} {path!r} is not a readable .npz file: {e}") from None
