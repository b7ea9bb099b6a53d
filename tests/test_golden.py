"""The golden run: a fresh, shortened, deterministic demo run must reproduce tests/golden/toy_losses.json.

It launches the real pipeline (toy dataset -> data_prep/tokenize.py -> `deepspeed --num_gpus 2
rear_ds/train.py` with ZeRO-2 bf16 on two CPU processes) and compares every step's losses with a tight
tolerance, so a silent change to the model, loss, data order or optimizer fails here.
To regenerate after an intended change: ``python -m rear_ds.demo --golden --regenerate``
(see tests/golden/GOLDEN.md).
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "toy_losses.json")


@pytest.mark.timeout(900)
def test_golden_run_reproduces_losses(tmp_path):
    assert os.path.isfile(GOLDEN), "tests/golden/toy_losses.json is missing: python -m rear_ds.demo --golden --regenerate"
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    res = subprocess.run([sys.executable, "-m", "rear_ds.demo", "--golden", "--out", str(tmp_path / "golden")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "golden run matches" in res.stdout
    # The trainer's progress lines reach the demo's screen as they come (the demo keeps the rest in its logs).
    assert re.search(r"^    step 30/30 \| eta \S+ \| loss \d+\.\d+ \| samples_per_s [\d.]+ \| mfu n/a$", res.stdout, re.M), \
        res.stdout[-3000:]


def test_compare_flags_a_changed_loss(tmp_path):
    """The comparison itself: identical passes, a moved loss fails and names the step."""
    import json

    from rear_ds.toy.golden import compare

    rec = {"steps": [1, 2], "loss": [5.0, 4.0], "ce": [5.0, 4.0], "enc_align": [-0.1, -0.2],
           "dec_align": [-0.1, -0.2], "token_acc": [0.0, 0.1]}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(rec))
    assert compare(rec, str(path)) == []
    moved = dict(rec, loss=[5.0, 4.05])
    problems = compare(moved, str(path))
    assert problems and "step 2 loss" in problems[0]
