"""The training reader: an infinite, resumable stream of (tokens, labels) batches.

Stream layout (all of it a pure function of seed, rank, world size, worker count and position):

* Units. The samples of all shards, in manifest order, are cut into world_size equal ranges (to one
  sample); rank r's range, cut at shard boundaries, gives its units. Ranks see disjoint data of equal size
  (whole shards when the shard count divides evenly, else a shard may be shared by two ranks).
* Draws (resampled shards). Logical worker w of rank r draws its d-th unit uniformly with replacement
  from the rank's units, with an RNG seeded by (seed, d, rank, w); the draw counter d plays the role of
  the epoch. A draw reads its whole unit, so every sample is read equally often whatever its unit's
  size. The unit's samples go through a shuffle buffer (``data.shuffle_buffer``) seeded the same way,
  flushed at the end of the unit, so a position is just (d, samples emitted in draw d).
* Batches. Each worker packs its own stream into full micro-batches; DataLoader hands them out
  round-robin over workers. The stream never ends, so every rank yields the same number of batches.
* Resume. ``state_dict()`` holds, per worker, the position after the last batch the trainer consumed
  (plus the set of corrupt shards met). Restoring re-reads at most the current unit of each worker.

Token shards are checked against the model config (codebook size, sequence length) before anything
is read; a corrupt or truncated shard met while training is skipped with a warning and counted in
``.stats`` (or raises, with ``data.on_corrupt_shard: error``).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from rear_ds.config import ConfigError, DataConfig, ModelConfig
from . import shards as S

log = logging.getLogger(__name__)
STATE_VERSION = 1
READ_ATTEMPTS = 3  # reads of a unit whose shard the OS failed to read, before it counts as corrupt


@dataclass(frozen=True)
class Unit:
    path: str  # shard file (or JSONL file)
    name: str  # shard name, used in messages and the corrupt set
    start: int  # first sample of the unit within the file
    count: int  # samples in the unit


class ReaderStateError(ValueError):
    """A saved reader position does not belong to this data / rank layout."""


# ----------------------------------------------------------------------------------------------
# Token shard source
# ----------------------------------------------------------------------------------------------


class ShardSource:
    """Token shards + manifest, validated against the model config."""

    kind = "shards"

    def __init__(self, spec: str, model_cfg: ModelConfig):
        folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
        self.manifest = S.load_manifest(folder)
        mpath = os.path.join(folder, S.MANIFEST)
        m = self.manifest
        S.check_manifest(m, mpath, model_cfg)
        classes = [int(c) for c in m.get("class_histogram", {})]
        if classes and not 0 <= min(classes) <= max(classes) < model_cfg.num_classes:
            raise ConfigError(f"token shards {mpath}: class indices {min(classes)}..{max(classes)} are outside "
                              f"[0, model.num_classes={model_cfg.num_classes})")
        entries = {e["name"]: e for e in m["shards"]}
        if os.path.isdir(spec):
            names = [e["name"] for e in m["shards"]]
        else:
            import braceexpand

            names = sorted({os.path.basename(p) for pat in braceexpand.braceexpand(spec) for p in glob.glob(pat)})
            unknown = [n for n in names if n not in entries]
            if unknown:
                raise ConfigError(f"data.shards={spec!r}: {unknown[:3]} are not listed in {mpath}")
        if not names:
            raise ConfigError(f"data.shards={spec!r}: no shards (manifest {mpath})")
        self.entries = [dict(entries[n], path=os.path.join(folder, n)) for n in names]
        self.num_tokens, self.codebook_size = model_cfg.num_tokens, model_cfg.codebook_size
        self.num_classes = model_cfg.num_classes
        self.num_samples = sum(e["samples"] for e in self.entries)

    def files(self) -> list:
        return [(e["path"], e["name"], e["samples"]) for e in self.entries]

    def fingerprint(self) -> str:
        return hashlib.sha256("".join(e["sha256"] for e in self.entries).encode()).hexdigest()[:16]

    def read(self, unit: Unit, skip: int = 0) -> Iterator[tuple]:
        """(tokens (N,) uint16, label) of one unit; ShardError on any corruption."""
        entry = next(e for e in self.entries if e["path"] == unit.path)
        size = os.path.getsize(unit.path) if os.path.exists(unit.path) else -1
        if size != entry["bytes"]:
            raise S.ShardError(f"shard {unit.path} is truncated or modified: {size} bytes, manifest says {entry['bytes']}")
        n = 0
        for s in S.iter_shard(unit.path, start=unit.start + skip, limit=unit.count - skip):
            t = s["tokens"].reshape(-1)
            if t.size != self.num_tokens or (t.size and int(t.max()) >= self.codebook_size) \
                    or not 0 <= s["cls"] < self.num_classes:
                raise S.ShardError(f"shard {unit.path} sample {s['key']}: {t.size} tokens (max id "
                                   f"{int(t.max()) if t.size else -1}), class {s['cls']}; expected {self.num_tokens} "
                                   f"ids < {self.codebook_size} and a class < {self.num_classes}")
            n += 1
            yield t, s["cls"]
        if n != unit.count - skip:
            raise S.ShardError(f"shard {unit.path} has fewer samples than its manifest entry says")


def make_units(files: list, rank: int, world: int) -> list:
    """The units of ``rank``: its 1/world slice of all samples (files [(path, name, samples)] concatenated
    in order), one unit per file it touches."""
    total = sum(n for _, _, n in files)
    lo, hi = total * rank // world, total * (rank + 1) // world
    mine, offset = [], 0
    for path, name, n in files:
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            mine.append(Unit(path, name, a - offset, b - a))
        offset += n
    if not mine:
        raise ConfigError(f"rank {rank} of {world} gets no token data ({total} samples in {len(files)} shard(s)); "
                          "use fewer ranks or more data")
    return mine


# ----------------------------------------------------------------------------------------------
# The per-worker stream
# ----------------------------------------------------------------------------------------------


def _rng(seed: int, draw: int, rank: int, worker: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, draw, rank, worker, stream])


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle buffer (as webdataset's), emptied in random order at the end of the input."""
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = int(rng.integers(size))
        buf[i], x = x, buf[i]
        yield x
    for i in rng.permutation(len(buf)):
        yield buf[i]


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, source, units, data_cfg: DataConfig, seed: int, rank: int, workers: int,
                 batch: int, states: list, rotation: int):
        self.source, self.units, self.cfg = source, units, data_cfg
        self.seed, self.rank, self.workers, self.batch = seed, rank, workers, batch
        self.states, self.rotation = states, rotation
        self.unit_names = {u.name for u in units}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = ((info.id if info else 0) + self.rotation) % self.workers
        return self._run(w, dict(self.states[w], bad=list(self.states[w]["bad"])))

    def _run(self, w: int, st: dict) -> Iterator:
        toks, labels = [], []
        while True:
            unit = self.units[int(_rng(self.seed, st["draw"], self.rank, w, 0).integers(len(self.units)))]
            if unit.name in st["bad"]:
                if self.unit_names <= set(st["bad"]):
                    raise S.ShardError(f"every shard of rank {self.rank} is corrupt: {sorted(st['bad'])}")
            else:
                try:
                    for t, y in self._unit_samples(unit, st, w):
                        toks.append(t)
                        labels.append(y)
                        if len(toks) == self.batch:
                            st["samples"] += self.batch
                            yield (torch.from_numpy(np.stack(toks).astype(np.int64)),
                                   torch.tensor(labels, dtype=torch.int64), w, dict(st, bad=list(st["bad"])))
                            toks, labels = [], []
                except S.ShardError as e:  # corrupt, or still unreadable after READ_ATTEMPTS
                    if self.cfg.on_corrupt_shard == "error":
                        raise S.ShardError(f"{e} (data.on_corrupt_shard=error)") from None
                    log.warning("skipping corrupt token shard %s: %s", unit.name, e)
                    st["bad"].append(unit.name)
            st["draw"] += 1
            st["offset"] = 0

    def _unit_samples(self, unit: Unit, st: dict, w: int) -> Iterator[tuple]:
        """The shuffled samples of this draw after position st["offset"], which advances with each one. A read
        the OS failed (maybe transient) starts the unit again, with the same shuffle, from that position."""
        for attempt in range(READ_ATTEMPTS):
            emitted = 0
            try:
                for x in _buffer_shuffle(self.source.read(unit), self.cfg.shuffle_buffer,
                                         _rng(self.seed, st["draw"], self.rank, w, 1)):
                    emitted += 1
                    if emitted > st["offset"]:  # else: replaying up to the restored (or last read) position
                        st["offset"] = emitted
                        yield x
                return
            except S.ShardReadError as e:
                if attempt + 1 == READ_ATTEMPTS:
                    raise
                log.warning("reading token shard %s failed (%s); retry %d of %d", unit.name, e, attempt + 1,
                            READ_ATTEMPTS - 1)
                time.sleep(2.0 * (attempt + 1))


