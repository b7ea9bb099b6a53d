"""The reference's pretokenized JSONL (``{"class_id": int, "tokens": [N ints]}`` per line).

:class:`JsonlSource` lets ``build_train_loader`` train from that file directly (``data.jsonl``), and
:func:`convert` turns it into token shards + manifest (``python -m rear_ds.data.jsonl_to_shards``),
which is the faster and checkable format. The reference file is ordered (by rank, then by class),
so both read lines through a fixed random permutation: blocks of lines are random subsets.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterator

import numpy as np

from rear_ds.config import ConfigError, ModelConfig
from . import shards as S

BLOCK_LINES = 8192  # lines per reader unit
PERM_SEED = 0


INDEX_VERSION = 2  # of the cached line index (2: offsets + file line numbers)


def line_index(path: str) -> tuple:
    """(offsets, numbers) of every non-blank line: its byte offset and its 1-based line number in the file
    (for messages; blank lines are skipped, so the i-th record is not always line i + 1). One pass over the
    file, cached beside it when writable, keyed on the file's size and mtime."""
    st = os.stat(path)
    cache = f"{path}.lineidx.npy"
    stamp = np.array([INDEX_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)
    if os.path.isfile(cache):
        arr = np.load(cache, allow_pickle=False)
        if arr.shape[0] >= 3 and (arr.shape[0] - 3) % 2 == 0 and np.array_equal(arr[:3], stamp):
            n = (arr.shape[0] - 3) // 2
            return arr[3:3 + n], arr[3 + n:]
    offsets, numbers, pos = [], [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                offsets.append(pos)
                numbers.append(number)
            pos += len(line)
    offsets, numbers = np.array(offsets, dtype=np.int64), np.array(numbers, dtype=np.int64)
    try:
        tmp = f"{cache}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate([stamp, offsets, numbers]), allow_pickle=False)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only location: keep the index in memory only
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
    """Reader source over a JSONL file: units are blocks of a fixed random permutation of its lines."""

    kind = "jsonl"

    def __init__(self, path: str, model_cfg: ModelConfig):
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
        self.order = np.random.default_rng(PERM_SEED).permutation(len(self.offsets))
        self.num_samples = len(self.offsets)
        self.blocks = {}
        for b, start in enumerate(range(0, len(self.order), BLOCK_LINES)):
            self.blocks[f"block-{b:06d}"] = start

    def files(self) -> list:
        n = len(self.order)
        return [(self.path, name, min(BLOCK_LINES, n - start)) for name, start in self.blocks.items()]

    def fingerprint(self) -> str:
        st = os.stat(self.path)
        return f"jsonl:{st.st_size}:{len(self.offsets)}"

    def read(self, unit, skip: int = 0) -> Iterator[tuple]:
        base = self.blocks[unit.name] + unit.start
        with open(self.path, "rb") as f:
            for i in range(base + skip, base + unit.count):
                line = int(self.order[i])
                f.seek(int(self.offsets[line]))
                where = f"{self.path} line {self.line_numbers[line]}"
                t, cls = parse_line(f.readline(), where, self.num_tokens, self.codebook_size)
                if not 0 <= cls < self.num_classes:
                    raise S.ShardError(f"{where}: class_id {cls} outside [0, {self.num_classes})")
                yield t, cls


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
