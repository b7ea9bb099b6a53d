"""``python -m rear_ds.ablate``: reAR vs plain AR on the toy data, and the pieces it is built from.

The integration test runs the real quick mode (toy data, two `deepspeed --num_gpus 2` launches of 12 steps,
two sampling runs) and checks the report's structure and ranges, that the two arms really differ in their
objective switches only and consumed the same batches in the same order, and that the ablation's own checks
fail on a tampered run. It never asserts which arm wins: at this length the numbers are noise.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_digest_follows_content_and_order():
    from rear_ds.training.metrics import DataDigest

    tokens, labels = torch.randint(0, 256, (4, 64)), torch.arange(4)

    def digest(*batches):
        d = DataDigest("cpu")
        for t, y in batches:
            d.update(t, y)
        return int(d.value)

    base = digest((tokens, labels), (tokens[:2], labels[:2]))
    assert base == digest((tokens, labels), (tokens[:2], labels[:2]))  # deterministic
    swapped = tokens.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    other = tokens.clone()
    other[3, 63] = (other[3, 63] + 1) % 256
    for changed in (digest((swapped, labels), (tokens[:2], labels[:2])),  # two samples swapped
                    digest((other, labels), (tokens[:2], labels[:2])),  # one token changed
                    digest((tokens, labels.flip(0)), (tokens[:2], labels[:2])),  # labels changed
                    digest((tokens[:2], labels[:2]), (tokens, labels))):  # batches in another order
        assert changed != base


def test_round_trip_counts_surviving_positions():
    """Tokens that are the encoding of their images survive completely; altered ones only where untouched."""
    from rear_ds.config import load_config
    from rear_ds.evaluation.references import to_uint8_hwc
    from rear_ds.evaluation.round_trip import real_round_trip, round_trip
    from rear_ds.models.tokenizers import build_tokenizer

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.tokenizer, load_weights=False).eval()
    images = to_uint8_hwc(tok.decode(torch.randint(0, cfg.tokenizer.codebook_size, (6, tok.num_tokens))))
    tokens = tok.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).reshape(6, -1).numpy()
    full = round_trip(tok, tokens, images)
    assert full["consistency"] == 1.0 and full["all_survive"] == 1.0 and full["n"] == 6
    altered = tokens.copy()
    altered[:, : tok.num_tokens // 4] = (altered[:, : tok.num_tokens // 4] + 1) % cfg.tokenizer.codebook_size
    assert round_trip(tok, altered, images)["consistency"] == 0.75
    with pytest.raises(ValueError, match="token rows"):
        round_trip(tok, tokens[:5], images)
    ceiling = real_round_trip(tok, images)
    assert 0.0 <= ceiling["consistency"] <= 1.0 and ceiling["n"] == 6


def test_spread_and_paired_summary():
    from rear_ds.ablate import spread, summarize

    assert spread([1.0]) == {"mean": 1.0, "std": None, "min": 1.0, "max": 1.0, "n": 1}
    s = spread([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0
    scores = lambda rt, cc, fd: {"scores": {"round_trip": {"consistency": rt},  # noqa: E731
                                            "class_consistency": {"consistency": cc}, "feature_frechet": fd}}
    runs = {"reAR": {0: scores(0.5, 0.9, 1.0), 1: scores(0.6, 0.8, 2.0)},
            "AR": {0: scores(0.4, 0.9, 3.0), 1: scores(0.4, 0.7, 3.0)}}
    summ = summarize(runs, [0, 1])
    assert summ["per_arm"]["reAR"]["round_trip"]["by_seed"] == {"0": 0.5, "1": 0.6}
    assert summ["paired_vs_AR"]["reAR"]["round_trip"]["mean"] == pytest.approx(0.15)
    fd = summ["paired_vs_AR"]["reAR"]["feature_frechet"]
    assert fd["mean"] == pytest.approx(-1.5) and fd["std"] == pytest.approx(0.7071, abs=1e-4)
    # t(0.975, 1 dof) = 12.706: [-1.5 -+ 12.706 * 0.7071 / sqrt(2)] includes 0
    assert fd["ci95"] == pytest.approx([-7.853, 4.853], abs=2e-3) and fd["verdict"] == "no clear difference"
    assert summarize(runs, [0])["paired_vs_AR"]["reAR"]["round_trip"]["verdict"] == "one seed: no verdict"
    runs["reAR"][2], runs["AR"][2] = scores(0.55, 0.9, 1.5), scores(0.41, 0.9, 3.0)
    summ = summarize(runs, [0, 1, 2])  # round trip +0.1, +0.2, +0.14: reAR higher on every seed, CI excludes 0
    assert summ["paired_vs_AR"]["reAR"]["round_trip"]["verdict"] == "better"
    assert summ["paired_vs_AR"]["reAR"]["feature_frechet"]["verdict"] == "better"  # lower is better here
    assert "AR" not in summ["paired_vs_AR"]


def _finite_in(x, lo=-math.inf, hi=math.inf):
    return isinstance(x, (int, float)) and math.isfinite(x) and lo <= x <= hi


@pytest.mark.timeout(1500)  # about 3 minutes on an idle 2-core machine; the guard allows for a loaded one
def test_quick_ablation(tmp_path):
    out = tmp_path / "ablate"
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "rear_ds.ablate", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "NOT FID" in res.stdout
    rep = json.loads((out / "ablation.json").read_text())

    # structure and ranges (no claim about which arm wins)
    assert set(rep["runs"]) == {"reAR", "AR"} and rep["settings"]["seeds"] == [0]
    assert rep["settings"]["arms"] == {"reAR": dict(noisy_context=True, encode_align=True, decode_align=True),
                                       "AR": dict(noisy_context=False, encode_align=False, decode_align=False)}
    n = rep["settings"]["num_samples"]
    for arm in ("reAR", "AR"):
        run = rep["runs"][arm]["0"]
        sc = run["scores"]
        assert sc["round_trip"]["n"] == sc["class_consistency"]["n"] == n
        assert _finite_in(sc["round_trip"]["consistency"], 0, 1) and _finite_in(sc["class_consistency"]["consistency"], 0, 1)
        assert _finite_in(sc["feature_frechet"], 0)
        assert run["train"]["step"] == rep["settings"]["steps"] and _finite_in(run["train"]["ce"], 0)
        for m in ("round_trip", "class_consistency", "feature_frechet"):
            s = rep["summary"]["per_arm"][arm][m]
            assert s["n"] == 1 and s["std"] is None and _finite_in(s["mean"])
    real = rep["real_heldout"]
    assert _finite_in(real["round_trip"]["consistency"], 0, 1) and real["class_consistency"]["consistency"] >= 0.9
    assert _finite_in(real["feature_frechet"], 0)
    paired = rep["summary"]["paired_vs_AR"]["reAR"]["round_trip"]["mean"]
    assert paired == pytest.approx(rep["runs"]["reAR"]["0"]["scores"]["round_trip"]["consistency"]
                                   - rep["runs"]["AR"]["0"]["scores"]["round_trip"]["consistency"], abs=2e-4)
    md = (out / "report.md").read_text()
    assert "| reAR |" in md and "| AR |" in md and "| real held-out |" in md and "NOT FID" in md
    from PIL import Image

    with Image.open(out / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100

    # the arms differ in their objective switches, nothing else, and consumed identical batches in order
    import yaml

    dirs = {arm: rep["runs"][arm]["0"]["run_dir"] for arm in ("reAR", "AR")}
    cfgs = {arm: yaml.safe_load(open(os.path.join(d, "config.yaml"))) for arm, d in dirs.items()}
    for c in cfgs.values():
        c["train"].pop("out_dir")
    assert cfgs["reAR"]["objective"] != cfgs["AR"]["objective"]
    for c in cfgs.values():
        for k in ("noisy_context", "encode_align", "decode_align"):
            c["objective"].pop(k)
    assert cfgs["reAR"] == cfgs["AR"]
    logs = {arm: [json.loads(line) for line in open(os.path.join(d, "log.jsonl")) if '"loss"' in line]
            for arm, d in dirs.items()}
    digests = {arm: [(r["step"], r["data_digest"]) for r in recs] for arm, recs in logs.items()}
    assert len(digests["reAR"]) == rep["settings"]["steps"] and digests["reAR"] == digests["AR"]
    assert len({d for _, d in digests["reAR"]}) == len(digests["reAR"])  # it moves every step
    # ... and really trained differently: the regularizers' terms and the noise are on in one arm only
    assert all(r["enc_align"] != 0 and r["dec_align"] != 0 for r in logs["reAR"]) and logs["reAR"][0]["noise_frac"] > 0
    assert all(r["enc_align"] == r["dec_align"] == r["noise_frac"] == 0 for r in logs["AR"])
    assert [r["ce"] for r in logs["reAR"]] != [r["ce"] for r in logs["AR"]]

    # the ablation's own checks fail when a run consumed other data or differs in another setting
    from rear_ds.ablate import ARMS, AblationError, check_seed

    assert check_seed(0, dirs, ARMS)["data_digest_steps_compared"] == rep["settings"]["steps"]
    bad = tmp_path / "bad_AR"
    shutil.copytree(dirs["AR"], bad, ignore=shutil.ignore_patterns("checkpoints"))
    lines = (bad / "log.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if rec.get("step") == 3 and "loss" in rec:
            rec["data_digest"] += 1
            lines[i] = json.dumps(rec)
    (bad / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(AblationError, match=r"other data.*steps \[3\]"):
        check_seed(0, dict(dirs, AR=str(bad)), ARMS)
    shutil.copy(os.path.join(dirs["AR"], "log.jsonl"), bad / "log.jsonl")
    c = yaml.safe_load((bad / "config.yaml").read_text())
    c["objective"]["class_dropout"] = 0.2
    (bad / "config.yaml").write_text(yaml.safe_dump(c))
    with pytest.raises(AblationError, match="class_dropout"):
        check_seed(0, dict(dirs, AR=str(bad)), ARMS)

    # a rerun reuses the finished runs and sample sets (and reports the same numbers)
    res2 = subprocess.run([sys.executable, "-m", "rear_ds.ablate", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    assert res2.returncode == 0, res2.stdout[-4000:] + res2.stderr[-4000:]
    assert res2.stdout.count("reused the finished run") == 2
    rep2 = json.loads((out / "ablation.json").read_text())
    assert rep2["summary"]["per_arm"] == rep["summary"]["per_arm"]
    assert np.isfinite(rep2["timings_s"]["total"])
