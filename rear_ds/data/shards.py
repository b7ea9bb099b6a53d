"""The token shard format (plain WebDataset .tar) and its manifest.

One sample per view of one image, four members named ``<key>.<ext>``:

    <key>.tokens.npy  uint16 array of the tokenizer's token_shape, written by np.save: the grid (h, w) in raster
                      order, or (N,) for a tokenizer with prefix tokens (AliTok: 17 prefix + 16x16 = (273,))
    <key>.cls         class index as decimal text
    <key>.view        view id as decimal text (index into manifest["preprocessing"]["view_names"])
    <key>.src         the source image's id as text (relative path, or "<input shard>:<key>")

Keys are ``<image index, 9 digits>_<view>`` (letters, digits, ``_`` and ``-`` only). Tars are written
deterministically (USTAR, mtime/uid/gid 0, mode 0644) so reruns are byte-identical, and atomically
(``.tmp`` file, fsync, rename). Nothing is ever pickled: ``np.load(..., allow_pickle=False)``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import re
import tarfile
from typing import Iterator, Optional

import numpy as np

from rear_ds.config import TOKENIZER_FAMILIES, ConfigError, token_layout

FORMAT = "rear_ds.tokens/v1"
MANIFEST = "manifest.json"
PARTS_DIR = "_parts"  # per-rank manifests written during the job
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class ShardError(ValueError):
    """A shard or manifest is missing, corrupt or inconsistent."""


class ShardReadError(ShardError):
    """The operating system failed to read a shard (EIO, a network file system timeout): maybe transient."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(image_index: int, view: int) -> str:
    return f"{image_index:09d}_{view}"


def sample_bytes(num_tokens: int) -> int:
    """Exact tar bytes of one sample of ``num_tokens`` tokens (4 headers + padded data; src/cls/view are < 512 bytes)."""
    npy = 128 + 2 * num_tokens
    return 4 * 512 + -(-npy // 512) * 512 + 3 * 512


def write_json_atomic(path: str, data: dict, sort_keys: bool = True, default=None, indent: Optional[int] = 1) -> None:
    """Write JSON to a temporary name, fsync, rename: readers see the old file or the new one, never half.
    ``default`` is json.dump's hook for values JSON has no type for; ``indent=None`` writes one line (and
    the file ends with a newline either way, so a JSON-lines file can start with it)."""
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"  # unique across hosts on a shared filesystem
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent, sort_keys=sort_keys, default=default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


class _HashingFile:
    """File wrapper for tarfile: hashes and counts bytes as they are written."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n


class ShardWriter:
    """Write one shard to ``<path>.tmp``; :meth:`commit` fsyncs and renames it into place."""

    def __init__(self, path: str):
        self.path, self.tmp = path, path + ".tmp"
        self._f = open(self.tmp, "wb")
        self._hf = _HashingFile(self._f)
        self._tar = tarfile.open(fileobj=self._hf, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, tokens: np.ndarray, cls: int, view: int, src: str) -> None:
        if not _SAFE_KEY.match(key):
            raise ShardError(f"unsafe sample key {key!r}: only letters, digits, '_' and '-' are allowed")
        if tokens.dtype != np.uint16:
            raise ShardError(f"tokens for {key} have dtype {tokens.dtype}, expected uint16")
        buf = io.BytesIO()
        np.save(buf, tokens, allow_pickle=False)
        self._add(f"{key}.tokens.npy", buf.getvalue())
        self._add(f"{key}.cls", str(int(cls)).encode())
        self._add(f"{key}.view", str(int(view)).encode())
        self._add(f"{key}.src", src.encode("utf-8", "backslashreplace"))
        self.samples += 1

    def commit(self) -> dict:
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return {"name": os.path.basename(self.path), "samples": self.samples, "bytes": self._hf.n,
                "sha256": self._hf.h.hexdigest()}

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def decode_tokens(data: bytes, where: str) -> np.ndarray:
    """Bytes of a tokens.npy member -> uint16 array; ShardError (naming ``where``) if malformed."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # np.load raises many types for malformed input
        raise ShardError(f"{where}: tokens.npy is not a valid .npy array: {e}") from None
    if arr.dtype != np.uint16:
        raise ShardError(f"{where}: tokens.npy has dtype {arr.dtype}, expected uint16")
    return arr


def iter_shard(path: str, start: int = 0, limit: Optional[int] = None) -> Iterator[dict]:
    """Samples of one token shard, from sample ``start`` on (earlier ones skipped via tar headers).

    Yields ``{"key", "tokens" (uint16 grid), "cls", "view", "src"}``. Members are read into memory
    only. Raises ShardError (naming the shard and key) on truncated/corrupt data or missing members.
    """
    name = os.path.basename(path)
    wanted = ("tokens.npy", "cls", "view", "src")
    try:
        with tarfile.open(path, mode="r:") as tf:
            key, members, index, emitted = None, {}, -1, 0

            def finish():
                where = f"shard {path} sample {key}"
                missing = [e for e in wanted if e not in members]
                if missing:
                    raise ShardError(f"{where}: missing member(s) {missing}")
                try:
                    cls = int(members["cls"].decode())
                    view = int(members["view"].decode())
                    src = members["src"].decode("utf-8", "replace")
                except ValueError as e:
                    raise ShardError(f"{where}: bad cls/view text: {e}") from None
                return {"key": key, "tokens": decode_tokens(members["tokens.npy"], where),
                        "cls": cls, "view": view, "src": src}

            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                k, _, ext = base.partition(".")
                if k != key:
                    if key is not None and index >= start:
                        yield finish()
                        emitted += 1
                        if limit is not None and emitted >= limit:
                            return
                    key, members, index = k, {}, index + 1
                if index >= start and ext in wanted:
                    members[ext] = tf.extractfile(m).read()
                tf.members = []  # TarFile keeps every header it read: unbounded memory on big shards
            if key is not None and index >= start and (limit is None or emitted < limit):
                yield finish()
    except OSError as e:
        raise ShardReadError(f"shard {path} could not be read ({name}): {e}") from None
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"shard {path} is corrupt or truncated ({name}): {e}") from None


