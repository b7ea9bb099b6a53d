"""Checkpoints that are either complete or ignored, and resuming from them.

Layout under ``<train.out_dir>/checkpoints/``::

    step_00000020/            one DeepSpeed checkpoint (model/optimizer/scheduler shards + client state)
        COMPLETE              JSON {step, world_size, zero_stage, ...}; written by rank 0 only after EVERY
                              rank finished writing. A folder without it is partial and is never loaded.
        rear_config.json      the resolved run config (rear_ds.export reads it)
    step_00000020_universal/  made on demand by ds_to_universal when the process count or ZeRO stage changes
    latest                    the tag of the newest complete checkpoint (DeepSpeed's format, one line);
                              replaced atomically (write + fsync + rename) after COMPLETE exists.
    *.deleting-*              folders being deleted in the background (pruned, or partial leftovers)

The client state holds the optimizer step, samples seen, the W&B run id, ``universal_checkpoint_info``
(needed by ds_to_universal) and, gathered from every rank, its RNG states (python, numpy, torch, cuda,
the objective's generator) and its data reader position. DeepSpeed writes the client state from rank 0
only, which is why the per-rank parts are gathered first.

Saving never leaves ranks in different collectives: every rank first checks the free space for the new
checkpoint (all ranks agree to skip it if one lacks room), DeepSpeed's writes record errors instead of raising
(so a failing rank walks through the same collectives as the others), and the ranks agree on the outcome.
Rank-0-only work that can take long on a big shared file system (deleting old checkpoints) runs in a
background thread: no other rank waits for it inside a collective, whose timeout it would count against.
Resuming hands files to DeepSpeed's ``torch.load(weights_only=False)`` only after :func:`verify_no_code`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import queue
import random
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from rear_ds.data.shards import write_text_atomic
from rear_ds.training import launch_env, signals

log = logging.getLogger("rear_ds")

COMPLETE = "COMPLETE"
LATEST = "latest"
FAILED_SUFFIX = "_universal.FAILED"  # rank 0 could not convert <tag> to a universal checkpoint
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


def read_latest(ckpt_dir: str) -> Optional[str]:
    """The tag ``latest`` names, None if it is missing or empty."""
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def find_resume(ckpt_dir: str) -> Optional[ResumePoint]:
    """The checkpoint named by ``latest`` if complete, else the newest complete one, else None."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    named = read_latest(ckpt_dir)
    tag = named if named in tags else tags[-1]
    if named is None:
        log.warning("checkpoints/latest is missing; using the newest complete checkpoint %r", tag)
    elif named != tag:
        log.warning("checkpoints/latest names %r, which is not a complete checkpoint; using %r", named, tag)
    meta = read_meta(os.path.join(ckpt_dir, tag))
    return ResumePoint(tag, int(meta["step"]), int(meta["world_size"]), int(meta["zero_stage"]))


def clean_partial(ckpt_dir: str) -> None:
    """Rank 0 at start: remove checkpoint folders that never got their COMPLETE marker (a crash or a kill
    while writing), leftovers of interrupted background deletions, and the FAILED markers of earlier universal
    conversions (a new conversion is tried). Partial folders are never loaded; deleting them frees space and
    lets the tag be reused. The deleting itself runs in the background (see :func:`discard`)."""
    if not os.path.isdir(ckpt_dir):
        return
    for t in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, t)
        if t.endswith(FAILED_SUFFIX) and os.path.isfile(path):
            log.info("removing %s (an earlier universal conversion failed; it is tried again)", path)
            os.remove(path)
        elif DELETING in t and os.path.isdir(path):
            discard(path)
        elif os.path.isdir(path) and (TAG_RE.match(t) or t.endswith("_universal")) and not read_meta(path):
            log.warning("removing partial checkpoint %s (no %s marker: its writing was interrupted)", path,
                        COMPLETE)
            discard(path)


def prune(ckpt_dir: str, keep_last: int) -> list:
    """Keep the checkpoint ``latest`` names and the ``keep_last - 1`` complete ones before it; hand the others to
    the background deleter and return their tags. Complete checkpoints of steps after ``latest`` come from an
    abandoned trajectory (``latest`` was moved back by hand, or a crash fell between COMPLETE and ``latest``):
    they go too, with a warning, since a later resume could otherwise pick one of them up."""
    tags = complete_tags(ckpt_dir)
    latest = read_latest(ckpt_dir)
    if latest not in tags:
        return []  # nothing trustworthy to keep by: delete nothing
    upto = tags[:tags.index(latest) + 1]
    keep = set(upto[-max(1, keep_last):])
    gone = [t for t in tags if t not in keep]
    for t in gone:
        if t not in upto:
            log.warning("deleting checkpoint %s: it is newer than %s, which 'latest' names (an abandoned "
                        "trajectory)", os.path.join(ckpt_dir, t), latest)
        for path in (os.path.join(ckpt_dir, t + "_universal"), os.path.join(ckpt_dir, t)):
            if os.path.isdir(path):
                discard(path)
    return gone


