"""The pre-tokenization job: images -> token shards, split over ranks, resumable, audited.

Work plan (identical for every rank and every rerun):
  1. list the inputs (sorted) and permute them with ``--shuffle-seed`` so every shard holds a random
     mix of classes (the training reader only shuffles within a buffer);
  2. cut the permuted list into shards of ``images_per_shard`` images: shard j = images
     [j*S, (j+1)*S) of the permuted list; image i's samples have key ``<i>_<view>``;
  3. rank r does shards j with j % world_size == r.
Each shard is written to ``.tmp`` then renamed, and its entry (samples, bytes, sha256, class counts,
skipped inputs) is appended to the rank's own ``_parts/rank-R-of-W.jsonl`` (first line: the settings
and plan). A rerun skips shards whose file matches an entry's sha256 and redoes the rest, so kill +
rerun == uninterrupted, byte for byte. An input that cannot be read because of a fault that may pass
(EIO, ESTALE, a timeout; retried first) stops the rank before its shard is committed: no shard ever
has a hole that a rerun would not fill. ``--finalize`` checks every shard of every rank and writes
``manifest.json`` (a one-process run does that itself at its end); of several entries for one shard
(parts of runs with other world sizes) it takes the one that matches the file.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import yaml

from rear_ds import cli, launch
from rear_ds.config import ConfigError, TokenizerConfig, apply_section, find_config_file
from . import shards as S
from .preprocess import (IMAGE_FORMATS, MAX_ASPECT_RATIO, TEN_CROP_RATIO, VIEW_MODES, load_image, make_views,
                         to_float_batch)
from .sources import InputError, InputItem, TransientReadError, list_source, read_bytes

KILL_ENV = "REAR_DS_TOKENIZE_KILL_AFTER_SHARDS"  # test hook: die mid-shard after k committed shards
WRITE_ORDER_SEED = 0x5EED  # the in-shard sample order: a permutation seeded by (this, shard index)


class JobError(RuntimeError):
    """A problem found before any work starts (bad paths, tokenizer, incompatible output folder)."""


class TransientInputError(JobError):
    """An input stayed unreadable through the retries with an error that may pass: rerun the rank."""


EXIT_TRANSIENT = 75  # EX_TEMPFAIL: rerunning the same command is the fix


# ----------------------------------------------------------------------------------------------
# Setup: rank, tokenizer, settings
# ----------------------------------------------------------------------------------------------


def resolve_worker(rank: Optional[int], world_size: Optional[int], env=None) -> launch.Launch:
    """This process's place (:mod:`rear_ds.launch`), --rank/--world-size being the array task; the tokenizer's
    rank r of W is its ``worker`` of ``workers``."""
    try:
        return launch.parse(env, task_id=rank, num_tasks=world_size)
    except launch.LaunchError as e:
        raise JobError(f"launch environment: {e}") from None


def tokenizer_config(config_path: str = "", weights: str = "", image_size: int = 0) -> TokenizerConfig:
    """The ``tokenizer:`` section of a YAML config (other sections ignored), then the flag overrides."""
    cfg = TokenizerConfig()
    if config_path:
        try:
            config_path = find_config_file(config_path)
        except ConfigError as e:
            raise JobError(f"--config: {e}") from None
        with open(config_path) as f:
            section = (yaml.safe_load(f) or {}).get("tokenizer", {}) or {}
        try:  # the config loader's own checks: unknown keys, types, the nested tokenizer.alitok section
            apply_section(cfg, section, "tokenizer")
        except ConfigError as e:
            raise JobError(f"{config_path}: {e}") from None
    if weights:
        cfg.weights = weights
    if image_size:
        cfg.image_size = image_size
    try:
        cfg.validate()
    except ConfigError as e:
        raise JobError(f"tokenizer config: {e}") from None
    return cfg


def class_count(config_path: str = "", num_classes: int = 0) -> int:
    """The class range [0, C) the data must fit: --num-classes, else the config's model.num_classes, else
    the default model's (1000). Checked where data enters, not hours later when training reads it."""
    from rear_ds.config import ModelConfig

    if not num_classes and config_path:
        with open(config_path) as f:
            num_classes = ((yaml.safe_load(f) or {}).get("model") or {}).get("num_classes", 0)
    num_classes = num_classes or ModelConfig().num_classes
    if not isinstance(num_classes, int) or num_classes < 1:
        raise JobError(f"number of classes {num_classes!r} (--num-classes or model.num_classes): expected a "
                       "positive integer")
    return num_classes


