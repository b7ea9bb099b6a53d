"""The reference's pretokenized JSONL (``{"class_id": int, "tokens": [N ints]}`` per line).

:class:`JsonlSource` lets ``build_train_loader`` train from that file directly (``data.jsonl``), and
:func:`convert` turns it into token shards + manifest (``python -m rear_ds.data.jsonl_to_shards``),
which is the faster and checkable format. The reference file is ordered (by rank, then by class),
so both read lines through a fixed random permutation: blocks of lines are random subsets.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import numpy as np

from rear_ds.config import ConfigError, ModelConfig
from . import shards as S

log = logging.getLogger(__name__)

PERM_SEED = 0
INDEX_VERSION = 2  # of the cached line index (2: offsets + file line numbers)
SCAN_CHUNK = 1 << 20  # bytes per numpy pass of the line scan (about 7 bytes of temporaries per byte)
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\r\n\x0b\x0c")] = True
_warned_uncached: set = set()


def _scan_lines(path: str) -> tuple:
    """(offsets, numbers) of the non-blank lines, found with numpy a chunk at a time (16 bytes per line in the
    end; Python lists of ints took ~70 bytes per line, about 1 GB per rank at 12.8M lines)."""
    offs, nums = [], []
    pos, line_no, carry_start, carry_nonblank = 0, 0, 0, 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(SCAN_CHUNK)
            if not buf:
                break
            a = np.frombuffer(buf, dtype=np.uint8)
            nl = np.flatnonzero(a == 10)
            c = np.zeros(len(a) + 1, dtype=np.int32)  # c[k]: non-blank bytes before byte k of the chunk
            np.cumsum(~_WHITESPACE[a], dtype=np.int32, out=c[1:])
            starts = np.r_[0, nl + 1]  # segment k: bytes [starts[k], starts[k+1]); the last one is unfinished
            if len(nl):
                nonblank = c[nl + 1] - c[starts[:-1]]
                nonblank[0] += carry_nonblank
                line_offsets = pos + starts[:-1]
                line_offsets[0] = carry_start
                keep = nonblank > 0
                offs.append(line_offsets[keep])
                nums.append(line_no + 1 + np.flatnonzero(keep))
                carry_start, carry_nonblank = pos + int(starts[-1]), 0
            carry_nonblank += int(c[-1] - c[starts[-1]])
            line_no += len(nl)
            pos += len(a)
    if carry_nonblank:  # a last line without a newline
        offs.append(np.array([carry_start]))
        nums.append(np.array([line_no + 1]))
    cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(offs), cat(nums)


def line_index(path: str) -> tuple:
    """(offsets, numbers) of every non-blank line: its byte offset and its 1-based line number in the file
    (for messages; blank lines are skipped, so the i-th record is not always line i + 1). One pass over the
    file, cached beside it, keyed on the file's size and mtime, and memory-mapped from there (the ranks of a
    node share it). When the cache cannot be written, the index stays in memory and the log says so once."""
    st = os.stat(path)
    cache = f"{path}.lineidx.npy"
    stamp = np.array([INDEX_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)
    if os.path.isfile(cache):
        try:
            arr = np.load(cache, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            arr = np.zeros(0, dtype=np.int64)
        if arr.ndim == 1 and arr.shape[0] >= 3 and (arr.shape[0] - 3) % 2 == 0 and np.array_equal(arr[:3], stamp):
            n = (arr.shape[0] - 3) // 2
            return arr[3:3 + n], arr[3 + n:]
    t0 = time.perf_counter()
    offsets, numbers = _scan_lines(path)
    tmp = f"{cache}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate([stamp, offsets, numbers]), allow_pickle=False)
        os.replace(tmp, cache)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if path not in _warned_uncached:
            _warned_uncached.add(path)
            log.warning("cannot write the line index cache %s (%s): %s lines were indexed in %.1f s and every "
                        "start (every rank) will index them again; make the folder writable, or convert the "
                        "file to token shards (python -m rear_ds.data.jsonl_to_shards)", cache, e,
                        f"{len(offsets):,}", time.perf_counter() - t0)
    return offsets, numbers


def parse_line(raw: bytes, where: str, num_tokens: int, codebook_size: int, num_classes: int = 0) -> tuple:
    """One JSONL line -> (tokens (N,) uint16, class id); ShardError naming ``where`` if malformed (or, with
    ``num_classes``, if the class is outside [0, num_classes))."""
    try:
        obj = json.loads(raw)
        cls, toks = obj["class_id"], obj["tokens"]
        # integers only: int() would truncate 2.9 to 2 and accept "3" and true
        if type(cls) is not int or not isinstance(toks, list) or any(type(x) is not int for x in toks):
            raise TypeError("class_id and tokens must be JSON integers")
        toks = np.asarray(toks, dtype=np.int64)
    except (ValueError, KeyError, TypeError, OverflowError) as e:
        raise S.ShardError(f"{where}: not a {{'class_id', 'tokens'}} JSON line: {e}") from None
    if cls < 0:
        raise S.ShardError(f"{where}: class_id {cls} is negative")
    if num_classes and cls >= num_classes:
        raise S.ShardError(f"{where}: class_id {cls} outside [0, {num_classes})")
    if toks.ndim != 1 or toks.size != num_tokens or toks.min() < 0 or toks.max() >= codebook_size:
        raise S.ShardError(f"{where}: expected {num_tokens} token ids in [0, {codebook_size}), got "
                           f"{toks.size} ids in [{toks.min() if toks.size else '-'}, {toks.max() if toks.size else '-'}]")
    return toks.astype(np.uint16), cls


class JsonlSource:
    """Reader source over a JSONL file: one "file" whose sample i is line perm(i) of a fixed pseudo-random
    permutation (the reference file is sorted by class: runs of consecutive samples must be random lines)."""

    kind = "jsonl"

    def __init__(self, path: str, model_cfg: ModelConfig):
        from .reader import Permutation

        if not os.path.isfile(path):
            raise ConfigError(f"data.jsonl={path!r} does not exist")
        self.path, self.num_tokens, self.codebook_size = path, model_cfg.num_tokens, model_cfg.codebook_size
        self.num_classes = model_cfg.num_classes
        self.offsets, self.line_numbers = line_index(path)
        if len(self.offsets) == 0:
            raise ConfigError(f"data.jsonl={path!r} is empty")
        with open(path, "rb") as f:  # a clear error now rather than in a worker later
            f.seek(int(self.offsets[0]))
            try:
                parse_line(f.readline(), f"{path} line {self.line_numbers[0]}", self.num_tokens, self.codebook_size)
            except S.ShardError as e:
                raise ConfigError(f"data.jsonl does not match the model config (model.num_tokens="
                                  f"{self.num_tokens}, model.codebook_size={self.codebook_size}): {e}") from None
        self.num_samples = len(self.offsets)
        self.order = Permutation(self.num_samples, PERM_SEED)

    def files(self) -> list:
        return [(self.path, os.path.basename(self.path), self.num_samples)]

    def fingerprint(self) -> str:
        st = os.stat(self.path)
        return f"jsonl:{st.st_size}:{len(self.offsets)}"

    def close(self) -> None:
        """Nothing stays open: every read opens the file."""

    def image_ids(self) -> np.ndarray:
        return np.arange(self.num_samples, dtype=np.int64)  # a line is one image (its view is unknown)

    def read(self, file: int, start: int, count: int) -> list:
        """[(tokens (N,) uint16, class)] of samples [start, start + count); a bad line is a ShardError in its
        place (skipped alone by the reader), an OS error raises ShardReadError."""
        out = []
        try:
            with open(self.path, "rb") as f:
                for line in self.order(np.arange(start, start + count)):
                    f.seek(int(self.offsets[line]))
                    where = f"{self.path} line {self.line_numbers[line]}"
                    try:
                        t, cls = parse_line(f.readline(), where, self.num_tokens, self.codebook_size)
                        if not 0 <= cls < self.num_classes:
                            raise S.ShardError(f"{where}: class_id {cls} outside [0, {self.num_classes})")
                        out.append((t, cls))
                    except S.ShardError as e:
                        out.append(e)
        except OSError as e:
            raise S.ShardReadError(f"{self.path}: read failed: {e}", e.errno) from None
        return out


def convert(jsonl: str, out: str, grid: tuple, codebook_size: int, samples_per_shard: int = 200_000,
            shuffle_seed: int = 0, tokenizer_name: str = "maskgit_vqgan", views: str = "unknown",
            num_classes: int = 1000) -> dict:
    """JSONL -> token shards + manifest.json (lines permuted with ``shuffle_seed``; bad lines listed, among
    them classes outside [0, num_classes))."""
    if not os.path.isfile(jsonl):
        raise S.ShardError(f"input JSONL {jsonl!r} does not exist")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, S.MANIFEST)) or any(n.startswith("shard-") for n in os.listdir(out)):
        raise S.ShardError(f"output folder {out!r} already holds shards; use an empty folder")
    offsets, numbers = line_index(jsonl)
    order = np.arange(len(offsets)) if shuffle_seed < 0 else np.random.default_rng(shuffle_seed).permutation(len(offsets))
    n_tok = grid[0] * grid[1]
    entries, skipped, hist = [], [], {}
    with open(jsonl, "rb") as f:
        for j, start in enumerate(range(0, len(order), samples_per_shard)):
            w = S.ShardWriter(os.path.join(out, S.shard_name(j)))
            try:
                for line in order[start: start + samples_per_shard]:
                    f.seek(int(offsets[line]))
                    where = f"line {numbers[line]}"
                    try:
                        t, cls = parse_line(f.readline(), where, n_tok, codebook_size, num_classes)
                    except S.ShardError as e:
                        skipped.append({"src": where, "reason": str(e)})
                        continue
                    w.add(S.sample_key(int(line), 0), t.reshape(grid), cls, -1, where)
                    hist[str(cls)] = hist.get(str(cls), 0) + 1
            except BaseException:
                w.abort()  # no half-written shard left behind to block a rerun
                raise
            e = w.commit()
            e["images_written"] = e["samples"]
            entries.append(e)
    written = sum(e["samples"] for e in entries)
    if written == 0:
        for e in entries:
            os.remove(os.path.join(out, e["name"]))
        first = skipped[0]["reason"] if skipped else "the file has no lines"
        raise S.ShardError(f"{jsonl}: no line could be converted ({len(skipped)} skipped; the first: {first}); "
                           f"check --grid {grid[0]}x{grid[1]}, --codebook-size {codebook_size} and --num-classes "
                           f"{num_classes}")
    manifest = {
        "format": S.FORMAT,
        "tokenizer": {"name": tokenizer_name, "codebook_size": codebook_size, "grid": list(grid),
                      "weights_sha256": "", "note": "converted from a pretokenized JSONL"},
        "preprocessing": {"views": views, "view_names": [], "note": "as in the JSONL (view = -1: unknown)"},
        "codebook_size": codebook_size, "grid": list(grid), "num_tokens": n_tok, "dtype": "uint16",
        "source": {"kind": "jsonl", "path": os.path.abspath(jsonl), "num_inputs": len(offsets)},
        "classes": [], "num_classes": num_classes, "shard_plan": {"samples_per_shard": samples_per_shard, "num_shards": len(entries),
                                      "shuffle_seed": shuffle_seed},
        "shards": entries, "num_samples": written,
        "class_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "accounting": {"images_seen": len(offsets), "images_written": written, "images_skipped": len(skipped),
                       "samples_written": written},
        "skipped": skipped, "empty_class_folders": [],
    }
    S.write_json_atomic(os.path.join(out, S.MANIFEST), manifest)
    print(f"converted {jsonl}: lines seen = written + skipped: {len(offsets)} = {written} + {len(skipped)} "
          f"-> {len(entries)} shards in {out}", file=sys.stderr)
    return manifest
