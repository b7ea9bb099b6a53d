"""Process-wide torch kernel switches, set once by the entry points that train or sample.

Both are global flags in torch, so they live here, named, instead of being flipped inside model code:

* TF32 for fp32 matmuls (spec section 5, "TF32 on"; the reference sample script runs fp32 with TF32
  allowed). A no-op on the CPU; on Ampere+ GPUs it is what makes fp32 sampling affordable.
* bf16/fp16 reductions in SDPA's *math* backend. That backend runs whenever no fused kernel accepts the
  call, notably on the CPU during training (no CPU kernel takes dropout). Without the switch it upcasts
  bf16 q/k/v to fp32 and runs the two attention products in fp32 (2.7x slower on the CPU profile); with it,
  the products run in bf16 with fp32 accumulation, the precision the flash kernels use on GPUs.

FID features must not depend on these switches: ``exact_fp32`` turns TF32 off (matmuls and cuDNN
convolutions) around the Inception network, which can also run inside a training process (the FID hook).
"""
from __future__ import annotations

import contextlib

import torch


def enable_fast_kernels() -> None:
    torch.set_float32_matmul_precision("high")  # TF32 where the hardware has it
    allow_reduced = getattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp", None)  # torch >= 2.5
    if allow_reduced is not None:
        allow_reduced(True)  # despite the name, it also governs the CPU math backend


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and cuDNN convolutions in full fp32 inside the block (no TF32), whatever the process-wide
    settings; torch enables TF32 for cuDNN convolutions by default, independently of enable_fast_kernels."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")  # torch >= 2.9
    previous_mm = torch.get_float32_matmul_precision()
    previous_conv = conv.fp32_precision if new_api else torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    if new_api:
        conv.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous_mm)
        if new_api:
            conv.fp32_precision = previous_conv
        else:
            torch.backends.cudnn.allow_tf32 = previous_conv