# Deleting a checkpoint of a multi-billion-parameter model on a shared file system can take minutes. Rank 0
# first renames the folder (one metadata operation; from then on it is no checkpoint), then deletes it in a
# background thread, so the other ranks never wait for it inside a collective.
DELETING = ".deleting-"
_deleter: "queue.Queue[str]" = queue.Queue()
_deleter_thread: Optional[threading.Thread] = None


def discard(path: str) -> None:
    """Rename ``path`` out of the way (atomic) and delete it in the background; :func:`wait_for_deletions`
    waits for the end. An interrupted deletion leaves a ``*.deleting-*`` folder, removed at the next start."""
    global _deleter_thread
    if DELETING not in os.path.basename(path):
        trash = f"{path}{DELETING}{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except OSError as e:
            log.warning("could not move %s away for deletion (%s): deleting it in place", path, e)
            shutil.rmtree(path, ignore_errors=True)
            return
        path = trash
    _deleter.put(path)
    if _deleter_thread is None:
        _deleter_thread = threading.Thread(target=_delete_forever, name="rear-ckpt-deleter", daemon=True)
        _deleter_thread.start()
        # a finished run leaves no half-deleted folder; after a stop or an error the next start finishes it
        # (waiting here could outlast Slurm's grace time and lose the exit code)
        launch_env.at_exit(lambda code: wait_for_deletions() if code == 0 else None)


def _delete_forever() -> None:
    while True:
        path = _deleter.get()
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            _deleter.task_done()


def wait_for_deletions() -> None:
    """Block until every folder handed to :func:`discard` is gone (rank 0, after the last collective)."""
    _deleter.join()


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


def own_rank_state(client: dict, rank: int, world: int, universal: bool) -> Optional[dict]:
    """This rank's saved state if the checkpoint was written by ``world`` processes, else None. Through a
    universal checkpoint every rank reads rank 0's model-states file: only the gathered form (ZeRO-0/1/2)
    holds every rank's state there, so all ranks continue exactly or none does."""
    if client.get("world_size") != world:
        return None
    if client.get("rank_state") is not None:  # ZeRO-3: this rank's own file
        if universal:
            return None
        own = client["rank_state"]
        if own.get("rank") != rank:
            raise RuntimeError(f"rank {rank} loaded the checkpoint state of rank {own.get('rank')}")
        return own
    states = client.get("rank_states")
    return states[rank] if states is not None and len(states) == world else None


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def _describe(error: BaseException, path: Optional[str] = None) -> str:
    if isinstance(error, OSError):
        why = ("no space left on device" if error.errno == errno.ENOSPC
               else f"{errno.errorcode.get(error.errno, error.errno)}: {error.strerror or error}")
        return f"{why} ({getattr(error, 'filename', None) or path or error})"
    # torch.save turns a failed write (ENOSPC, EDQUOT, EFBIG) into a RuntimeError without the errno
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return (f"writing {path or 'a checkpoint file'} failed ({type(error).__name__}: {text}; torch.save reports a full "
            "disk, an exceeded quota or a file-size limit this way)")


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
    """Make DeepSpeed's writes inside ``save_checkpoint`` record their exception instead of raising it, so that a
    rank whose write fails still walks through every collective of save_checkpoint (ZeRO-3 has several; its
    last, an all_gather of the persistent parameters, comes after rank 0 copies the recovery scripts) exactly
    like the others; the ranks agree on the failure afterwards. Wrapped: the checkpoint engine's ``save`` and
    ``makedirs`` and the engine's recovery-script copy (every file DeepSpeed 0.19 writes while saving). Any
    exception counts: torch.save reports a full disk or a quota as RuntimeError, not OSError."""

    def __init__(self, engine):
        self.targets = [(engine.checkpoint_engine, "save"), (engine.checkpoint_engine, "makedirs"),
                        (engine, "_copy_recovery_script")]
        self.errors: list = []  # (path, exception)

    def __enter__(self):
        for obj, name in self.targets:
            setattr(obj, name, self._guard(getattr(obj, name), fsync=name == "save"))
        return self

    def _guard(self, real, fsync: bool):
        def guarded(*args, **kwargs):
            path = kwargs.get("path") or next((a for a in args if isinstance(a, str)), None)
            if self.errors:
                return None  # this checkpoint is lost already: do not fill the disk further
            try:
                out = real(*args, **kwargs)
                if fsync:
                    _fsync_path(path)  # on disk before COMPLETE names it (a node crash after the commit)
                return out
            except Exception as e:
                self.errors.append((path, e))
                return None
        return guarded

    def __exit__(self, *exc):
        for obj, name in self.targets:
            obj.__dict__.pop(name, None)  # back to the class's method
        return False


