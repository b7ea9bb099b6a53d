"""In-training FID: the hook reuses the evaluation path and does not disturb the training RNG."""
import os
import shutil

import numpy as np
import pytest
import torch

from rear_ds.config import ConfigError, load_config
from rear_ds.models.tokenizers import build_tokenizer
from rear_ds.training.eval_hook import _share, generate_images, in_training_fid


def test_every_rank_gets_an_equal_share():
    shares = [_share(10, r, 4) for r in range(4)]
    assert {len(s) for s in shares} == {3}
    assert sorted(i for s in shares for i in s)[:10] == list(range(10))


def test_eval_config_needs_reference_stats(tmp_path):
    with pytest.raises(ConfigError, match="train.eval_ref_stats"):
        load_config("configs/tiny.yaml", ["train.eval_every=10", f"train.eval_ref_stats={tmp_path}/none.npz"])


def test_in_training_fid_matches_the_evaluation_path(tmp_path, tiny_model, tiny_cfg):
    from test_evaluate import make_inception_weights

    from rear_ds.evaluation.fid import evaluate_fid
    from rear_ds.evaluation.stats import save_ref_stats
    from rear_ds.sampling import generate

    weights = make_inception_weights(str(tmp_path / "inception.pth"))
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 2048))
    save_ref_stats(str(tmp_path / "ref.npz"), ref.mean(0), np.cov(ref, rowvar=False))
    cfg = load_config("configs/tiny.yaml", ["train.eval_every=5", "train.eval_num_samples=4",
                                            f"train.eval_ref_stats={tmp_path}/ref.npz",
                                            f"train.eval_inception_weights={weights}", "sampling.batch_size=3"])
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.tokenizer, load_weights=False)
    images = generate_images(tiny_model, tok, cfg, range(4), zero_stage=0)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    # The same images as a direct call of the sampler (sample i has class i % C).
    tokens = generate(tiny_model, torch.arange(4) % 10, torch.arange(4), cfg.sampling.seed, cfg.sampling)
    direct = (tok.decode(tokens).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(images, direct)
    state = torch.get_rng_state()
    tiny_model.train()
    fid = in_training_fid(tiny_model, tok, cfg, rank=0, world=1, zero_stage=0)
    assert torch.equal(state, torch.get_rng_state()) and tiny_model.training
    assert fid == pytest.approx(evaluate_fid(images, str(tmp_path / "ref.npz"), weights)) and fid > 0


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher")
def test_zero3_sampling_gathers_once_and_matches_the_partitioned_model(tmp_path):
    """Under ZeRO-3 (2 processes) the sampling replica draws exactly the tokens the partitioned model draws
    (tests/zero3_sampling_probe.py), is a plain module in eval mode, and the engine's module is back in train
    mode afterwards."""
    import json

    import train_helpers as th

    probe = os.path.join(th.ROOT, "tests", "zero3_sampling_probe.py")
    res = th.run(["deepspeed", "--num_gpus", "2", "--master_port", str(th.free_port()), probe], timeout=300,
                 REAR_PROBE_OUT=str(tmp_path))
    assert res.returncode == 0, res.output[-5000:]
    got = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    for r in got:
        assert r["replica_is_plain"] and not r["partitioned_is_plain"], r
        assert r["replica_eval_mode"] and r["partitioned_eval_mode"], r
        assert r["replica_train_mode_after"] and r["partitioned_train_mode_after"], r
        assert r["replica"] == r["partitioned"], r
        assert len({tuple(row) for row in r["replica"]}) > 1, r  # the classes differ: the comparison means something
    assert got[0]["replica"] == got[1]["replica"]  # same seeds and weights on every rank
    print({r["rank"]: (round(r["replica_s"], 2), round(r["partitioned_s"], 2)) for r in got})
