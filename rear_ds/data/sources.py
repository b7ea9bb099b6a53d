"""Tokenization inputs: an ImageNet-style folder, or existing WebDataset image shards.

A source is listed once, up front, into a sorted list of :class:`InputItem` (cheap: file names and
tar offsets only, no decoding). Every item has a stable string id (``src``), a class index, and a
way to fetch its bytes (:func:`read_bytes`) that works in any worker process.

Tar members are only ever read into memory; nothing from a tar is written to disk, so member
names such as ``../evil`` or ``/abs`` cannot escape anywhere.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import stat
import sys
import tarfile
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


class InputError(ValueError):
    """The input path or class-index file is unusable (raised before any work starts)."""


class TransientReadError(RuntimeError):
    """Reading an input failed with an error that may go away (EIO, ESTALE, a timeout) on every attempt."""


@dataclass(frozen=True)
class InputItem:
    src: str  # stable id: path relative to the folder, or "<shard>.tar:<key>"
    label: int  # class index; -1 when the sample has no usable label
    path: str  # file on disk (the image, or the tar holding it)
    offset: int = -1  # byte offset of the member data inside the tar (-1 = whole file)
    size: int = -1
    problem: str = ""  # non-empty: known bad before decoding (e.g. "no cls member")


@dataclass
class SourceListing:
    kind: str  # "folder" or "wds"
    path: str
    items: list
    classes: list  # class names in index order (folder names; [] for wds)
    empty_classes: list = field(default_factory=list)
    class_index_file: str = ""

    def fingerprint(self) -> str:
        """sha256 over (src, label) of all items: changes when the input set changes."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.src}\t{it.label}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "num_inputs": len(self.items),
                "num_classes": len(self.classes), "class_index_file": self.class_index_file,
                "listing_sha256": self.fingerprint()}


# Errors that say the file itself is bad: rereading cannot help, so the input is skipped and listed.
# Any other OSError (EIO, ESTALE, ETIMEDOUT, EAGAIN, ENOMEM, EMFILE ...) may be a passing fault of the disk
# or the network file system: it is retried, and if it persists the job stops instead of losing the input.
PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
                    errno.ENAMETOOLONG, errno.EINVAL, errno.ENXIO, errno.ENODEV, errno.EFBIG, errno.EOVERFLOW}
READ_ATTEMPTS = 4
RETRY_WAIT_S = 1.0  # before the 2nd attempt; doubled each time (1 + 2 + 4 s in all)


def _read_once(item: InputItem) -> bytes:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses anything but a regular file
    fd = os.open(item.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"not a regular file ({_file_kind(st.st_mode)})")
        if item.offset >= 0:  # a tar member: never more than the file holds, whatever its header claims
            f.seek(item.offset)
            return f.read(max(0, min(item.size, st.st_size - item.offset)))
        return f.read()


def read_bytes(item: InputItem, attempts: int = READ_ATTEMPTS, wait: Callable = time.sleep) -> bytes:
    """The raw bytes of one input (used inside decode workers).

    Raises ValueError when the input itself is unreadable (missing, no permission, not a regular file:
    skip it) and TransientReadError when another OS error persisted over ``attempts`` reads, ``wait(s)``
    apart (1, 2, 4 s): the caller must not treat that input as bad."""
    for attempt in range(attempts):
        try:
            return _read_once(item)
        except OSError as e:
            if e.errno in PERMANENT_ERRNOS:
                raise ValueError(f"unreadable: {e.strerror or e}") from None
            if attempt + 1 == attempts:
                raise TransientReadError(f"{item.path}: {e} (errno {errno.errorcode.get(e.errno, e.errno)}, "
                                         f"{attempts} attempts)") from None
            print(f"warning: reading {item.path} failed ({e}); retrying", file=sys.stderr, flush=True)
            wait(RETRY_WAIT_S * 2 ** attempt)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))
    return next((name for test, name in kinds if test(mode)), "special file")


