"""The token shard format (plain WebDataset .tar, written and parsed with webdataset) and its manifest.

One sample per view of one image, four members named ``<key>.<ext>`` (in this order):

    <key>.cls         class index as decimal text
    <key>.src         the source image's id as text (relative path, or "<input shard>:<key>"), at most 511 bytes
    <key>.tokens.npy  uint16 array of the tokenizer's token_shape, written by np.save: the grid (h, w) in raster
                      order, or (N,) for a tokenizer with prefix tokens (AliTok: 17 prefix + 16x16 = (273,))
    <key>.view        view id as decimal text (index into manifest["preprocessing"]["view_names"])

Keys are ``<image index, 9 digits>_<view>`` (letters, digits, ``_`` and ``-`` only). Every sample of a shard
has the same size in the tar (cls, src and view fit one 512-byte block each), so sample j starts at byte
j * sample_size: the reader seeks to any sample without an index (random access for the epoch order). After
the samples, a member ``__rear_index__`` (an int64 .npy of (image index, view) per sample, in file order)
lets the reader group the views of an image without reading the samples; plain webdataset readers skip it
(names of the form ``__*__`` are metadata to them).

Tars are written with webdataset's TarWriter, deterministically (USTAR, mtime/uid/gid 0, empty user/group,
mode 0644) so reruns are byte-identical, and atomically (``.tmp`` file, fsync, rename). Nothing is ever
pickled. Members are only ever read into memory, never extracted to disk.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import socket
import tarfile
from typing import Iterator, Optional

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator


from rear_ds.config import TOKENIZER_FAMILIES, ConfigError, token_layout

FORMAT = "rear_ds.tokens/v2"  # v2: fixed sample size + the __rear_index__ member (v1 shards stay readable)
READABLE_FORMATS = (FORMAT, "rear_ds.tokens/v1")
MANIFEST = "manifest.json"
PARTS_DIR = "_parts"  # per-rank manifests written during the job
INDEX_MEMBER = "__rear_index__"
MEMBERS = ("cls", "src", "tokens.npy", "view")
SMALL_MAX = 511  # bytes of a cls / src / view member: one tar block each, so all samples have one size
BLOCK, RECORD = 512, 10240  # tar block; tarfile pads the archive to a multiple of RECORD
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# errnos that may go away when the read is tried again (a disk or network file system hiccup)
TRANSIENT_ERRNOS = frozenset(getattr(errno, n) for n in (
    "EIO", "ESTALE", "ETIMEDOUT", "EAGAIN", "EINTR", "EBUSY", "ENETDOWN", "ENETUNREACH", "ENETRESET",
    "ECONNRESET", "ECONNABORTED", "EHOSTDOWN", "EHOSTUNREACH", "ENOLINK", "EREMOTEIO", "ECOMM") if hasattr(errno, n))


class ShardError(ValueError):
    """A shard or manifest is missing, corrupt or inconsistent."""


class ShardReadError(ShardError):
    """The operating system failed to read a shard (EIO, a network file system timeout, ...). ``transient``
    says whether its errno is one that may go away on a retry."""

    def __init__(self, msg: str, err: Optional[int] = None):
        super().__init__(msg)
        self.errno = err
        self.transient = err in TRANSIENT_ERRNOS


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(image_index: int, view: int) -> str:
    return f"{image_index:09d}_{view}"


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def sample_bytes(num_tokens: int) -> int:
    """Exact tar bytes of one sample of ``num_tokens`` tokens (4 headers + padded data; src/cls/view are < 512 bytes)."""
    return 4 * BLOCK + _padded(128 + 2 * num_tokens) + 3 * BLOCK


def tar_bytes(payload: int) -> int:
    """Size of a tar archive whose members take ``payload`` bytes: + two zero blocks, padded to a record."""
    return -(-(payload + 2 * BLOCK) // RECORD) * RECORD


def write_text_atomic(path: str, text: str) -> None:
    """The one atomic writer: a temporary name, fsync, rename, fsync of the folder (the rename itself survives
    a node crash). Readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"  # unique across hosts on a shared filesystem
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, data: dict, sort_keys: bool = True, default=None, indent: Optional[int] = 1) -> None:
    """JSON through :func:`write_text_atomic`. ``default`` is json.dump's hook for values JSON has no type for;
    ``indent=None`` writes one line (and the file ends with a newline either way, so a JSON-lines file can start
    with it)."""
    buf = io.StringIO()
    json.dump(data, buf, indent=indent, sort_keys=sort_keys, default=default)
    write_text_atomic(path, buf.getvalue() + "\n")


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