def check_class_range(listing, num_classes: int) -> list:
    """Folder input: a class index outside [0, C) is an error (a whole class folder, or the class-index
    file); WebDataset input: such a sample is skipped and listed. Returns the items."""
    outside = [it for it in listing.items if not it.problem and not 0 <= it.label < num_classes]
    if outside and listing.kind == "folder":
        top = max(it.label for it in listing.items)
        raise JobError(f"input {listing.path!r} has class indices up to {top} ({len(listing.classes)} classes) "
                       f"but the model has num_classes={num_classes} (--num-classes or model.num_classes)")
    bad = set(map(id, outside))
    return [dataclasses.replace(it, problem=f"class {it.label} outside [0, {num_classes}) (num_classes)")
            if id(it) in bad else it for it in listing.items]


def load_tokenizer(cfg: TokenizerConfig, device: str):
    from rear_ds.models.tokenizers import build_tokenizer, tokenizer_weights_sha256
    from rear_ds.models.weights import WeightsError

    try:
        tok = build_tokenizer(cfg, load_weights=True, device=device)
    except (WeightsError, ValueError, OSError) as e:
        raise JobError(f"cannot load the tokenizer: {e}") from None
    return tok, tokenizer_weights_sha256(cfg.weights)


def job_settings(cfg: TokenizerConfig, tok, weights_sha: str, views: str, min_size: int) -> dict:
    """Everything that determines the token values; an output folder must agree on all of it."""
    # The weights path may differ between machines; the sha256 identifies the weights.
    return {
        "format": S.FORMAT,
        "tokenizer": {"name": cfg.name, "family": cfg.family, "codebook_size": int(tok.codebook_size),
                      "grid": list(tok.grid), "prefix_tokens": int(tok.prefix_tokens),
                      "num_tokens": int(tok.num_tokens), "token_shape": list(tok.token_shape),
                      "embed_dim": int(tok.embed_dim), "weights_sha256": weights_sha, "config": cfg.architecture()},
        "preprocessing": {"crop": "adm_center_crop", "image_size": cfg.image_size, "views": views,
                          "view_names": VIEW_MODES[views], "ten_crop_ratio": TEN_CROP_RATIO,
                          "rgb": "PIL convert('RGB')", "min_size": min_size, "value_range": [0, 1],
                          "max_aspect_ratio": MAX_ASPECT_RATIO, "image_formats": list(IMAGE_FORMATS),
                          # tokenizer.encode always runs in fp32: a bf16 latent changes argmins
                          "encode_dtype": "fp32"},
    }


def _diff(a: dict, b: dict, prefix: str = "") -> list:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: folder has {x!r}, this run has {y!r}")
    return out


def read_parts(out: str) -> list:
    """[(path, header, entries)] of every rank's part file: the header is its first line (settings, plan,
    rank, world size), the entries the shards it committed, in order. A last line cut short by a kill is
    ignored (:meth:`TokenizeJob.open_part` removes it before appending)."""
    parts = []
    for p in sorted(glob.glob(os.path.join(out, S.PARTS_DIR, "rank-*.jsonl"))):
        with open(p, "rb") as f:
            lines = f.read().split(b"\n")
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i < len(lines) - 1 or not records:  # only the unterminated last line may be torn
                    raise JobError(f"{p} line {i + 1} is not JSON ({e}): delete {p} and rerun that rank") from None
        parts.append((p, records[0], [r["shard"] for r in records[1:]]))
    return parts


def check_output_folder(out: str, settings: dict, plan: Optional[dict]) -> None:
    """Refuse a folder whose existing shards come from another tokenizer/preprocessing/input plan."""
    records = [(p, header) for p, header, _ in read_parts(out)]
    if os.path.isfile(os.path.join(out, S.MANIFEST)):
        with open(os.path.join(out, S.MANIFEST)) as f:
            records.append((os.path.join(out, S.MANIFEST), json.load(f)))
    if not records and glob.glob(os.path.join(out, "shard-*.tar")):
        raise JobError(f"output folder {out!r} holds shard-*.tar files but no {S.PARTS_DIR}/ or {S.MANIFEST}: "
                       "they are of unknown origin; use an empty folder")
    for path, rec in records:
        diffs = _diff({k: rec.get(k) for k in settings}, settings)
        if plan is not None and "plan" in rec:
            diffs += _diff({"plan": rec["plan"]}, {"plan": plan})
        elif plan is not None and "shard_plan" in rec:  # the manifest spreads the plan over its keys
            have = {k: rec["shard_plan"].get(k, rec.get(k)) for k in plan}
            diffs += _diff({"plan": have}, {"plan": plan})
        if diffs:
            raise JobError(f"output folder {out!r} holds shards made with other settings ({path}):\n  "
                           + "\n  ".join(diffs[:10]) + "\nuse another --out folder (or delete that one)")