def save(engine, ckpt_dir: str, step: int, client_state: dict, meta: dict, config_json: str,
         keep_last: int) -> bool:
    """Write checkpoint ``step_<step>`` on all ranks; commit it (``rear_config.json`` and COMPLETE fsynced, then
    ``latest``) only if every rank succeeded. Returns False (on every rank) when it was not written: when some
    rank's filesystem lacks the space for it (checked first, nothing is written), or after a failed write (disk
    full, quota, file-size limit): the partial folder is removed, ``latest`` and the previous checkpoints are
    untouched, and the in-memory training state is unchanged (saving only reads it), so training may go on.
    Every rank takes the same collectives whatever fails where, so a failure never leaves ranks waiting for
    each other. A folder of the same tag left by an earlier run (a crash between COMPLETE and ``latest``, or a
    trajectory abandoned by moving ``latest`` back) is replaced: this run's state is the one ``latest`` will name."""
    rank = dist.get_rank()
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    # rank 0 sizes the previous checkpoint (a walk over its files: once, not on every rank); each rank then
    # checks the free space it sees
    estimate = [estimate_bytes(ckpt_dir, num_params) if rank == 0 else None]
    dist.broadcast_object_list(estimate, src=0)
    try:
        problem = check_space(ckpt_dir, *estimate[0])
    except OSError as e:
        problem = f"cannot check free space in {ckpt_dir}: {_describe(e)}"
    problems = launch_env.gather_problems(problem)
    if problems:
        log.error("checkpoint %s SKIPPED, nothing written: %s. 'latest' still names the previous complete "
                  "checkpoint and training state is unchanged; free some space.", path, "; ".join(problems))
        return False
    if rank == 0 and os.path.isdir(path):
        discard(path)  # an earlier run's folder of this tag, complete or not
    t0 = time.time()
    with _DeferredWriteErrors(engine) as deferred:
        # What still raises here left this rank at an unknown point of DeepSpeed's collectives: it must not
        # rejoin them (it would pair with the wrong one and hang), so it ends the run; the peers see it go.
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    failed = deferred.errors[0] if deferred.errors else None
    problems = launch_env.gather_problems(_describe(failed[1], failed[0]) if failed else None)
    if not problems:  # every rank wrote its part: rank 0 commits, and the ranks agree on how that went
        commit_problem = None
        if rank == 0:
            try:
                write_text_atomic(os.path.join(path, "rear_config.json"), config_json)
                write_text_atomic(os.path.join(path, COMPLETE), json.dumps({**meta, "step": step, "tag": tag,
                                                                       "time": time.time()}))
                write_text_atomic(os.path.join(ckpt_dir, LATEST), tag + "\n")
            except OSError as e:
                commit_problem = _describe(e)
                try:  # never leave a COMPLETE marker whose `latest` did not move
                    os.remove(os.path.join(path, COMPLETE))
                except OSError:
                    pass
        problems = launch_env.gather_problems(commit_problem)
    if problems:
        log.error("checkpoint %s could NOT be written (%s). It is discarded; 'latest' still names the previous "
                  "complete checkpoint and training state is unchanged.", path, "; ".join(problems))
        if rank == 0:
            discard(path)  # free the space; it would be ignored anyway
        return False
    if rank == 0:  # in the background: no rank waits for the deleting
        prune(ckpt_dir, keep_last)
        log.info("checkpoint %s complete (%.1f s)", path, time.time() - t0)
    return True


# --------------------------------------------------------------------------------------
# Resuming on another number of processes: DeepSpeed universal checkpoints
# --------------------------------------------------------------------------------------