class _HashingFile:
    """File wrapper for the tar stream: hashes and counts bytes as they are written."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Write one shard to ``<path>.tmp`` with webdataset's TarWriter; :meth:`commit` adds the image index,
    fsyncs and renames it into place."""

    def __init__(self, path: str):
        self.path, self.tmp = path, path + ".tmp"
        self._f = open(self.tmp, "wb")
        self._hf = _HashingFile(self._f)
        self._tw = wds.TarWriter(self._hf, encoder=False, mtime=0, user="", group="", mode=0o644)
        # webdataset 1.0.2's TarWriter accepts `format` but does not hand it to tarfile.open (whose default is
        # PAX): set it on the stream, so that a name or size USTAR cannot hold fails here instead of silently
        # adding PAX headers (and timestamps) to the shard.
        self._tw.tarstream.format = tarfile.USTAR_FORMAT
        self._index: list = []  # (image index, view) per sample
        self._npy_size: Optional[int] = None
        self.samples = 0

    def add(self, key: str, tokens: np.ndarray, cls: int, view: int, src: str) -> None:
        image, _, v = key.partition("_")
        if not _SAFE_KEY.match(key) or not image.isdigit():
            raise ShardError(f"unsafe sample key {key!r}: expected <image index>_<view> of letters, digits, '_', '-'")
        if tokens.dtype != np.uint16:
            raise ShardError(f"tokens for {key} have dtype {tokens.dtype}, expected uint16")
        npy = _npy(tokens)
        if self._npy_size is None:
            self._npy_size = len(npy)
        elif len(npy) != self._npy_size:  # one sample size per shard: the reader computes where sample j is
            raise ShardError(f"tokens for {key} have shape {tokens.shape}, unlike the shard's first sample")
        src_b = src.encode("utf-8", "backslashreplace")
        if len(src_b) > SMALL_MAX:  # a name for messages only: keep its end (the file name)
            src_b = b"..." + src_b[-(SMALL_MAX - 3):]
        try:
            self._tw.write({"__key__": key, "cls": str(int(cls)).encode(), "src": src_b, "tokens.npy": npy,
                            "view": str(int(view)).encode()})
        except ValueError as e:  # USTAR cannot hold the name
            raise ShardError(f"sample {key}: {e}") from None
        self._index.append((int(image), int(view)))
        self.samples += 1

    def commit(self) -> dict:
        info = tarfile.TarInfo(INDEX_MEMBER)
        data = _npy(np.array(self._index, dtype=np.int64).reshape(-1, 2))
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tw.tarstream.addfile(info, io.BytesIO(data))
        self._tw.close()  # writes the end-of-archive blocks; the file itself is ours to sync and close
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


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def decode_tokens(data: bytes, where: str) -> np.ndarray:
    """Bytes of a tokens.npy member -> uint16 array; ShardError (naming ``where``) if malformed."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # np.load raises many types for malformed input
        raise ShardError(f"{where}: tokens.npy is not a valid .npy array: {e}") from None
    if arr.dtype != np.uint16:
        raise ShardError(f"{where}: tokens.npy has dtype {arr.dtype}, expected uint16")
    return arr


def _header(block: bytes, where: str) -> tarfile.TarInfo:
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")  # checks the header checksum
    except tarfile.HeaderError as e:
        raise ShardError(f"{where}: not a tar header: {e}") from None


class ShardFile:
    """Reads samples of one token shard by position: sample j is the byte range [j, j + 1) * sample_size.

    The tar parsing of those ranges is webdataset's (tar_file_iterator + group_by_keys). What this class adds,
    because webdataset does not give it:
    * where a sample is: webdataset has no random access since 1.0 (wids was split off, and wids maps files
      with mmap, where an EIO kills the process with SIGBUS instead of raising an error to retry);
    * a bound on every read: webdataset's stream reader, given a header that claims 64 GiB followed by 8 MiB,
      held 16 MiB (twice the rest of the file, so about 2 GiB for a 1 GiB shard) before it failed (measured
      with tracemalloc, webdataset 1.0.2); here a read never exceeds the requested samples' range;
    * resumable reads: an OS error (ShardReadError, errno kept) closes the descriptor, so a retry reopens
      and reads from the same sample on;
    * checks of every member (names, key, sizes, the file's size against the manifest and the layout).
    Raises ShardError for corrupt content."""

    def __init__(self, path: str, samples: int, nbytes: Optional[int] = None):
        self.path, self.samples, self.nbytes = path, samples, nbytes
        self.sample_size = 0  # known after open_layout()
        self.index_offset = -1  # byte offset of the __rear_index__ member, -1 when the shard has none (v1)
        self._npy_head = b""  # the .npy header of this shard's samples (all equal): later ones skip np.load
        self._fd: Optional[int] = None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self):  # never hand an open descriptor to another process
        return dict(self.__dict__, _fd=None)

    def _os(self, e: OSError, what: str) -> ShardReadError:
        return ShardReadError(f"shard {self.path}: {what} failed: [{errno.errorcode.get(e.errno, e.errno)}] "
                              f"{e.strerror or e}", e.errno)

    def _pread(self, offset: int, size: int) -> bytes:
        try:
            if self._fd is None:  # kept open (one per shard and process); closed after an error, so a retry reopens
                self._fd = os.open(self.path, os.O_RDONLY)
            out = os.pread(self._fd, size, offset)
        except OSError as e:
            self.close()
            raise self._os(e, "read") from None
        if len(out) != size:
            raise ShardError(f"shard {self.path} is truncated: {len(out)} of {size} bytes at offset {offset}")
        return out

    def _size(self) -> int:
        try:
            return os.stat(self.path).st_size  # not os.path.exists: it says False for EIO as for a missing file
        except OSError as e:
            raise self._os(e, "stat") from None

    def _first_sample_size(self, size: int) -> int:
        """Bytes of sample 0 (its four headers + padded data): every sample of the shard has this size."""
        head = self._pread(0, min(size, 4 * BLOCK + 3 * _padded(SMALL_MAX) + 65536))
        off, key = 0, None
        for name in MEMBERS:
            h = _header(head[off:off + BLOCK], f"shard {self.path} sample 0")
            k, _, ext = h.name.partition(".")
            key = key or k
            if k != key or ext != name or not h.isreg():
                raise ShardError(f"shard {self.path}: member {h.name!r} where <key>.{name} was expected (not a "
                                 f"rear_ds token shard, or written by another tool)")
            off += BLOCK + _padded(h.size)
            if off > len(head):
                raise ShardError(f"shard {self.path}: member {h.name!r} claims {h.size} bytes")
        return off

    def open_layout(self) -> "ShardFile":
        """Checks the file's size against the manifest and the fixed layout (sample size from the first
        sample's headers); finds the image index member."""
        if self.sample_size:
            return self
        size = self._size()
        if self.nbytes is not None and size != self.nbytes:
            raise ShardError(f"shard {self.path} is truncated or modified: {size} bytes, manifest says {self.nbytes}")
        if self.samples < 1:
            raise ShardError(f"shard {self.path} has no samples")
        sb = self._first_sample_size(size)
        payload = self.samples * sb
        block = self._pread(payload, BLOCK) if payload + BLOCK <= size else b""
        if block == bytes(BLOCK) and size == tar_bytes(payload):  # the end of the archive: a v1 shard
            self.index_offset = -1
        else:
            h = _header(block, f"shard {self.path} after sample {self.samples - 1}")
            if h.name != INDEX_MEMBER or h.size > 256 + 16 * self.samples \
                    or size != tar_bytes(payload + BLOCK + _padded(h.size)):
                raise ShardError(f"shard {self.path}: {size} bytes do not hold {self.samples} samples of {sb} "
                                 f"bytes (+ {INDEX_MEMBER}): corrupt, or not written by rear_ds")
            self.index_offset = payload
        self.sample_size = sb
        return self

    def count(self) -> int:
        """Samples in the shard, when no manifest says: walks the first header of each sample."""
        size = self._size()
        sb = self._first_sample_size(size) if size else 0
        n = 0
        while sb and (n + 1) * sb <= size:
            block = self._pread(n * sb, BLOCK)
            if not block.strip(b"\0") or _header(block, f"shard {self.path}").name == INDEX_MEMBER:
                break
            n += 1
        return n

    def read(self, start: int, count: int) -> list:
        """Samples [start, start + count) as dicts {key, tokens (uint16 grid), cls, view, src}."""
        self.open_layout()
        if not 0 <= start <= start + count <= self.samples:
            raise IndexError(f"samples [{start}, {start + count}) of a {self.samples}-sample shard {self.path}")
        raw = self._pread(start * self.sample_size, count * self.sample_size)
        out = []
        try:
            files = ({**f, "__url__": self.path} for f in tar_file_iterator(io.BytesIO(raw)))
            for s in group_by_keys(files):
                out.append(self._sample(s, start + len(out)))
        except ShardError:
            raise
        except Exception as e:  # tarfile / webdataset errors on garbled bytes: ReadError, ValueError, ...
            raise ShardError(f"shard {self.path} is corrupt near sample {start + len(out)}: "
                             f"{type(e).__name__}: {e}") from None
        if len(out) != count:
            raise ShardError(f"shard {self.path}: {len(out)} samples in the range of {count} at sample {start}")
        return out

    def _sample(self, s: dict, j: int) -> dict:
        where = f"shard {self.path} sample {j} ({s.get('__key__')})"
        key = s["__key__"]
        if not _SAFE_KEY.match(key) or sorted(k for k in s if not k.startswith("__")) != list(MEMBERS):
            raise ShardError(f"{where}: members {sorted(s)}; expected <key>.{{{', '.join(MEMBERS)}}} with a "
                             "key of letters, digits, '_' and '-'")
        npy = s["tokens.npy"]
        head = self._npy_head
        if head and npy[:len(head)] == head and (len(npy) - len(head)) % 2 == 0:
            tokens = np.frombuffer(npy, dtype="<u2", offset=len(head)).reshape(self._npy_shape)
        else:  # the first sample of this shard (or a different header: np.load checks it)
            tokens = decode_tokens(npy, where)
            self._npy_head, self._npy_shape = npy[:len(npy) - tokens.nbytes], tokens.shape
        try:
            cls, view = int(s["cls"].decode()), int(s["view"].decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise ShardError(f"{where}: bad cls/view text: {e}") from None
        return {"key": key, "tokens": tokens, "cls": cls, "view": view, "src": s["src"].decode("utf-8", "replace")}

    def image_index(self) -> np.ndarray:
        """(samples, 2) int64: image index and view of every sample, from the __rear_index__ member."""
        self.open_layout()
        if self.index_offset < 0:
            raise ShardError(f"shard {self.path} has no {INDEX_MEMBER} member (written by rear_ds before v2): "
                             "tokenize again to group its views by image")
        h = _header(self._pread(self.index_offset, BLOCK), f"shard {self.path}")
        try:
            arr = np.load(io.BytesIO(self._pread(self.index_offset + BLOCK, h.size)), allow_pickle=False)
        except Exception as e:
            raise ShardError(f"shard {self.path}: {INDEX_MEMBER} is not a valid .npy array: {e}") from None
        if arr.dtype != np.int64 or arr.shape != (self.samples, 2):
            raise ShardError(f"shard {self.path}: {INDEX_MEMBER} has {arr.dtype} {arr.shape}, expected int64 "
                             f"({self.samples}, 2)")
        return arr


def iter_shard(path: str, start: int = 0, limit: Optional[int] = None, chunk: int = 256) -> Iterator[dict]:
    """Samples of one token shard in file order, from sample ``start`` on.

    Yields ``{"key", "tokens" (uint16 grid), "cls", "view", "src"}``. Raises ShardError (naming the shard
    and sample) on truncated/corrupt data or missing members, ShardReadError on OS errors."""
    f = ShardFile(path, 0)
    try:
        f.samples = n = f.count()
        end = n if limit is None else min(n, start + limit)
        for a in range(start, end, chunk):
            yield from f.read(a, min(chunk, end - a))
    finally:
        f.close()


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
    if m.get("format") not in READABLE_FORMATS:
        raise ShardError(f"{path}: format={m.get('format')!r}, expected one of {list(READABLE_FORMATS)}")
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