# ----------------------------------------------------------------------------------------------
# Work
# ----------------------------------------------------------------------------------------------


class _DecodeSet(torch.utils.data.Dataset):
    """Decode workers: item -> (position, uint8 views (V,H,W,3) or None, skip reason)."""

    def __init__(self, items: list, size: int, views: str, min_size: int):
        self.items, self.size, self.views, self.min_size = items, size, views, min_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        """-> (i, views or None, skip reason, transient): a transient read error is not a bad input."""
        item: InputItem = self.items[i]
        if item.problem:
            return i, None, item.problem, False
        try:
            return i, make_views(load_image(read_bytes(item), self.min_size), self.size, self.views), "", False
        except TransientReadError as e:
            return i, None, str(e), True
        except ValueError as e:
            return i, None, str(e), False
        except Exception as e:  # any decoder crash is bad input, never a stopped run
            return i, None, f"corrupt image: {type(e).__name__}: {e}", False


def _collate(batch):
    return batch


class _ShardBuilder:
    """Accumulates decoded images of one shard, encodes in batches, writes the tar.

    The samples are written in a random order (seeded by the shard index, so reruns are byte-identical):
    the views of one image (up to 10 with ten-crop) would otherwise sit side by side and land in the same
    micro-batch, since the reader's shuffle buffer mixes only nearby samples."""

    def __init__(self, job: "TokenizeJob", index: int, images: list):
        self.job, self.index, self.images = job, index, images  # images: [(global_idx, item)]
        self.writer = S.ShardWriter(os.path.join(job.out, S.shard_name(index)))
        self.pending: list = []  # (global_idx, view, src, cls, uint8 array)
        self.encoded: list = []  # (key, uint16 tokens, cls, view, src), written at commit
        self.skipped: list = []
        self.class_counts: dict = {}
        self.received = 0

    def add(self, global_idx: int, item: InputItem, views, reason: str) -> None:
        self.received += 1
        if views is None:
            self.skipped.append({"src": item.src, "reason": reason})
        else:
            for v in range(views.shape[0]):
                self.pending.append((global_idx, v, item.src, item.label, views[v]))
            self.class_counts[str(item.label)] = self.class_counts.get(str(item.label), 0) + views.shape[0]  # samples
        while len(self.pending) >= self.job.batch_size:
            self.flush(self.job.batch_size)

    def flush(self, n: Optional[int] = None) -> None:
        batch, self.pending = self.pending[:n], self.pending[n:] if n else []
        if not batch:
            return
        tokens = self.job.encode(np.stack([b[4] for b in batch]))
        self.encoded += [(S.sample_key(gi, v), t, cls, v, src) for (gi, v, src, cls, _), t in zip(batch, tokens)]

    def done(self) -> bool:
        return self.received == len(self.images)

    def commit(self) -> dict:
        self.flush()
        for i in np.random.default_rng([WRITE_ORDER_SEED, self.index]).permutation(len(self.encoded)):
            self.writer.add(*self.encoded[i])
            self.job.maybe_die(self.writer)
        self.encoded = []
        entry = self.writer.commit()
        written = len(self.images) - len(self.skipped)
        entry.update(images_seen=len(self.images), images_written=written, images_skipped=len(self.skipped),
                     skipped=self.skipped, class_counts=self.class_counts)
        return entry