def ensure_universal(ckpt_dir: str, tag: str) -> str:
    """Convert ``tag`` with ``deepspeed.checkpoint.ds_to_universal`` once (rank 0; the others wait) and
    return the universal tag. The result gets its own COMPLETE marker, so an interrupted conversion is
    redone next time. A failure is told to the waiting ranks by ``<tag>_universal.FAILED``, which carries
    this attempt's id: a marker left by an earlier attempt (which another rank may read before rank 0 removes
    it, or see for a while longer through an NFS client's cache) is never taken for this attempt's."""
    utag = tag + "_universal"
    src, dst = os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, utag)
    failed = os.path.join(ckpt_dir, tag + FAILED_SUFFIX)
    attempt = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(attempt, src=0)  # all ranks are here together: quick
    attempt = attempt[0]
    if dist.get_rank() == 0 and not read_meta(dst):
        if os.path.isdir(dst):
            discard(dst)
        workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
        log.info("converting %s to a universal checkpoint %s", src, dst)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
               "--output_folder", dst, "--num_extract_workers", workers, "--num_merge_workers", workers]
        res = signals.run_helper(cmd)  # Slurm's SIGUSR1 / SIGTERM to every process must not kill the conversion
        if res.returncode != 0:
            msg = (f"ds_to_universal failed on {src} (exit {res.returncode}):\n"
                   f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
            write_text_atomic(failed, json.dumps({"attempt": attempt, "error": msg}))  # tells the waiting ranks
            raise RuntimeError(msg)
        write_text_atomic(os.path.join(dst, COMPLETE), json.dumps({**read_meta(src), "universal": True}))
    else:
        # The conversion of a large model can outlast the collective timeout (an NCCL barrier would kill
        # the waiting ranks): wait for rank 0's COMPLETE (or this attempt's FAILED) marker on the file system.
        t0 = time.time()
        while not read_meta(dst):
            if _failed_attempt(failed) == attempt:
                raise RuntimeError(f"rank 0 could not convert {src} to a universal checkpoint: see {failed}")
            if time.time() - t0 > UNIVERSAL_WAIT_S:
                raise RuntimeError(f"no universal checkpoint {dst} after {UNIVERSAL_WAIT_S} s (is rank 0 alive, "
                                   f"and {ckpt_dir} on a file system shared by all nodes?)")
            time.sleep(2.0)
    if dist.get_rank() == 0:
        _universal_for_every_stage(dst)
    dist.barrier()  # everyone arrives within seconds now
    return utag


def _universal_for_every_stage(udir: str) -> None:
    """Make a universal checkpoint loadable under every ZeRO stage (rank 0, idempotent). DeepSpeed 0.19's
    loaders expect what ds_to_universal writes for a source of THEIR stage, and the two differ:
      - rank 0's model-states file (client state, metadata) is ``zero_pp_rank_0_mp_rank_00_model_states.pt``
        for ZeRO-3, ``mp_rank_00_model_states.pt`` otherwise: it gets both names (a hard link);
      - ``zero/optimizer_state.pt``: the ZeRO-3 loader reads the step and hyperparameters from its
        ``optimizer_state_dict`` (added for a ZeRO-1/2 source from the per-parameter ``step.pt``), the ZeRO-1/2
        loader checks ``ds_version`` (added for a ZeRO-3 source);
      - ``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``: a ZeRO-3 source stores flat tensors, the ZeRO-1/2 loader
        wants ``{"param": tensor of the parameter's shape}`` (which the ZeRO-3 loader reads too): rewritten; and
        it takes the Adam step from ``zero/<name>/step.pt``, which a ZeRO-3 source lacks: added."""
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    have = [n for n in names if os.path.isfile(os.path.join(udir, n))]
    for n in names:
        if have and n not in have:
            try:
                os.link(os.path.join(udir, have[0]), os.path.join(udir, n))
            except OSError:  # a file system without hard links
                shutil.copyfile(os.path.join(udir, have[0]), os.path.join(udir, n))
    zero = os.path.join(udir, "zero")
    path = os.path.join(zero, "optimizer_state.pt")
    # the files below were written by ds_to_universal from checkpoint files that passed verify_no_code
    sd = torch.load(path, map_location="cpu", weights_only=False)
    params = sorted(d for d in os.listdir(zero) if os.path.isdir(os.path.join(zero, d)))
    if "optimizer_state_dict" not in sd and params:
        step = torch.load(os.path.join(zero, params[0], "step.pt"), map_location="cpu", weights_only=True)
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
        _save_atomic(sd, path)
    if "ds_version" not in sd:  # checked by the ZeRO-1/2 loader, absent from a ZeRO-3 source's file
        import deepspeed

        sd["ds_version"] = deepspeed.__version__
        _save_atomic(sd, path)
    shapes = {}
    for group in torch.load(os.path.join(udir, names[1]), map_location="cpu", weights_only=False)["param_shapes"]:
        shapes.update(group)
    step = next(iter(sd["optimizer_state_dict"]["state"].values()))["step"]
    for name in params:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = os.path.join(zero, name, key + ".pt")
            if os.path.isfile(f):
                t = torch.load(f, map_location="cpu", weights_only=True)
                if torch.is_tensor(t):
                    _save_atomic({"param": t.view(shapes[name])}, f)
        if not os.path.isfile(os.path.join(zero, name, "step.pt")):
            _save_atomic(torch.as_tensor(step), os.path.join(zero, name, "step.pt"))


def _save_atomic(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _failed_attempt(path: str) -> Optional[str]:
    """The attempt id in a FAILED marker; None if there is none (or it is unreadable: still being written)."""
    try:
        with open(path) as f:
            return json.load(f).get("attempt")
    except (OSError, ValueError, AttributeError):
        return None