def load_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise ShardError(f"no {MANIFEST} in {folder!r}: the token shards need their manifest "
                         "(run `python data_prep/tokenize.py ... --finalize` to write it)")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} is not readable JSON: {e}") from None
    if m.get("format") != FORMAT:
        raise ShardError(f"{path}: format={m.get('format')!r}, expected {FORMAT!r}")
    return m


def merge_counts(into: dict, counts: dict) -> dict:
    for k, v in counts.items():
        into[str(k)] = into.get(str(k), 0) + int(v)
    return into


def describe_tokenizer(manifest: dict) -> str:
    """"tokenizer alitok (17 prefix + 16x16 grid = 273 tokens, codebook 4096)", from a manifest."""
    tok = manifest.get("tokenizer") or {}
    grid = tok.get("grid") or manifest.get("grid")
    layout = token_layout(tok.get("prefix_tokens", 0), grid) if grid else f"{manifest.get('num_tokens')} tokens"
    return f"tokenizer {tok.get('name', '?')} ({layout}, codebook {manifest.get('codebook_size')})"


def check_manifest(manifest: dict, where: str, model_cfg=None, tokenizer_cfg=None) -> None:
    """Refuse token shards the given model / tokenizer config cannot use, before any compute, with a
    ConfigError that names the tokenizer the shards were made with. The trainer's preflight calls it with
    both configs, the reader with the model config. Older manifests lack ``family``/``prefix_tokens``: the
    family then follows from the tokenizer name and the prefix is 0."""
    tok = manifest.get("tokenizer") or {}
    made = f"token shards {where} (made with {describe_tokenizer(manifest)})"
    if tokenizer_cfg is not None:
        family = tok.get("family") or TOKENIZER_FAMILIES.get(tok.get("name"))
        if family and family != tokenizer_cfg.family:
            raise ConfigError(f"{made} are {family} tokens, but tokenizer.name={tokenizer_cfg.name} is of the "
                              f"{tokenizer_cfg.family} family: tokenize the images with this tokenizer, or "
                              f"train with the tokenizer config the shards were made with")
    if model_cfg is not None:
        for key in ("codebook_size", "num_tokens"):
            if manifest.get(key) is not None and manifest[key] != getattr(model_cfg, key):
                raise ConfigError(f"{made}: {key}={manifest[key]} disagrees with model.{key}="
                                  f"{getattr(model_cfg, key)} (tokenized with another tokenizer or resolution?)")
    if tokenizer_cfg is not None:
        tc = tokenizer_cfg
        if tok.get("codebook_size") is not None and tok["codebook_size"] != tc.codebook_size:
            raise ConfigError(f"{made}: made by a tokenizer with codebook_size={tok['codebook_size']}, but "
                              f"tokenizer.codebook_size={tc.codebook_size}")
        if tok.get("grid") is not None and list(tok["grid"]) != list(tc.grid):
            raise ConfigError(f"{made}: token grid {list(tok['grid'])}, but the tokenizer config gives "
                              f"{list(tc.grid)} (tokenizer.image_size={tc.image_size}, the downsampling factor)")
        if tok.get("prefix_tokens", 0) != tc.prefix_tokens:
            raise ConfigError(f"{made}: {tok.get('prefix_tokens', 0)} prefix tokens, but the tokenizer config "
                              f"gives {tc.prefix_tokens} (tokenizer.alitok.prefix_tokens)")
