"""rear_ds/train.py with injected faults, for tests only (the training code has no fault hooks).

REAR_TEST_ENOSPC_TAG=step_00000010 and REAR_TEST_ENOSPC_RANK=1: on that rank, every torch.save into that
checkpoint folder raises OSError(ENOSPC), as a full disk would in the middle of DeepSpeed's write.
"""
import errno
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

tag = os.environ.get("REAR_TEST_ENOSPC_TAG")
if tag and os.environ.get("RANK", "0") == os.environ.get("REAR_TEST_ENOSPC_RANK", "0"):
    _real_save = torch.save

    def _full_disk_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and f"/{tag}/" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return _real_save(obj, f, *args, **kwargs)

    torch.save = _full_disk_save

from rear_ds.train import main  # noqa: E402

sys.exit(main())