def walk_files(top: str, rel_to: str) -> tuple:
    """Files under ``top``, recursively, following symbolic links, each file and folder once.

    Returns ``(files, problems)``: sorted paths, and ``(path, reason)`` for what is not listed: a link
    to a folder already reached (a symlink loop such as ``cls/loop -> .`` would otherwise list every file
    again under new names, and two such links would never finish), a second path to a file (a symbolic
    or hard link: the first in walk order is kept), a broken link, anything that is not a regular file
    (a FIFO would block its reader), a folder that cannot be listed. Hidden entries (``.*``) are ignored;
    paths in messages are relative to ``rel_to``. Costs no system call per plain file (d_type, d_ino).
    """
    rel = lambda p: os.path.relpath(p, rel_to)  # noqa: E731
    st = os.stat(top)
    folders = {(st.st_dev, st.st_ino): top}  # (st_dev, st_ino) -> path, for the few folders
    files, devs, inos, problems = [], array("Q"), array("Q"), []  # files: 16 bytes each for the duplicate check
    stack = [(top, st.st_dev)]
    while stack:
        folder, dev = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            if e.errno not in PERMANENT_ERRNOS:
                raise InputError(f"cannot list folder {folder!r}: {e}") from None
            problems.append((folder, f"folder cannot be listed: {e.strerror}"))
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_symlink() or e.is_dir(follow_symlinks=False):  # a link's target; a mount point's device
                    st = os.stat(e.path)
                    key, mode = (st.st_dev, st.st_ino), st.st_mode
                else:
                    key = (dev, e.inode())
                    mode = stat.S_IFREG if e.is_file(follow_symlinks=False) else e.stat(follow_symlinks=False).st_mode
            except OSError as err:
                if err.errno not in PERMANENT_ERRNOS:
                    raise InputError(f"cannot list {e.path!r}: {err}") from None
                problems.append((e.path, "broken symbolic link" if err.errno == errno.ENOENT else
                                 f"unusable: {err.strerror}"))
                continue
            if stat.S_ISDIR(mode):
                if key in folders:
                    problems.append((e.path, f"link to the folder {rel(folders[key])!r}, already listed: not followed"))
                else:
                    folders[key] = e.path
                    subdirs.append((e.path, key[0]))
            elif stat.S_ISREG(mode):
                files.append(e.path)
                devs.append(key[0])
                inos.append(key[1])
            else:
                problems.append((e.path, f"not a regular file ({_file_kind(mode)})"))
        stack.extend(reversed(subdirs))
    if files:  # one file reached by two paths: keep the first
        keys = np.stack([np.frombuffer(devs, dtype=np.uint64), np.frombuffer(inos, dtype=np.uint64)], axis=1)
        _, first_index, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        first = first_index[inverse.reshape(-1)]
        keep = first == np.arange(len(files))
        for i in np.flatnonzero(~keep):
            problems.append((files[i], f"the same file as {rel(files[first[i]])!r} (a link): listed once"))
        files = [f for f, k in zip(files, keep) if k]
    return sorted(files), problems


# ----------------------------------------------------------------------------------------------
# ImageNet-style folder
# ----------------------------------------------------------------------------------------------


