"""Checkpoints that are either complete or ignored, and resuming from them.

Layout under ``<train.out_dir>/checkpoints/``::

    step_00000020/            one DeepSpeed checkpoint (model/optimizer/scheduler shards + client state)
        COMPLETE              JSON {step, world_size, zero_stage, ...}; written by rank 0 only after EVERY
                              rank finished writing. A folder without it is partial and is never loaded.
        rear_config.json      the resolved run config (rear_ds.export reads it)
    step_00000020_universal/  made on demand by ds_to_universal when the process count changes
    latest                    the tag of the newest complete checkpoint (DeepSpeed's format, one line);
                              replaced atomically (write + fsync + rename) after COMPLETE exists.

The client state holds the optimizer step, samples seen, the W&B run id, ``universal_checkpoint_info``
(needed by ds_to_universal) and, gathered from every rank, its RNG states (python, numpy, torch, cuda,
the objective's generator) and its data reader position. DeepSpeed writes the client state from rank 0
only, which is why the per-rank parts are gathered first.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("rear_ds")

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(tag_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(tag_dir, COMPLETE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------
# Finding what to resume from
# --------------------------------------------------------------------------------------


@dataclass
class ResumePoint:
    tag: str
    step: int
    world_size: int
    zero_stage: int


def complete_tags(ckpt_dir: str) -> list:
    """Complete checkpoint tags, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and read_meta(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def find_resume(ckpt_dir: str) -> Optional[ResumePoint]:
    """The checkpoint named by ``latest`` if complete, else the newest complete one, else None."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    tag = None
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            named = f.read().strip()
        if named in tags:
            tag = named
        else:
            log.warning("checkpoints/latest names %r, which is not a complete checkpoint; using %r",
                        named, tags[-1])
    except OSError:
        log.warning("checkpoints/latest is missing; using the newest complete checkpoint %r", tags[-1])
    tag = tag or tags[-1]
    meta = read_meta(os.path.join(ckpt_dir, tag))
    return ResumePoint(tag, int(meta["step"]), int(meta["world_size"]), int(meta["zero_stage"]))


def clean_partial(ckpt_dir: str) -> None:
    """Rank 0 at start: remove checkpoint folders that never got their COMPLETE marker (a crash or a kill
    while writing). They are never loaded; deleting them frees space and lets the tag be reused."""
    if not os.path.isdir(ckpt_dir):
        return
    for t in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, t)
        if os.path.isdir(path) and (TAG_RE.match(t) or t.endswith("_universal")) and not read_meta(path):
            log.warning("removing partial checkpoint %s (no %s marker: its writing was interrupted)", path,
                        COMPLETE)
            shutil.rmtree(path, ignore_errors=True)


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (and never the one ``latest`` names)."""
    tags = complete_tags(ckpt_dir)
    for t in tags[:-keep_last]:
        for path in (os.path.join(ckpt_dir, t + "_universal"), os.path.join(ckpt_dir, t)):
            if os.path.isdir(path):
                # Drop the marker first: an interrupted rmtree leaves a partial folder, never a "complete" one.
                try:
                    os.remove(os.path.join(path, COMPLETE))
                except OSError:
                    pass
                shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Per-rank state: RNGs
# --------------------------------------------------------------------------------------


def rng_state(objective_gen: Optional[torch.Generator]) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "objective": objective_gen.get_state() if objective_gen is not None else None,
    }
    return state


def set_rng_state(state: dict, objective_gen: Optional[torch.Generator]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if objective_gen is not None and state.get("objective") is not None:
        objective_gen.set_state(state["objective"])


def gather_rank_states(local: dict) -> list:
    """Every rank's small state dict, on every rank (DeepSpeed stores client state from rank 0 only)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def save(engine, ckpt_dir: str, step: int, client_state: dict, meta: dict, config_json: str,
         keep_last: int) -> bool:
    """Write checkpoint ``step_<step>`` on all ranks; commit it (COMPLETE, then ``latest``) only if every
    rank succeeded. Returns False after a failed write (e.g. disk full): the partial folder is removed,
    ``latest`` and the previous checkpoints are untouched, and the in-memory training state is unchanged
    (saving only reads it), so training may go on."""
    rank = dist.get_rank()
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    if read_meta(path):
        return True  # already saved at this step (e.g. a periodic save right before the final one)
    if rank == 0 and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)  # a partial leftover of an earlier attempt
    error: Optional[OSError] = None
    t0 = time.time()
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    except OSError as e:
        error = e
        # DeepSpeed ends save_checkpoint with a barrier that this rank skipped by raising; join it so the
        # other ranks are not left waiting, then agree below that the save failed.
        dist.barrier()
    failed = _any_rank(error is not None)
    if not failed and rank == 0:
        try:
            with open(os.path.join(path, "rear_config.json"), "w") as f:
                f.write(config_json)
            _fsync_write(os.path.join(path, COMPLETE), json.dumps({**meta, "step": step, "tag": tag,
                                                                   "time": time.time()}))
            _fsync_write(os.path.join(ckpt_dir, LATEST), tag + "\n")
        except OSError as e:
            error = e
            try:  # never leave a COMPLETE marker whose `latest` did not move
                os.remove(os.path.join(path, COMPLETE))
            except OSError:
                pass
    failed = _any_rank(error is not None)
    if failed:
        if error is not None:
            why = ("no space left on device" if error.errno == errno.ENOSPC
                   else f"{errno.errorcode.get(error.errno, error.errno)}: {error.strerror or error}")
            log.error("rank %d: checkpoint %s could NOT be written (%s: %s). It is discarded; 'latest' still "
                      "names the previous complete checkpoint and training state is unchanged.",
                      rank, path, why, getattr(error, "filename", None) or error)
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # free the space; it would be ignored anyway
        dist.barrier()
        return False
    if rank == 0:
        prune(ckpt_dir, keep_last)
        log.info("checkpoint %s complete (%.1f s)", path, time.time() - t0)
    dist.barrier()
    return True


# --------------------------------------------------------------------------------------
# Resuming on another number of processes: DeepSpeed universal checkpoints
# --------------------------------------------------------------------------------------


def ensure_universal(ckpt_dir: str, tag: str) -> str:
    """Convert ``tag`` with ``deepspeed.checkpoint.ds_to_universal`` once (rank 0; the others wait) and
    return the universal tag. The result gets its own COMPLETE marker, so an interrupted conversion is
    redone next time."""
    utag = tag + "_universal"
    src, dst = os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, utag)
    if dist.get_rank() == 0 and not read_meta(dst):
        shutil.rmtree(dst, ignore_errors=True)
        log.info("process count changed: converting %s to a universal checkpoint %s", src, dst)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
               "--output_folder", dst, "--num_extract_workers", "1", "--num_merge_workers", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {src} (exit {res.returncode}):\n"
                               f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        _fsync_write(os.path.join(dst, COMPLETE), json.dumps({**read_meta(src), "universal": True}))
    dist.barrier()
    return utag
