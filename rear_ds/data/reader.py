"""The training reader: an infinite, resumable stream of (tokens, labels) micro-batches per rank.

Items. With ``data.views: all`` an item is a sample (one view of one image); with ``one_per_image`` it is
an image, and every fetch of it reads one of its views, drawn at random (AliTok's trainer: an epoch is one
pass over the images). Items are numbered over all shards (or JSONL lines) in manifest order.

Orders (``data.order``):

* ``epoch`` (the reference's): one global pseudo-random permutation of the items per epoch, the same on
  every rank; the epochs follow each other as one stream of positions 0, 1, 2, ... Position p is item
  perm_e(p mod N) of epoch e = p // N. The stream is cut into micro-batches of B positions, handed out to
  the ranks in turn: rank r's i-th micro-batch is positions [(i*W + r)*B, (i*W + r + 1)*B) (+ a base
  where the run continued after a change of process count). So every item comes once per epoch over all
  ranks, every rank gets the same amount, and a micro-batch is a pure function of its index: DataLoader
  workers make micro-batches i = k, k + workers, ... side by side, and the stream does not depend on the
  worker count. The permutation is computed per position (a keyed Feistel network), not stored.
* ``resampled`` (for data too large to index): rank r owns items [N*r/W, N*(r+1)/W). Each logical worker
  draws, over and over, ``ceil(shuffle_buffer / SUBUNIT)`` runs of SUBUNIT consecutive items at random
  offsets of the rank's range (with replacement; a run wraps around the end, so every item is drawn
  equally often), reads them and emits them in a random order. Draw d of worker w is seeded by (seed,
  rank, w, d), so a worker's position is (draw, slots emitted).

Resume. ``state_dict()`` holds the position after the last micro-batch the trainer consumed (epoch: the
micro-batch count; resampled: each worker's position) and the corrupt shards met. ``position()`` is the
epoch order's global position, which a run on another number of processes continues from
(``continue_from``): each item still comes once per epoch.

Bad data. Token shards are checked against the model config before anything is read. A shard found
corrupt while training is skipped for good (a warning, ``.stats``, saved in the state), or stops the run
with ``data.on_corrupt_shard: error``. A read the operating system failed is retried in place when its
errno may be transient (EIO, ESTALE, timeouts); if it still fails, or the errno is not transient, the shard
is left out for UNREADABLE_RETRY_S and then tried again (never saved as corrupt). A bad JSONL line is
skipped alone. Slots of the epoch order whose sample could not be read are filled with random readable
samples (counted as ``replaced_samples``), so batches keep their size and no rank falls behind.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import time
from typing import Optional

import numpy as np
import torch

from rear_ds.config import ConfigError, DataConfig, ModelConfig
from . import shards as S

log = logging.getLogger(__name__)
STATE_VERSION = 2
READ_ATTEMPTS = 3  # reads of a shard whose OS error may be transient, before it is left out for a while
UNREADABLE_RETRY_S = 300.0  # an unreadable shard is tried again after this long
SUBUNIT = 256  # consecutive items per run of a resampled draw (one sequential read of ~1.2 MB of shard)
REPLACEMENT_DRAWS = 1000  # random draws for an unreadable slot of the epoch order before giving up
COUNTERS = ("bad_samples", "replaced_samples", "unreadable_skips", "read_retries")


class ReaderStateError(ValueError):
    """A saved reader position does not belong to this data / rank layout."""


class _Skip(Exception):
    """Internal: a shard that is left out (corrupt, or unreadable for now)."""


# ----------------------------------------------------------------------------------------------
# Keyed hashing and the per-index permutation
# ----------------------------------------------------------------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (multiplications wrap around)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _key(*words: int) -> np.ndarray:
    return np.random.SeedSequence([int(w) % 2 ** 64 for w in words]).generate_state(4, np.uint64)


def hash_index(i: np.ndarray, *key: int) -> np.ndarray:
    """A pseudo-random uint64 per index, a function of (key, index) only."""
    k = _key(*key)
    return _mix(_mix(np.asarray(i, dtype=np.uint64) ^ k[0]) ^ k[1])


class Permutation:
    """A keyed pseudo-random permutation of range(n), evaluated per index without a table: a 4-round Feistel
    network on the smallest even bit width >= log2(n), walking the cycle until the value is below n."""

    def __init__(self, n: int, *key: int):
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = _key(*key)

    def _round(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        x = np.asarray(i, dtype=np.uint64).copy()
        todo = np.ones(x.shape, dtype=bool)
        while todo.any():
            x[todo] = self._round(x[todo])
            todo = x >= np.uint64(self.n)
        return x.astype(np.int64)


def rank_range(n: int, rank: int, world: int) -> tuple:
    """Rank's equal share [lo, hi) of n items (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


