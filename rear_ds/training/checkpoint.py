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

Saving never leaves ranks in different collectives: every rank first checks the free space for the new
checkpoint (all ranks agree to skip it if one lacks room), DeepSpeed's writes record errors instead of raising
(so a failing rank walks through the same collectives as the others), and the ranks agree on the outcome.
Resuming hands files to DeepSpeed's ``torch.load(weights_only=False)`` only after :func:`verify_no_code`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from rear_ds.training import signals

log = logging.getLogger("rear_ds")

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


UNIVERSAL_WAIT_S = 6 * 3600  # the other ranks' wait for rank 0's universal conversion


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one
    _fsync_path(os.path.dirname(path) or ".")  # the rename itself


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
# Trust boundary: DeepSpeed unpickles checkpoints with torch.load(weights_only=False)
# --------------------------------------------------------------------------------------

# Classes DeepSpeed 0.19 itself pickles into checkpoints (besides what torch's weights-only unpickler allows);
# each is rebuilt from plain data (an Enum value, an attribute dict, dataclass fields), so referencing them runs
# no code. Checked against checkpoints of every ZeRO stage, bf16 and fp16, with and without offload.
DEEPSPEED_SAFE_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass (numel, start) in ZeRO-1/2 optimizer states
    "torch.torch_version.TorchVersion",
})


class CheckpointSecurityError(RuntimeError):
    """A checkpoint file references code (pickle globals) that a checkpoint written by rear_ds never does."""


def checkpoint_pickles(tag_dir: str) -> list:
    """The files of a checkpoint folder that DeepSpeed would unpickle, sorted."""
    return sorted(os.path.join(root, name) for root, _, files in os.walk(tag_dir) for name in files
                  if name.endswith((".pt", ".pth", ".bin")))


def verify_no_code(tag_dir: str, paths: Optional[list] = None) -> None:
    """Refuse a checkpoint folder whose ``*.pt`` files would run code when unpickled.

    DeepSpeed's ``load_checkpoint`` (and ds_to_universal, zero_to_fp32) call ``torch.load(weights_only=False)``,
    i.e. full pickle. Before handing a folder to them, every pickle in it is scanned (opcodes only, no object
    is built, no tensor data read) for the globals it would import; anything outside torch's weights-only set
    and :data:`DEEPSPEED_SAFE_GLOBALS` (for example ``os.system``, ``builtins.exec``) is refused, naming the file.
    ``paths``: only these files (default: all of :func:`checkpoint_pickles`); a listed file that cannot be read
    is refused too."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for path in checkpoint_pickles(tag_dir) if paths is None else paths:
        try:
            bad = [g for g in get_unsafe_globals_in_checkpoint(path) if g not in DEEPSPEED_SAFE_GLOBALS]
        except Exception as e:  # not a torch zip file, a malformed pickle, ...
            raise CheckpointSecurityError(f"checkpoint file {path} cannot be checked safely ({e}); refusing "
                                          "to unpickle it") from None
        if bad and os.environ.get("REAR_TRUST_CHECKPOINT_PICKLES") == "1":
            log.warning("checkpoint file %s references %s; loading it anyway (REAR_TRUST_CHECKPOINT_PICKLES=1)",
                        path, ", ".join(bad[:5]))
        elif bad:
            raise CheckpointSecurityError(
                f"checkpoint file {path} references code ({', '.join(bad[:5])}): a checkpoint written by "
                "rear_ds never does. Refusing to load it (DeepSpeed would unpickle it with "
                "weights_only=False); only resume from checkpoints you wrote yourself. If you did write it "
                "(e.g. with another DeepSpeed version that pickles a new class), set "
                "REAR_TRUST_CHECKPOINT_PICKLES=1 to load it anyway.")


def verify_no_code_on_all_ranks(tag_dir: str) -> None:
    """:func:`verify_no_code` split between the ranks (a ZeRO-3 checkpoint on 256 ranks has 512 files: scanned
    once in all, not once per rank); raises on every rank if any rank's share was refused. Rank 0 lists the
    folder for all (listings can differ between the nodes' NFS clients for a while: no file may fall between
    two shares)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    listing = [checkpoint_pickles(tag_dir) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    try:
        verify_no_code(tag_dir, paths=listing[0][rank::world])
        problem = None
    except CheckpointSecurityError as e:
        problem = str(e)
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    refused = [p for p in problems if p]
    if refused:
        raise CheckpointSecurityError(refused[0] + (f" ({len(refused)} ranks refused a file of their share)"
                                                    if len(refused) > 1 else ""))


# --------------------------------------------------------------------------------------
# Per-rank state: RNGs
# --------------------------------------------------------------------------------------


def rng_state(objective_gen: Optional[torch.Generator]) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        # this process's device only: with another GPUs-per-node layout the same rank drives another index
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "objective": objective_gen.get_state() if objective_gen is not None else None,
    }
    return state


