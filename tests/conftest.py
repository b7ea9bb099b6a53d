"""Shared fixtures. Everything runs on the CPU with tiny models; nothing touches the network."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _restore_kernel_switches():
    """In-process CLI calls (rear_ds.sample.main) set process-wide kernel switches (rear_ds.backends); put them
    back so that no test's numerics depend on which tests ran before it."""
    matmul = torch.get_float32_matmul_precision()
    reduced_sdp = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(reduced_sdp)


@pytest.fixture
def tiny_cfg():
    from rear_ds.config import load_config

    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"))


@pytest.fixture
def tiny_model(tiny_cfg):
    """A tiny generator with every weight random (so adaLN-Zero does not hide bugs)."""
    from rear_ds.models.generator import ReARGenerator

    torch.manual_seed(0)
    model = ReARGenerator(tiny_cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def pytest_sessionfinish(session, exitstatus):
    """Processes the tests kill on purpose never unlink DeepSpeed's CPU all-reduce buffers (66 MiB each in
    /dev/shm, i.e. RAM): remove the ones no process holds any more, so repeated runs do not exhaust memory. Never
    one a process holds: it may belong to a run of another session on this machine, starting up right now."""
    from rear_ds.training.launch_env import remove_orphaned_shm_buffers

    remove_orphaned_shm_buffers()
