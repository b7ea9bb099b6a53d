"""rear_ds/train.py with real faults arranged at chosen moments, for tests only (the training code has no fault
hooks). The hooks only decide WHEN; the faults themselves are the operating system's: a file-size limit makes
the kernel refuse writes (EFBIG; torch.save turns that into RuntimeError, exactly as for a full disk or a
quota), a file system filled to the brim, a real signal, another working directory.

REAR_TEST_FSIZE_STEP=10, REAR_TEST_FSIZE_RANK=1: while that rank writes the checkpoint of that step, its
RLIMIT_FSIZE is 256 KiB (the trainer ignores SIGXFSZ, so the write fails instead of killing the process).

REAR_TEST_COPY_FAIL_STEP=15 (rank 0): while DeepSpeed copies its recovery scripts (zero_to_fp32.py, 38 KB) into
that checkpoint, rank 0's RLIMIT_FSIZE is 1 KiB. Under ZeRO-3 this copy sits between collectives.

REAR_TEST_FILL_STEP=20 (rank 0, out_dir on a small tmpfs): before that checkpoint, a ballast file fills the
checkpoint folder's file system up to 64 KiB; it is removed after the save. Refuses to fill more than 1 GiB.

REAR_TEST_SLOW_DELETE_S=30 (rank 0): deleting the first old checkpoint folder takes that many seconds longer (a
slow shared file system; the only injected delay here).

REAR_TEST_SIGNAL_STEP=k (with REAR_TEST_FAULT_RANK): that rank sends itself SIGTERM before the forward pass of
optimizer step k (counted from the start of this launch).

REAR_TEST_HANG_STEP=3 (with REAR_TEST_FAULT_RANK=1): that rank sleeps forever before the forward pass of step 3
(its SIGTERM disposition is reset to the default first, so the launcher's teardown ends it at once instead of
after its 30 s grace period: a process stuck in a C call would need that SIGKILL).

REAR_TEST_CHDIR=DIR (with REAR_TEST_FAULT_RANK): that rank starts in DIR, so its relative paths name other
files than its peers' (as a node-local path does on another node).

REAR_TEST_ABORT_AT_FINALIZE=1: every rank aborts (SIGABRT) if the interpreter's exit handlers run at all. It
stands for the teardown race scripts/exit_loop.py hunts under load (gloo's threads meeting interpreter
finalization: "terminate called without an active exception"), which no test can trigger on demand: a finished
run must end without finalization.
"""
import os
import resource
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RANK = os.environ.get("RANK") or os.environ.get("SLURM_PROCID", "0")
FAULT_RANK = RANK == os.environ.get("REAR_TEST_FAULT_RANK", "1")
env = os.environ.get


def limited(nbytes: int, real):
    """``real`` run with this process's file-size limit at ``nbytes``."""
    def run(*args, **kwargs):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        print(f"FAULT: rank {RANK} file-size limit {nbytes} bytes for {real.__name__}", flush=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
        try:
            return real(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return run


from rear_ds.training import checkpoint  # noqa: E402

_real_save = checkpoint.save


def _save(engine, ckpt_dir, step, *args, **kwargs):
    save = _real_save
    if env("REAR_TEST_FSIZE_STEP") == str(step) and RANK == env("REAR_TEST_FSIZE_RANK", "1"):
        save = limited(256 * 1024, save)
    if env("REAR_TEST_COPY_FAIL_STEP") == str(step) and RANK == "0":
        real_copy = engine._copy_recovery_script
        engine._copy_recovery_script = limited(1024, real_copy)
    ballast = None
    if env("REAR_TEST_FILL_STEP") == str(step) and RANK == "0":
        free = os.statvfs(ckpt_dir).f_bavail * os.statvfs(ckpt_dir).f_frsize
        if free > 2 ** 30:
            raise RuntimeError(f"REAR_TEST_FILL_STEP: refusing to fill {free} bytes of {ckpt_dir}")
        ballast = os.path.join(os.path.dirname(ckpt_dir), "ballast")
        with open(ballast, "wb") as f:
            f.truncate(0)
            os.posix_fallocate(f.fileno(), 0, free - 64 * 1024)
        left = os.statvfs(ckpt_dir).f_bavail * os.statvfs(ckpt_dir).f_frsize
        print(f"FAULT: rank 0 filled {ckpt_dir}'s file system: {left} bytes free", flush=True)
    try:
        return save(engine, ckpt_dir, step, *args, **kwargs)
    finally:
        engine.__dict__.pop("_copy_recovery_script", None)
        if ballast:
            os.remove(ballast)


checkpoint.save = _save

if env("REAR_TEST_SLOW_DELETE_S") and RANK == "0":
    import shutil

    _real_rmtree = shutil.rmtree

    def _slow_rmtree(path, *args, **kwargs):
        if "/checkpoints/step_" in str(path):  # the first checkpoint folder only (not DeepSpeed's temp folders)
            shutil.rmtree = _real_rmtree
            print(f"FAULT: rank 0 deletes {path} slowly", flush=True)
            time.sleep(float(env("REAR_TEST_SLOW_DELETE_S")))
        return _real_rmtree(path, *args, **kwargs)

    shutil.rmtree = _slow_rmtree

if FAULT_RANK and (env("REAR_TEST_SIGNAL_STEP") or env("REAR_TEST_HANG_STEP")):
    from rear_ds import objective

    _real_call, _n = objective.ReARObjective.__call__, [0]

    def _call(self, *args, **kwargs):
        _n[0] += 1
        if env("REAR_TEST_SIGNAL_STEP") == str(_n[0]):
            print(f"FAULT: rank {RANK} sends itself SIGTERM before step {_n[0]}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        if env("REAR_TEST_HANG_STEP") == str(_n[0]):
            print(f"FAULT: rank {RANK} hangs before step {_n[0]}", flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(3600)
        return _real_call(self, *args, **kwargs)

    objective.ReARObjective.__call__ = _call

if env("REAR_TEST_ABORT_AT_FINALIZE"):
    import atexit

    atexit.register(os.abort)

if FAULT_RANK and env("REAR_TEST_CHDIR"):
    os.chdir(env("REAR_TEST_CHDIR"))

from rear_ds.train import main  # noqa: E402
from rear_ds.training import launch_env  # noqa: E402

launch_env.run_and_exit(main)