def load_class_index(path: str) -> dict:
    """Class-index file -> {folder name: index}.

    Accepted: JSON ``{"n01440764": 0, ...}`` or ``["n01440764", ...]``; or text with one class per
    line whose first word is the folder name (index = line number), e.g. LOC_synset_mapping.txt.
    """
    if not os.path.isfile(path):
        raise InputError(f"class-index file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        data = json.loads(text)
        if isinstance(data, list):
            return {str(name): i for i, name in enumerate(data)}
        if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
            return {str(k): int(v) for k, v in data.items()}
        raise InputError(f"class-index file {path!r}: expected a JSON list of names or a "
                         "{name: index} mapping")
    names = [line.split()[0] for line in text.splitlines() if line.strip()]
    return {name: i for i, name in enumerate(names)}


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def list_folder(root: str, class_index_file: str = "") -> SourceListing:
    """ImageNet-style ``root/<class>/**/<file>``; class index = sorted folder order (ImageFolder).

    Every regular file is listed (not only image extensions): a non-image file is bad input that
    must be reported, not silently ignored. Hidden files (``.*``) are ignored.
    """
    if not os.path.isdir(root):
        raise InputError(f"input folder {root!r} does not exist or is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise InputError(f"input folder {root!r} has no class sub-folders (expected {root}/<class>/<images>)")
    index = {c: i for i, c in enumerate(classes)}
    if class_index_file:
        index = load_class_index(class_index_file)
        missing = [c for c in classes if c not in index]
        if missing:
            raise InputError(f"class-index file {class_index_file!r} has no entry for folder(s) "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''} of {root!r}")
    files, problems = walk_files(root, root)  # one walk: a file or folder linked from two classes counts once
    by_class: dict = {c: ([], []) for c in classes}
    for p in files:
        by_class.get(_rel(p, root).split("/")[0], ([], []))[0].append(p)  # files directly in root: no class
    for p, why in problems:
        by_class.get(_rel(p, root).split("/")[0], ([], []))[1].append((p, why))
    items, empty = [], []
    for cls in classes:
        good, bad = by_class[cls]
        if not good:
            empty.append(cls)
        items += [InputItem(src=_rel(p, root), label=index[cls], path=p) for p in good]
        items += [InputItem(src=_rel(p, root), label=index[cls], path=p, problem=why) for p, why in bad]
    if class_index_file:  # classes in index order, for the manifest
        classes = [name for name, _ in sorted(index.items(), key=lambda kv: kv[1])]
    return SourceListing("folder", root, items, classes, empty, class_index_file)


# ----------------------------------------------------------------------------------------------
# WebDataset image shards (jpg/png + cls)
# ----------------------------------------------------------------------------------------------


def _expand_shards(spec: str) -> list:
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        import braceexpand

        paths = [p for pat in braceexpand.braceexpand(spec) for p in sorted(glob.glob(pat))]
    if not paths:
        raise InputError(f"no .tar shards found at {spec!r} (a folder of .tar files or a brace pattern)")
    return paths


def _split_key(name: str) -> tuple:
    """WebDataset convention: key = path up to the first dot of the basename; ext = the rest."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def list_wds(spec: str) -> SourceListing:
    """Scan tar headers (data is skipped with seeks) and group members into samples."""
    items = []
    for path in _expand_shards(spec):
        name = os.path.basename(path)
        try:
            with tarfile.open(path, mode="r:") as tf:
                groups: dict = {}
                order = []
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext] = m
                for key in order:
                    g = groups[key]
                    items.append(_wds_item(tf, path, f"{name}:{key}", g))
        except (tarfile.TarError, OSError) as e:
            raise InputError(f"input shard {path!r} is not a readable tar file: {e}") from None
    return SourceListing("wds", spec, items, classes=[])


def _wds_item(tf: tarfile.TarFile, path: str, src: str, members: dict) -> InputItem:
    img = next((members[e] for e in IMAGE_EXTS if e in members), None)
    label, problem = -1, ""
    if "cls" not in members:
        problem = "no cls member"
    else:
        try:
            label = int(tf.extractfile(members["cls"]).read().decode().strip())
        except (ValueError, UnicodeDecodeError):
            problem = "cls member is not an integer"
    if img is None:
        problem = problem or f"no image member (expected one of {', '.join(IMAGE_EXTS)})"
        return InputItem(src, label, path, problem=problem)
    return InputItem(src, label, path, offset=img.offset_data, size=img.size, problem=problem)


def list_source(path: str, class_index_file: str = "", kind: Optional[str] = None) -> SourceListing:
    """Folder -> ImageNet-style folder, unless it only holds .tar files; else a shard pattern."""
    if kind is None:
        if os.path.isdir(path):
            has_dirs = any(e.is_dir() for e in os.scandir(path))
            kind = "folder" if has_dirs or not glob.glob(os.path.join(path, "*.tar")) else "wds"
        elif os.path.exists(path) or "{" in path or "*" in path:
            kind = "wds"
        else:
            raise InputError(f"input {path!r} does not exist (expected an ImageNet-style folder, "
                             "a folder of .tar shards or a brace pattern of .tar files)")
    if kind == "folder":
        return list_folder(path, class_index_file)
    if class_index_file:
        raise InputError("--class-index applies to folder inputs only (WebDataset shards carry 'cls')")
    return list_wds(path)