# ----------------------------------------------------------------------------------------------
# Token shard source
# ----------------------------------------------------------------------------------------------


def check_manifest(m: dict, mpath: str, model_cfg: ModelConfig) -> None:
    """The manifest's token layout (shards.check_manifest: tokenizer, codebook, sequence length) and classes fit
    the model, before any shard is read."""
    S.check_manifest(m, mpath, model_cfg)
    classes = [int(c) for c in m.get("class_histogram", {})]
    if classes and not 0 <= min(classes) <= max(classes) < model_cfg.num_classes:
        raise ConfigError(f"token shards {mpath}: class indices {min(classes)}..{max(classes)} are outside "
                          f"[0, model.num_classes={model_cfg.num_classes})")


class ShardSource:
    """Token shards + manifest, validated against the model config."""

    kind = "shards"

    def __init__(self, spec: str, model_cfg: ModelConfig):
        folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
        self.manifest = S.load_manifest(folder)
        mpath = os.path.join(folder, S.MANIFEST)
        check_manifest(self.manifest, mpath, model_cfg)
        entries = {e["name"]: e for e in self.manifest["shards"]}
        if os.path.isdir(spec):
            names = [e["name"] for e in self.manifest["shards"]]
        else:
            import braceexpand

            names = sorted({os.path.basename(p) for pat in braceexpand.braceexpand(spec) for p in glob.glob(pat)})
            unknown = [n for n in names if n not in entries]
            if unknown:
                raise ConfigError(f"data.shards={spec!r}: {unknown[:3]} are not listed in {mpath}")
        if not names:
            raise ConfigError(f"data.shards={spec!r}: no shards (manifest {mpath})")
        self.entries = [entries[n] for n in names]
        self.shards = [S.ShardFile(os.path.join(folder, e["name"]), e["samples"], e["bytes"]) for e in self.entries]
        self.num_tokens, self.codebook_size = model_cfg.num_tokens, model_cfg.codebook_size
        self.num_classes = model_cfg.num_classes

    def files(self) -> list:
        return [(f.path, e["name"], e["samples"]) for f, e in zip(self.shards, self.entries)]

    def close(self) -> None:
        """Closes the shards' descriptors in this process (they reopen when read again)."""
        for f in self.shards:
            f.close()

    def fingerprint(self) -> str:
        return hashlib.sha256("".join(e["sha256"] for e in self.entries).encode()).hexdigest()[:16]

    def read(self, file: int, start: int, count: int) -> list:
        """[(tokens (N,) uint16, label)] of samples [start, start + count) of shard ``file``; ShardError on any
        corruption (the whole shard is then left out), ShardReadError on OS errors."""
        out = []
        for s in self.shards[file].read(start, count):
            t = s["tokens"].reshape(-1)
            if t.size != self.num_tokens or (t.size and int(t.max()) >= self.codebook_size) \
                    or not 0 <= s["cls"] < self.num_classes:
                raise S.ShardError(f"shard {self.shards[file].path} sample {s['key']}: {t.size} tokens (max id "
                                   f"{int(t.max()) if t.size else -1}), class {s['cls']}; expected {self.num_tokens} "
                                   f"ids < {self.codebook_size} and a class < {self.num_classes}")
            out.append((t, s["cls"]))
        return out

    def image_ids(self) -> np.ndarray:
        """Image index of every sample (all shards in order), from the shards' __rear_index__ members."""
        try:
            return np.concatenate([f.image_index()[:, 0] for f in self.shards])
        except S.ShardError as e:
            raise ConfigError(f"data.views=one_per_image needs every shard's image index: {e}") from None


# ----------------------------------------------------------------------------------------------
# Items: samples, or images whose fetch picks one view
# ----------------------------------------------------------------------------------------------