class TokenizeJob:
    def __init__(self, args, out: str, tok, device: str, settings: dict, plan: dict, items: list,
                 rank: int, world: int):
        self.args, self.out, self.tok, self.device = args, out, tok, device
        self.settings, self.plan, self.items, self.rank, self.world = settings, plan, items, rank, world
        self.batch_size = args.batch_size
        self.part_path = os.path.join(out, S.PARTS_DIR, f"rank-{rank:05d}-of-{world:05d}.jsonl")
        self.entries: dict = {}
        self.committed_here = 0
        self._kill_after = int(os.environ.get(KILL_ENV, "-1"))

    @torch.no_grad()
    def encode(self, views: np.ndarray) -> np.ndarray:
        x = to_float_batch(views).to(self.device)
        ids = self.tok.encode(x).cpu().numpy()
        if ids.min() < 0 or ids.max() >= min(self.tok.codebook_size, 65536):
            raise RuntimeError(f"tokenizer returned ids outside [0, {self.tok.codebook_size})")
        return ids.astype(np.uint16)

    def maybe_die(self, writer: S.ShardWriter) -> None:
        """Fault-injection hook for tests: a hard exit in the middle of a shard (tmp file left)."""
        if 0 <= self._kill_after <= self.committed_here and writer.samples >= 1:
            sys.stderr.write(f"{KILL_ENV}: exiting hard mid-shard\n")
            sys.stderr.flush()
            os._exit(137)

    def open_part(self) -> None:
        """Start this rank's part file (header line), or keep an existing one minus a torn last line."""
        if not os.path.isfile(self.part_path):
            S.write_json_atomic(self.part_path, {**self.settings, "plan": self.plan, "rank": self.rank,
                                                 "world_size": self.world}, indent=None)
            return
        with open(self.part_path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def append_part(self, entry: dict) -> None:
        """One line per committed shard: appending keeps the cost per shard constant (not the whole file)."""
        with open(self.part_path, "a") as f:
            f.write(json.dumps({"shard": entry}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def my_shards(self) -> list:
        return list(range(self.rank, self.plan["num_shards"], self.world))

    def reuse_complete(self, mine: list) -> list:
        """Keep shards whose file matches an entry of any rank's part file; return the rest."""
        known: dict = {}
        for _, _, entries in read_parts(self.out):
            for e in entries:
                known.setdefault(e["name"], []).append(e)
        todo = []
        for j in mine:
            name = S.shard_name(j)
            e = matching_entry(os.path.join(self.out, name), known.get(name, []))
            if e is not None:
                self.entries[name] = e
            else:
                todo.append(j)
        for tmp in glob.glob(os.path.join(self.out, "shard-*.tar.tmp")):  # partial shards of killed runs
            if int(os.path.basename(tmp)[6:12]) in todo:
                os.remove(tmp)
        return todo

    def run(self) -> dict:
        os.makedirs(os.path.join(self.out, S.PARTS_DIR), exist_ok=True)
        self.open_part()
        todo = self.reuse_complete(self.my_shards())
        ips = self.plan["images_per_shard"]
        work = [(j, [(i, self.items[i]) for i in range(j * ips, min((j + 1) * ips, len(self.items)))]) for j in todo]
        flat = [(j, gi, it) for j, imgs in work for gi, it in imgs]
        reused = len(self.my_shards()) - len(todo)
        print(f"rank {self.rank}/{self.world}: {len(self.my_shards())} shards ({reused} already complete), "
              f"{len(flat)} images to tokenize on {self.device}", file=sys.stderr)
        self._process(work, flat)
        return self.summary()

    def _process(self, work: list, flat: list) -> None:
        a = self.args
        ds = _DecodeSet([it for _, _, it in flat], self.settings["preprocessing"]["image_size"], a.views, a.min_size)
        loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=a.workers, collate_fn=_collate,
                                             prefetch_factor=4 if a.workers else None)
        shard_iter = iter(work)
        builder = None
        bar = cli.progress(len(flat), f"rank {self.rank}")
        try:
            for chunk in loader:
                for pos, views, reason, transient in chunk:
                    j, gi, item = flat[pos]
                    if transient:
                        raise TransientInputError(
                            f"input {item.src} could not be read: {reason}. This may pass: shard {j} was not "
                            f"committed (the {self.committed_here} committed by this run are kept); rerun rank "
                            f"{self.rank} of {self.world} with the same command")
                    if builder is None:
                        jj, imgs = next(shard_iter)
                        builder = _ShardBuilder(self, jj, imgs)
                    assert builder.index == j
                    builder.add(gi, item, views, reason)
                    bar.update(1)
                    if builder.done():
                        self._commit(builder)
                        builder = None
            for jj, imgs in shard_iter:  # shards with no images cannot exist, but be safe
                self._commit(_ShardBuilder(self, jj, imgs))
        except BaseException:
            if builder is not None:
                builder.writer.abort()
            raise
        finally:
            bar.close()

    def _commit(self, builder: _ShardBuilder) -> None:
        entry = builder.commit()
        entry["committed_at"] = time.time()
        self.entries[entry["name"]] = entry
        self.append_part(entry)
        self.committed_here += 1

    def summary(self) -> dict:
        acc = accounting(self.entries.values())
        print(f"rank {self.rank}: images seen = written + skipped: {acc['images_seen']} = "
              f"{acc['images_written']} + {acc['images_skipped']} ({acc['samples_written']} samples in "
              f"{len(self.entries)} shards)", file=sys.stderr)
        return acc


def accounting(entries) -> dict:
    entries = list(entries)
    acc = {k: sum(e[k] for e in entries) for k in ("images_seen", "images_written", "images_skipped")}
    acc["samples_written"] = sum(e["samples"] for e in entries)
    return acc


# ----------------------------------------------------------------------------------------------
# Finalize
# ----------------------------------------------------------------------------------------------


def matching_entry(path: str, candidates: list, verify_hash: bool = True) -> Optional[dict]:
    """Of the entries recorded for one shard (several when runs with other world sizes left parts), the
    newest one that describes the file at ``path`` (size, then sha256); None if none does."""
    if not candidates or not os.path.isfile(path):
        return None
    size, sha = os.path.getsize(path), None
    for e in sorted(candidates, key=lambda e: e.get("committed_at", 0), reverse=True):
        if e["bytes"] != size:
            continue
        if not verify_hash:
            return e
        sha = sha or S.sha256_file(path)
        if sha == e["sha256"]:
            return e
    return None


def finalize(out: str, verify_hashes: bool = True, world_size: Optional[int] = None) -> dict:
    """Check that every shard of the plan is present and matches an entry; write manifest.json."""
    parts = read_parts(out)
    if not parts:
        raise JobError(f"nothing to finalize in {out!r}: no {S.PARTS_DIR}/rank-*.jsonl (run the ranks first)")
    first_path, first, _ = parts[0]
    keys = ("format", "tokenizer", "preprocessing", "plan")
    for p, d, _ in parts[1:]:
        diffs = _diff({k: d.get(k) for k in keys}, {k: first.get(k) for k in keys})
        if diffs:
            raise JobError(f"{p} and {first_path} disagree:\n  " + "\n  ".join(diffs[:10]))
    entries: dict = {}
    for _, _, part in parts:
        for e in part:
            entries.setdefault(e["name"], []).append(e)
    plan = first["plan"]
    # for messages: the world size of this finalize, else of the newest part file
    world = world_size or max(parts, key=lambda p: os.path.getmtime(p[0]))[1]["world_size"]
    problems, shards = [], []
    bar = cli.progress(plan["num_shards"], "finalize: checking shards", disable=plan["num_shards"] < 100, unit="shard")
    for j in range(plan["num_shards"]):  # reads every byte for its sha256: ~30 GB for ten-crop ImageNet
        bar.update(1)
        name, path = S.shard_name(j), os.path.join(out, S.shard_name(j))
        found = entries.get(name, [])
        e = matching_entry(path, found, verify_hashes)
        if not found:
            problems.append(f"{name}: not done (rank {j % world} of {world})")
        elif e is None and (not os.path.isfile(path) or all(c["bytes"] != os.path.getsize(path) for c in found)):
            problems.append(f"{name}: file missing or of the wrong size (rerun rank {j % world} of {world})")
        elif e is None:
            problems.append(f"{name}: sha256 differs from its entry (rerun rank {j % world} of {world})")
        else:
            shards.append(e)
    bar.close()
    if problems:
        raise JobError(f"cannot finalize {out!r}: {len(problems)} of {plan['num_shards']} shards are not "
                       "complete:\n  " + "\n  ".join(problems[:20]))
    acc = accounting(shards)
    if acc["images_seen"] != plan["source"]["num_inputs"] or acc["images_seen"] != acc["images_written"] + acc["images_skipped"]:
        raise JobError(f"accounting does not add up in {out!r}: {acc} vs {plan['source']['num_inputs']} inputs")
    hist: dict = {}
    skipped = []
    for e in shards:
        S.merge_counts(hist, e["class_counts"])
        skipped += e["skipped"]
    tok = first["tokenizer"]
    manifest = {
        "format": S.FORMAT, "tokenizer": tok, "preprocessing": first["preprocessing"],
        "codebook_size": tok["codebook_size"], "grid": tok["grid"], "prefix_tokens": tok["prefix_tokens"],
        "num_tokens": tok["num_tokens"],
        "dtype": "uint16", "source": plan["source"], "classes": plan.get("classes", []),
        "num_classes": plan["num_classes"],
        "shard_plan": {k: plan[k] for k in ("images_per_shard", "num_shards", "shuffle_seed")},
        "shards": [{k: e[k] for k in ("name", "samples", "bytes", "sha256", "images_written")} for e in shards],
        "num_samples": acc["samples_written"], "class_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "accounting": acc, "skipped": skipped, "empty_class_folders": plan.get("empty_class_folders", []),
    }
    S.write_json_atomic(os.path.join(out, S.MANIFEST), manifest)
    print(f"finalized {out}: {plan['num_shards']} shards, {acc['samples_written']} samples; images seen = "
          f"written + skipped: {acc['images_seen']} = {acc['images_written']} + {acc['images_skipped']}",
          file=sys.stderr)
    return manifest


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def run(args) -> dict:
    """Run one rank (or --finalize). All checks that can fail happen before any image is decoded."""
    if args.finalize:
        return finalize(args.out, world_size=args.world_size)
    if not args.input:
        raise JobError("--input is required (an ImageNet-style folder or WebDataset image shards)")
    if args.views not in VIEW_MODES:
        raise JobError(f"--views {args.views!r}: expected one of {sorted(VIEW_MODES)}")
    me = resolve_worker(args.rank, args.world_size)
    rank, world = me.worker, me.workers
    cfg = tokenizer_config(args.config, args.tokenizer_weights, args.image_size)
    num_classes = class_count(args.config, args.num_classes)
    device = launch.local_device(me, args.device)
    print(f"rank {rank} of {world} ({me.source}) on {device}", file=sys.stderr)
    tok, sha = load_tokenizer(cfg, device)
    if tok.codebook_size > 65536:
        raise JobError(f"codebook_size={tok.codebook_size} does not fit the uint16 shard format")
    settings = job_settings(cfg, tok, sha, args.views, args.min_size)
    os.makedirs(args.out, exist_ok=True)
    check_output_folder(args.out, settings, plan=None)
    try:
        listing = list_source(args.input, args.class_index)
    except InputError as e:
        raise JobError(str(e)) from None
    if not listing.items:
        raise JobError(f"input {args.input!r} holds no files to tokenize")
    items = check_class_range(listing, num_classes)
    if args.shuffle_seed >= 0:
        perm = np.random.default_rng(args.shuffle_seed).permutation(len(items))
        items = [items[i] for i in perm]
    nviews = len(VIEW_MODES[args.views])
    ips = args.images_per_shard or max(1, int(args.shard_size_mb * 2**20 // (S.sample_bytes(tok.num_tokens) * nviews)))
    plan = {"images_per_shard": ips, "num_shards": -(-len(items) // ips), "shuffle_seed": args.shuffle_seed,
            "source": listing.describe(), "classes": listing.classes, "empty_class_folders": listing.empty_classes,
            "num_classes": num_classes}
    check_output_folder(args.out, settings, plan)
    for cls in listing.empty_classes:
        print(f"warning: empty class folder {cls!r} (kept in the class index, listed in the manifest)", file=sys.stderr)
    if plan["num_shards"] < world:
        print(f"warning: only {plan['num_shards']} shards for {world} ranks; ranks >= {plan['num_shards']} have "
              "no work (lower --images-per-shard)", file=sys.stderr)
    job = TokenizeJob(args, args.out, tok, device, settings, plan, items, rank, world)
    acc = job.run()
    if world == 1:  # this process did every shard: write the manifest now rather than ask for a second command
        finalize(args.out, world_size=1)
    else:
        print(f"rank {rank} of {world} done; once every rank is: python data_prep/tokenize.py --finalize "
              f"--out {args.out}", file=sys.stderr)
    return acc


HELP = """\
Pre-tokenize images into WebDataset token shards for rear_ds training (method spec 7.3).

Inputs (--input): an ImageNet-style folder (root/<class>/<images>, class index = sorted folder order,
the standard ImageNet index; --class-index FILE overrides it), or WebDataset image shards (a folder
of .tar files or a brace pattern, samples with jpg/png + cls).

Tokenizer: --config CFG.yaml uses that file's `tokenizer:` section (name, weights, image_size and the
architecture knobs; other sections are ignored); without it the MaskGIT-VQGAN f16 256px defaults are
used. --tokenizer-weights and --image-size override the file. The weights file is required.

Preprocessing (as the reference): ADM center crop to the tokenizer's image_size, then --views:
  center        1 sample per image
  center+flip   2 samples: the crop and its horizontal mirror (default)
  ten-crop      10 samples: ADM crop to int(1.1*size), 4 corners + centre and their mirrors
                (torchvision TenCrop order; what RAR's published JSONL uses)

Output (--out): shard-NNNNNN.tar (one sample per view: <key>.tokens.npy uint16 grid, .cls, .view, .src),
per-rank records in _parts/, and after --finalize a manifest.json (tokenizer, preprocessing, shards
with sample counts and sha256, class histogram, every skipped input with its reason, accounting).
A run of one process (W = 1) finalizes by itself at its end.

Scale-out: rank r of W = array task * processes per task + process (rear_ds/launch.py): array tasks
from --rank/--world-size, else SLURM_ARRAY_TASK_ID/COUNT; processes of an srun step (SLURM_PROCID of
SLURM_STEP_NUM_TASKS) or a launcher (RANK/WORLD_SIZE), else one. Every rank runs the same command; then,
when W > 1, run once with --finalize --out DIR.
Reruns skip shards that are complete (sha256 checked) and redo missing or partial ones; the result
is byte-identical to an uninterrupted run. Bad inputs are skipped and listed, never fatal.

Example:
  python data_prep/tokenize.py --input /data/imagenet/train --out /data/tok/maskgit_cf \\
      --config configs/rear_l.yaml --tokenizer-weights ckpt/maskgitvq.bin --world-size 8 --rank 0
  python data_prep/tokenize.py --finalize --out /data/tok/maskgit_cf
"""


def build_parser():
    p = cli.parser(HELP, "data_prep/tokenize.py", "rear-tokenize")
    p.add_argument("--input", default="", help="ImageNet-style folder, folder of .tar image shards, or brace pattern")
    p.add_argument("--out", required=True, help="output folder for shards and manifest")
    p.add_argument("--class-index", default="", help="JSON list/mapping or text file (first word per line = "
                   "folder name, index = line number) overriding the sorted folder order")
    p.add_argument("--config", default="", help="YAML config whose `tokenizer:` section is used")
    p.add_argument("--tokenizer-weights", default="", help="tokenizer weights (.bin/.pt state dict or .safetensors)")
    p.add_argument("--image-size", type=int, default=0, help="override tokenizer.image_size (= crop size)")
    p.add_argument("--views", default="center+flip", choices=sorted(VIEW_MODES), help="views per image (default center+flip)")
    p.add_argument("--num-classes", type=int, default=0, help="class indices must lie in [0, N) (default: "
                   "model.num_classes of --config, else 1000); WebDataset samples outside are skipped and listed")
    p.add_argument("--min-size", type=int, default=0, help="skip (and list) images whose short side is smaller; "
                   "0 = off (default: small images are upsampled by the ADM crop, as in the reference)")
    p.add_argument("--images-per-shard", type=int, default=0, help="images per shard (overrides --shard-size-mb)")
    p.add_argument("--shard-size-mb", type=float, default=1024.0, help="target shard size in MiB (default 1024)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the input permutation before sharding "
                   "(-1 = keep sorted order); shards then hold a random mix of classes")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: Slurm variables, else 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of ranks (default: Slurm variables, else 1)")
    p.add_argument("--workers", type=int, default=4, help="parallel decode worker processes (0 = in-process)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per tokenizer forward pass")
    p.add_argument("--device", default="auto", help="auto (this process's GPU among those it sees if available, "
                   "else cpu), cpu, cuda:N")
    p.add_argument("--finalize", action="store_true", help="check all ranks' shards and write manifest.json "
                   "(needs only --out)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (JobError, S.ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_TRANSIENT if isinstance(e, TransientInputError) else 2
    return 0