def set_rng_state(state: dict, objective_gen: Optional[torch.Generator]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # the current device (set to LOCAL_RANK at start)
    if objective_gen is not None and state.get("objective") is not None:
        objective_gen.set_state(state["objective"])


def rank_state_entry(local: dict, zero_stage: int) -> dict:
    """The client-state entry that carries this rank's state (RNGs, reader position) into the checkpoint.
    Under ZeRO-3 every rank writes a model-states file of its own and reads its own back: its state alone
    goes there. Otherwise only rank 0's file is written and every rank reads it: it carries all ranks' states
    (gathered), which under ZeRO-3 would be world x world copies."""
    if zero_stage == 3:
        return {"rank_state": {"rank": dist.get_rank(), **local}}
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return {"rank_states": out}


def own_rank_state(client: dict, rank: int, world: int) -> Optional[dict]:
    """This rank's saved state if the checkpoint was written by ``world`` processes, else None."""
    if client.get("world_size") != world:
        return None
    if client.get("rank_state") is not None:  # ZeRO-3: this rank's own file
        own = client["rank_state"]
        if own.get("rank") != rank:
            raise RuntimeError(f"rank {rank} loaded the checkpoint state of rank {own.get('rank')}")
        return own
    states = client.get("rank_states")
    return states[rank] if states is not None and len(states) == world else None


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def _gather_problems(problem: Optional[str]) -> list:
    """Every rank's problem (None = fine) on every rank: one collective, so all ranks take the same branch."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, problem)
    return [f"rank {r}: {p}" for r, p in enumerate(out) if p]


def _describe(error: OSError) -> str:
    why = ("no space left on device" if error.errno == errno.ENOSPC
           else f"{errno.errorcode.get(error.errno, error.errno)}: {error.strerror or error}")
    return f"{why} ({getattr(error, 'filename', None) or error})"


SPACE_MARGIN = 1.25  # free space needed = margin x the estimated size of the new checkpoint


def estimate_bytes(ckpt_dir: str, num_params: int) -> tuple:
    """(bytes, how) the next checkpoint will take on this filesystem: the previous complete checkpoint's size,
    or, for the first one, 16 bytes per parameter (fp32 master weights + two Adam moments + 16-bit weights).
    Every rank of the job is assumed to write to the same filesystem (the usual shared checkpoint folder)."""
    try:
        tags = complete_tags(ckpt_dir)
        if tags:
            prev = os.path.join(ckpt_dir, tags[-1])
            total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(prev) for f in fs)
            return total, f"size of the previous checkpoint {tags[-1]}"
        why = "first checkpoint"
    except OSError as e:
        why = f"the previous checkpoint's size could not be read: {_describe(e)}"
    return 16 * num_params, f"16 bytes x {num_params} parameters ({why})"


def check_space(ckpt_dir: str, need: int, how: str) -> Optional[str]:
    """None if the checkpoint folder's filesystem has room for ``need`` bytes (x SPACE_MARGIN), else the reason
    (``how``: how ``need`` was estimated, see :func:`estimate_bytes`)."""
    need = int(need * SPACE_MARGIN)
    free = shutil.disk_usage(ckpt_dir).free
    if free >= need:
        return None
    return (f"only {free / 1e9:.3f} GB free in {ckpt_dir}, the checkpoint needs about {need / 1e9:.3f} GB "
            f"({how} x margin {SPACE_MARGIN})")


class _DeferredWriteErrors:
    """Make DeepSpeed's file writes (all go through ``engine.checkpoint_engine.save``) record an OSError instead
    of raising it, so that a rank whose write fails still walks through every collective of save_checkpoint
    (ZeRO-3 has several) exactly like the others; the ranks agree on the failure afterwards."""

    def __init__(self, engine):
        self.ce = getattr(engine, "checkpoint_engine", None)
        self.errors: list = []

    def __enter__(self):
        if self.ce is not None:
            real = self.ce.save

            def guarded(state_dict, path, *a, **kw):
                if self.errors:
                    return None  # this checkpoint is lost already: do not fill the disk further
                try:
                    out = real(state_dict, path, *a, **kw)
                    _fsync_path(path)  # on disk before COMPLETE names it (a node crash after the commit)
                    return out
                except OSError as e:
                    self.errors.append(e)
                    return None

            self.ce.save = guarded
        return self

    def __exit__(self, *exc):
        if self.ce is not None:
            self.ce.__dict__.pop("save", None)  # back to the class method
        return False


def save(engine, ckpt_dir: str, step: int, client_state: dict, meta: dict, config_json: str,
         keep_last: int) -> bool:
    """Write checkpoint ``step_<step>`` on all ranks; commit it (COMPLETE, then ``latest``) only if every
    rank succeeded. Returns False (on every rank) when it was not written: when some rank's filesystem lacks
    the space for it (checked first, nothing is written), or after a failed write (e.g. disk full): the partial
    folder is removed, ``latest`` and the previous checkpoints are untouched, and the in-memory training state
    is unchanged (saving only reads it), so training may go on. Every rank takes the same collectives whatever
    fails where, so a failure never leaves ranks waiting for each other."""
    rank = dist.get_rank()
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    if read_meta(path):
        return True  # already saved at this step (e.g. a periodic save right before the final one)
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    # rank 0 sizes the previous checkpoint (a walk over its files: once, not on every rank); each rank then
    # checks the free space it sees
    estimate = [estimate_bytes(ckpt_dir, num_params) if rank == 0 else None]
    dist.broadcast_object_list(estimate, src=0)
    try:
        problem = check_space(ckpt_dir, *estimate[0])
    except OSError as e:
        problem = f"cannot check free space in {ckpt_dir}: {_describe(e)}"
    problems = _gather_problems(problem)
    if problems:
        log.error("checkpoint %s SKIPPED, nothing written: %s. 'latest' still names the previous complete "
                  "checkpoint and training state is unchanged; free some space.", path, "; ".join(problems))
        return False
    if rank == 0 and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)  # a partial leftover of an earlier attempt
    error: Optional[OSError] = None
    t0 = time.time()
    with _DeferredWriteErrors(engine) as deferred:
        try:
            engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
        except OSError as e:
            # A write outside the checkpoint engine failed (e.g. makedirs). DeepSpeed ends save_checkpoint with
            # a barrier that this rank skipped by raising; join it so the others are not left waiting.
            error = e
            dist.barrier()
    error = error or (deferred.errors[0] if deferred.errors else None)
    problems = _gather_problems(_describe(error) if error else None)
    if not problems:  # every rank wrote its part: rank 0 commits, and the ranks agree on how that went
        commit_problem = None
        if rank == 0:
            try:
                with open(os.path.join(path, "rear_config.json"), "w") as f:
                    f.write(config_json)
                _fsync_write(os.path.join(path, COMPLETE), json.dumps({**meta, "step": step, "tag": tag,
                                                                       "time": time.time()}))
                _fsync_write(os.path.join(ckpt_dir, LATEST), tag + "\n")
            except OSError as e:
                commit_problem = _describe(e)
                try:  # never leave a COMPLETE marker whose `latest` did not move
                    os.remove(os.path.join(path, COMPLETE))
                except OSError:
                    pass
        problems = _gather_problems(commit_problem)
    if problems:
        log.error("checkpoint %s could NOT be written (%s). It is discarded; 'latest' still names the previous "
                  "complete checkpoint and training state is unchanged.", path, "; ".join(problems))
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
    failed = dst + ".FAILED"
    if dist.get_rank() == 0 and not read_meta(dst):
        shutil.rmtree(dst, ignore_errors=True)
        if os.path.exists(failed):
            os.remove(failed)
        workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
        log.info("process count changed: converting %s to a universal checkpoint %s", src, dst)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
               "--output_folder", dst, "--num_extract_workers", workers, "--num_merge_workers", workers]
        res = signals.run_helper(cmd)  # a Slurm SIGUSR1 must not kill the conversion
        if res.returncode != 0:
            msg = (f"ds_to_universal failed on {src} (exit {res.returncode}):\n"
                   f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
            _fsync_write(failed, msg)  # tells the waiting ranks
            raise RuntimeError(msg)
        _fsync_write(os.path.join(dst, COMPLETE), json.dumps({**read_meta(src), "universal": True}))
    else:
        # The conversion of a large model can outlast the collective timeout (an NCCL barrier would kill
        # the waiting ranks): wait for rank 0's COMPLETE (or FAILED) marker on the shared file system.
        t0 = time.time()
        while not read_meta(dst):
            if os.path.exists(failed):
                raise RuntimeError(f"rank 0 could not convert {src} to a universal checkpoint: see {failed}")
            if time.time() - t0 > UNIVERSAL_WAIT_S:
                raise RuntimeError(f"no universal checkpoint {dst} after {UNIVERSAL_WAIT_S} s (is rank 0 alive, "
                                   f"and {ckpt_dir} on a file system shared by all nodes?)")
            time.sleep(2.0)
    dist.barrier()  # everyone arrives within seconds now
    return utag