# ----------------------------------------------------------------------------------------------
# The loader object handed to the trainer
# ----------------------------------------------------------------------------------------------


class TrainLoader:
    """Iterator of (tokens (B, N) int64, labels (B,) int64), forever; see the module docstring."""

    def __init__(self, source, data_cfg: DataConfig, rank: int, world_size: int, seed: int,
                 micro_batch_size: int):
        self.source, self.cfg = source, data_cfg
        self.rank, self.world_size, self.seed, self.batch = rank, world_size, seed, micro_batch_size
        self.workers = max(1, data_cfg.num_workers)
        self.units = make_units(source.files(), rank, world_size)
        self.consumed = 0
        self.states = [{"draw": 0, "offset": 0, "bad": [], "samples": 0} for _ in range(self.workers)]
        self._it = None

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            ds = _Stream(self.source, self.units, self.cfg, self.seed, self.rank, self.workers, self.batch,
                         self.states, rotation=self.consumed % self.workers)
            nw = self.cfg.num_workers
            # Its own generator: starting an iterator draws a base seed, which must not come from (and shift)
            # the trainer's global torch RNG; seeded by (seed, rank, position) so a resume draws the same one.
            gen = torch.Generator()
            gen.manual_seed(int(_rng(self.seed, self.consumed, self.rank, 0, 2).integers(2 ** 62)))
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw, generator=gen,
                                             persistent_workers=False, prefetch_factor=2 if nw else None,
                                             pin_memory=torch.cuda.is_available())  # async H2D copies
            self._it = iter(dl)
        tokens, labels, w, state = next(self._it)
        self.states[w] = state
        self.consumed += 1
        return tokens, labels

    def close(self) -> None:
        self._it = None  # shuts the DataLoader workers down

    # -- resume ---------------------------------------------------------------------------------
    def _layout(self) -> dict:
        return {"source": self.source.fingerprint(), "rank": self.rank, "world_size": self.world_size,
                "seed": self.seed, "workers": self.workers, "micro_batch_size": self.batch,
                "shuffle_buffer": self.cfg.shuffle_buffer}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "layout": self._layout(), "consumed_batches": self.consumed,
                "workers": [dict(s, bad=list(s["bad"])) for s in self.states]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ReaderStateError(f"reader state version {state.get('version')}, expected {STATE_VERSION}")
        diffs = [f"{k}: saved {v!r}, now {self._layout()[k]!r}" for k, v in state["layout"].items()
                 if self._layout().get(k) != v]
        if diffs:
            raise ReaderStateError("cannot resume the data stream exactly; the layout changed: " + "; ".join(diffs))
        self.close()
        self.consumed = int(state["consumed_batches"])
        self.states = [dict(s, bad=list(s["bad"])) for s in state["workers"]]

    # -- accounting -----------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        bad = sorted({b for s in self.states for b in s["bad"]})
        return {"corrupt_shards_skipped": len(bad), "corrupt_shards": bad,
                "samples_read": sum(s["samples"] for s in self.states), "batches": self.consumed}

    @property
    def epoch(self) -> float:
        """Passes over this rank's share of the data (for logging)."""
        share = sum(u.count for u in self.units)
        return self.stats["samples_read"] / max(1, share)


def build_train_loader(data_cfg: DataConfig, model_cfg: ModelConfig, rank: int, world_size: int, seed: int,
                       micro_batch_size: int) -> TrainLoader:
    """The training stream for one rank (see the module docstring). Checks everything before reading."""
    data_cfg.validate()
    if data_cfg.jsonl:
        from .jsonl import JsonlSource

        source = JsonlSource(data_cfg.jsonl, model_cfg)
    else:
        source = ShardSource(data_cfg.shards, model_cfg)
    return TrainLoader(source, data_cfg, rank, world_size, seed, micro_batch_size)
