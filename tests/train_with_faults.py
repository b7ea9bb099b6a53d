"""rear_ds/train.py with injected faults, for tests only (the training code has no fault hooks).

REAR_TEST_ENOSPC_TAG=step_00000010 and REAR_TEST_ENOSPC_RANK=1: on that rank, every torch.save into that
checkpoint folder raises OSError(ENOSPC), as a full disk would in the middle of DeepSpeed's write.

REAR_TEST_LOWSPACE_CALL=3 (with REAR_TEST_FAULT_RANK=1): on that rank, the 3rd shutil.disk_usage() call (the
free-space check before the 3rd checkpoint) reports 0 bytes free.

REAR_TEST_HANG_STEP=3 (with REAR_TEST_FAULT_RANK=1): that rank sleeps forever before the forward pass of step 3
(its SIGTERM disposition is reset to the default first, so the launcher's teardown ends it at once instead of
after its 30 s grace period: a process stuck in a C call would need that SIGKILL).
"""
import errno
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

RANK = os.environ.get("RANK", "0")
tag = os.environ.get("REAR_TEST_ENOSPC_TAG")
if tag and RANK == os.environ.get("REAR_TEST_ENOSPC_RANK", "0"):
    _real_save = torch.save

    def _full_disk_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and f"/{tag}/" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return _real_save(obj, f, *args, **kwargs)

    torch.save = _full_disk_save

fault_rank = RANK == os.environ.get("REAR_TEST_FAULT_RANK", "1")
if fault_rank and os.environ.get("REAR_TEST_LOWSPACE_CALL"):
    import shutil

    _real_usage, _calls = shutil.disk_usage, [0]

    def _low_space(path):
        _calls[0] += 1
        u = _real_usage(path)
        return u._replace(free=0) if _calls[0] == int(os.environ["REAR_TEST_LOWSPACE_CALL"]) else u

    shutil.disk_usage = _low_space

if fault_rank and os.environ.get("REAR_TEST_HANG_STEP"):
    import signal
    import time

    from rear_ds import objective

    _real_call, _n = objective.ReARObjective.__call__, [0]

    def _hang(self, *args, **kwargs):
        _n[0] += 1
        if _n[0] == int(os.environ["REAR_TEST_HANG_STEP"]):
            print(f"FAULT: rank {RANK} hangs before step {_n[0]}", flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(3600)
        return _real_call(self, *args, **kwargs)

    objective.ReARObjective.__call__ = _hang

from rear_ds.train import main  # noqa: E402

sys.exit(main())