class Catalog:
    """Maps items to samples and samples to (file, position)."""

    def __init__(self, source, views: str):
        files = source.files()
        self.names = [name for _, name, _ in files]
        self.bounds = np.concatenate([[0], np.cumsum([n for _, _, n in files])]).astype(np.int64)
        self.num_samples = int(self.bounds[-1])
        self.views = views
        if views == "all":
            self.n_items = self.num_samples
        else:  # group the samples by image: members[starts[i]:starts[i+1]] are image i's samples
            ids = source.image_ids()
            self.members = np.argsort(ids, kind="stable")
            sid = ids[self.members]
            self.starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1], True]).astype(np.int64)
            self.n_items = len(self.starts) - 1

    def samples(self, items: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """Global sample index for each item; one_per_image: its view number ``draw`` (uint64 hashes) mod its
        number of views."""
        items = np.asarray(items, dtype=np.int64)
        if self.views == "all":
            return items
        first, count = self.starts[items], self.starts[items + 1] - self.starts[items]
        return self.members[first + (draw % count.astype(np.uint64)).astype(np.int64)]

    def locate(self, g: np.ndarray) -> tuple:
        f = np.searchsorted(self.bounds, g, side="right") - 1
        return f, g - self.bounds[f]


class _Fetcher:
    """Reads samples by global index in a DataLoader worker: one read per run of consecutive samples, with
    retries and the bookkeeping of left-out shards. Returns None for a sample that could not be read."""

    def __init__(self, source, catalog: Catalog, cfg: DataConfig, bad: set):
        self.source, self.catalog, self.cfg = source, catalog, cfg
        self.bad = set(bad)  # corrupt shard names (for good)
        self.new_bad: list = []
        self.unreadable: dict = {}  # name -> time after which it is tried again
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.logged_lines = 0

    def report(self) -> dict:
        out = {"bad": self.new_bad, "counts": self.counts}
        self.new_bad, self.counts = [], dict.fromkeys(COUNTERS, 0)
        return out

    def fetch(self, g: np.ndarray) -> list:
        out = [None] * len(g)
        files, pos = self.catalog.locate(np.asarray(g, dtype=np.int64))
        order = np.lexsort((pos, files))
        i = 0
        while i < len(order):  # runs of consecutive positions in one file
            j = i + 1
            while j < len(order) and files[order[j]] == files[order[i]] and pos[order[j]] - pos[order[j - 1]] <= 1:
                j += 1
            run = order[i:j]
            f, a = int(files[run[0]]), int(pos[run[0]])
            try:
                got = self._read(f, a, int(pos[run[-1]]) - a + 1)
            except _Skip:
                if self.catalog.names[f] not in self.bad:  # (samples of corrupt shards are not counted again)
                    self.counts["unreadable_skips"] += len(run)
                got = None
            if got is not None:
                for k in run:
                    x = got[int(pos[k]) - a]
                    if isinstance(x, S.ShardError):  # one bad record (a JSONL line): skipped alone
                        self._bad_sample(x)
                    else:
                        out[k] = x
            i = j
        return out

    def _bad_sample(self, e: S.ShardError) -> None:
        if self.cfg.on_corrupt_shard == "error":
            raise S.ShardError(f"{e} (data.on_corrupt_shard=error)")
        self.counts["bad_samples"] += 1
        self.logged_lines += 1
        if self.logged_lines <= 5:
            log.warning("skipping a bad sample: %s%s", e, " (further ones are only counted)" if self.logged_lines == 5 else "")

    def _read(self, f: int, start: int, count: int) -> list:
        name = self.catalog.names[f]
        if name in self.bad or self.unreadable.get(name, 0.0) > time.monotonic():
            raise _Skip
        for attempt in range(READ_ATTEMPTS):
            try:
                return self.source.read(f, start, count)
            except S.ShardReadError as e:
                if e.transient and attempt + 1 < READ_ATTEMPTS:
                    self.counts["read_retries"] += 1
                    log.warning("reading token shard %s failed (%s); retry %d of %d", name, e, attempt + 1,
                                READ_ATTEMPTS - 1)
                    time.sleep(2.0 * (attempt + 1))
                    continue
                self.unreadable[name] = time.monotonic() + UNREADABLE_RETRY_S
                log.warning("token shard %s is unreadable (%s): left out for %.0f s, then tried again", name, e,
                            UNREADABLE_RETRY_S)
                raise _Skip from None
            except S.ShardError as e:
                if self.cfg.on_corrupt_shard == "error":
                    raise S.ShardError(f"{e} (data.on_corrupt_shard=error)") from None
                log.warning("skipping corrupt token shard %s: %s", name, e)
                self.bad.add(name)
                self.new_bad.append(name)
                raise _Skip from None
        raise AssertionError("unreachable")


def _collate(samples: list) -> tuple:
    return (torch.from_numpy(np.stack([t for t, _ in samples]).astype(np.int64)),
            torch.tensor([y for _, y in samples], dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# The two orders, as streams of one rank (run inside the DataLoader workers)
# ----------------------------------------------------------------------------------------------


class _EpochOrder:
    def __init__(self, loader: "TrainLoader"):
        L = loader
        self.catalog, self.seed, self.rank, self.world, self.batch = L.catalog, L.seed, L.rank, L.world_size, L.batch
        self.base = L.base
        self._perm: dict = {}

    def positions(self, i: int) -> np.ndarray:
        return self.base + (i * self.world + self.rank) * self.batch + np.arange(self.batch, dtype=np.int64)

    def items(self, p: np.ndarray) -> np.ndarray:
        n = self.catalog.n_items
        epoch, k = p // n, p % n
        items = np.empty_like(p)
        for e in np.unique(epoch):
            if e not in self._perm:
                self._perm = {e: Permutation(n, self.seed, 1, e)}  # one epoch (or two at a boundary) at a time
            sel = epoch == e
            items[sel] = self._perm[e](k[sel])
        return items

    def sample_indices(self, i: int) -> np.ndarray:
        p = self.positions(i)
        return self.catalog.samples(self.items(p), hash_index(p, self.seed, 2))  # a view per position

    def batch_at(self, i: int, fetch: _Fetcher) -> list:
        p = self.positions(i)
        got = fetch.fetch(self.sample_indices(i))
        for slot in [s for s, x in enumerate(got) if x is None]:
            got[slot] = self._replacement(int(p[slot]), fetch)
        return got

    def _replacement(self, p: int, fetch: _Fetcher):
        n = self.catalog.n_items
        for a in range(REPLACEMENT_DRAWS):
            item = int(hash_index(np.array([p]), self.seed, 3, a)[0] % np.uint64(n))
            x = fetch.fetch(self.catalog.samples(np.array([item]), hash_index(np.array([a]), self.seed, 4, p)))[0]
            if x is not None:
                fetch.counts["replaced_samples"] += 1
                return x
        raise S.ShardError(f"no readable sample found in {REPLACEMENT_DRAWS} random draws: corrupt or unreadable "
                           f"shards: {sorted(fetch.bad | set(fetch.unreadable))[:10]}")

    def run(self, k: int, nw: int, start: int, fetch: _Fetcher):
        i = start + k
        while True:
            yield (*_collate(self.batch_at(i, fetch)), i, fetch.report())
            i += nw


class _ResampledOrder:
    def __init__(self, loader: "TrainLoader"):
        L = loader
        self.catalog, self.seed, self.rank, self.batch = L.catalog, L.seed, L.rank, L.batch
        self.lo, self.hi = rank_range(L.catalog.n_items, L.rank, L.world_size)
        self.runs = -(-L.cfg.shuffle_buffer // SUBUNIT)

    def draw(self, w: int, d: int) -> np.ndarray:
        """Samples of draw d of worker w, in emission order."""
        n = self.hi - self.lo
        sub = min(SUBUNIT, n)
        runs = max(1, min(self.runs, n // sub))  # a draw of small data holds each item about once
        rng = np.random.default_rng([self.seed, self.rank, w, d, 7])
        starts = rng.integers(n, size=runs)
        slots = self.lo + (starts[:, None] + np.arange(sub)) % n
        slots = rng.permutation(slots.ravel())
        return self.catalog.samples(slots, hash_index(np.arange(len(slots)), self.seed, 5, self.rank, w, d))

    def run(self, w: int, st: dict, fetch: _Fetcher):
        toks, empty_draws = [], 0
        while True:
            got = fetch.fetch(self.draw(w, st["draw"])[st["offset"]:])
            for x in got:
                st["offset"] += 1
                if x is not None:
                    toks.append(x)
                    if len(toks) == self.batch:
                        yield (*_collate(toks), w, {**fetch.report(), "state": dict(st)})
                        toks = []
            empty_draws = 0 if any(x is not None for x in got) else empty_draws + 1
            if empty_draws >= 100:
                raise S.ShardError(f"rank {self.rank}: nothing readable in 100 draws; corrupt shards "
                                   f"{sorted(fetch.bad)}, unreadable {sorted(fetch.unreadable)}")
            st["draw"] += 1
            st["offset"] = 0


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, loader: "TrainLoader"):
        self.loader = loader

    def __iter__(self):
        L = self.loader
        info = torch.utils.data.get_worker_info()
        k, nw = (info.id, info.num_workers) if info else (0, 1)
        fetch = _Fetcher(L.source, L.catalog, L.cfg, L.bad)
        if L.cfg.order == "epoch":
            return _EpochOrder(L).run(k, nw, L.consumed, fetch)
        w = (k + L.consumed) % L.workers  # the worker whose batch is next comes first
        return _ResampledOrder(L).run(w, dict(L.states[w]), fetch)


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
        self.catalog = Catalog(source, data_cfg.views)
        n = self.catalog.n_items
        if n < world_size:
            raise ConfigError(f"rank {rank} of {world_size} gets no token data ({n} items in "
                              f"{len(self.catalog.names)} file(s)); use fewer ranks or more data")
        self.base = 0  # epoch order: global position this run's micro-batch 0 starts at
        self.consumed = 0
        self.bad: set = set()
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.states = [{"draw": 0, "offset": 0} for _ in range(self.workers)]  # resampled order
        self._it = None

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            nw = self.cfg.num_workers
            # Its own generator: starting an iterator draws a base seed, which must not come from (and shift)
            # the trainer's global torch RNG; seeded by (seed, rank, position) so a resume draws the same one.
            gen = torch.Generator()
            gen.manual_seed(int(np.random.default_rng([self.seed, self.consumed, self.rank, 2]).integers(2 ** 62)))
            dl = torch.utils.data.DataLoader(_Stream(self), batch_size=None, num_workers=nw, generator=gen,
                                             persistent_workers=False, prefetch_factor=2 if nw else None,
                                             pin_memory=torch.cuda.is_available())  # async H2D copies
            self._it = iter(dl)
        tokens, labels, tag, report = next(self._it)
        for name in report["bad"]:
            self.bad.add(name)
        for k, v in report["counts"].items():
            self.counts[k] += v
        if "state" in report:
            self.states[tag] = report["state"]
        self.consumed += 1
        return tokens, labels

    def close(self) -> None:
        self._it = None  # shuts the DataLoader workers down
        self.source.close()

    # -- resume ---------------------------------------------------------------------------------
    def _layout(self) -> dict:
        out = {"source": self.source.fingerprint(), "order": self.cfg.order, "views": self.cfg.views,
               "rank": self.rank, "world_size": self.world_size, "seed": self.seed, "micro_batch_size": self.batch}
        if self.cfg.order == "resampled":  # its streams are per worker
            out.update(workers=self.workers, shuffle_buffer=self.cfg.shuffle_buffer, subunit=SUBUNIT)
        return out

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "layout": self._layout(), "consumed_batches": self.consumed,
                "base": self.base, "workers": [dict(s) for s in self.states], "bad": sorted(self.bad),
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ReaderStateError(f"reader state version {state.get('version')}, expected {STATE_VERSION}")
        now = self._layout()
        diffs = [f"{k}: saved {state['layout'].get(k)!r}, now {v!r}" for k, v in now.items()
                 if state["layout"].get(k) != v]
        if diffs:
            raise ReaderStateError("cannot resume the data stream exactly; the layout changed: " + "; ".join(diffs))
        self.close()
        self.consumed, self.base = int(state["consumed_batches"]), int(state["base"])
        self.states = [dict(s) for s in state["workers"]]
        self.bad = set(state["bad"])
        self.counts = {k: int(state["counts"].get(k, 0)) for k in COUNTERS}

    def position(self) -> Optional[dict]:
        """The epoch order's global position (the same on every rank), for a continuation on another number of
        processes or another micro-batch size; None for the resampled order."""
        if self.cfg.order != "epoch":
            return None
        return {"order": "epoch", "views": self.cfg.views, "source": self.source.fingerprint(), "seed": self.seed,
                "position": self.base + self.consumed * self.world_size * self.batch, "bad": sorted(self.bad)}

    def continue_from(self, pos: Optional[dict]) -> Optional[str]:
        """Continue the global epoch order at a saved ``position()``; returns why not (None when done)."""
        if self.cfg.order != "epoch":
            return "data.order=resampled has no global position"
        if not pos:
            return "the checkpoint has no data position"
        here = {"order": "epoch", "views": self.cfg.views, "source": self.source.fingerprint()}
        diffs = [f"{k}: saved {pos.get(k)!r}, now {v!r}" for k, v in here.items() if pos.get(k) != v]
        if diffs:
            return "the data changed: " + "; ".join(diffs)
        self.close()
        self.seed, self.base, self.consumed = int(pos["seed"]), int(pos["position"]), 0
        self.bad = set(pos.get("bad", []))
        return None

    # -- accounting -----------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        bad = sorted(self.bad)
        return {"corrupt_shards_skipped": len(bad), "corrupt_shards": bad,
                "samples_read": self.consumed * self.batch, "batches": self.consumed, **self.counts}

    @property
    def epoch(self) -> float:
        """Epochs: passes over all items (epoch order, over all ranks) or over this rank's share (resampled)."""
        if self.cfg.order == "epoch":
            return (self.base + self.consumed * self.world_size * self.batch) / self.catalog.n_items
        lo, hi = rank_range(self.catalog.n_items, self.rank, self.world_size)
        return self.consumed * self.batch / (hi - lo)


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
