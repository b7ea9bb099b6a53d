"""Comparing a golden run (``python -m rear_ds.demo --golden``) with tests/golden/toy_losses.json.

The golden run is fully seeded (dataset, tokenizer init, model init, data order, perturbation, class
dropout) and runs two processes under the deepspeed launcher with ZeRO-2 and bf16, so on the same
software stack it reproduces its per-step losses. The tolerance only absorbs float differences between
CPUs (bf16 matmul kernels differ by instruction set); any change of model, loss, data order or
optimizer moves the losses by far more.
"""
from __future__ import annotations

import json
import math

# |new - old| <= ATOL + RTOL * |old| for every step and every stored term.
RTOL = 2e-3
ATOL = 2e-3
KEYS = ("loss", "ce", "enc_align", "dec_align")


def compare(new: dict, golden_path: str, rtol: float = RTOL, atol: float = ATOL) -> list:
    """Human-readable differences between a fresh run and the golden file (empty list = match)."""
    with open(golden_path) as f:
        old = json.load(f)
    problems = []
    if new["steps"] != old["steps"]:
        return [f"logged steps differ: golden {old['steps'][:5]}... ({len(old['steps'])}), "
                f"fresh {new['steps'][:5]}... ({len(new['steps'])})"]
    for key in KEYS:
        for step, a, b in zip(old["steps"], old[key], new[key]):
            if a is None or b is None or not math.isfinite(b) or abs(a - b) > atol + rtol * abs(a):
                problems.append(f"step {step} {key}: golden {a} fresh {b}")
    if problems:
        problems.append("if this change is intended, regenerate: python -m rear_ds.demo --golden --regenerate "
                        "(see tests/golden/GOLDEN.md)")
    return problems
