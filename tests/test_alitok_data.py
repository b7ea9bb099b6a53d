"""AliTok data prep: `python data_prep/tokenize.py` with AliTok configs. The ten-crop views (pixels and tokens)
equal the official pretokenization's; shards of the tiny config hold the tokenizer's own encode of the views,
decode back to images, and are refused by a MaskGIT-VQGAN config (the trainer's preflight and the reader)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import alitok_reference as R
from rear_ds.config import ConfigError, load_config
from rear_ds.data import preprocess as P
from rear_ds.data import shards as S
from rear_ds.data.tokenize_job import main as tokenize_main
from rear_ds.data.tokenize_job import tokenizer_config
from rear_ds.models.tokenizers import build_tokenizer, released_config
from rear_ds.models.tokenizers.alitok import AliTok
from rear_ds.models.weights import save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")


def tokenize(*args):
    cmd = [sys.executable, os.path.join(ROOT, "data_prep", "tokenize.py"), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/",
                       env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r


def read_samples(out: str) -> dict:
    m = S.load_manifest(out)
    return {s["key"]: s for e in m["shards"] for s in S.iter_shard(os.path.join(out, e["name"]))}


def test_ten_crop_views_and_tokens_equal_the_official_pretokenization(tmp_path):
    """6 images of several sizes and modes: every view's pixels equal those the official pretokenization.py
    (--ten_crop) encoded, in its order (tl, tr, bl, br, centre, then the mirror's five), and the tokens that
    tokenize.py writes equal the codes it saved (released widths, one block per tower; see the golden script)."""
    meta = json.load(open(os.path.join(GOLDEN, "alitok_goldens.json")))["tencrop"]
    gold = np.load(os.path.join(GOLDEN, "alitok_tencrop.npz"), allow_pickle=False)
    names = [str(n) for n in gold["tencrop_names"]]
    images = R.tencrop_images()
    assert sorted(images) == names
    for i, rel in enumerate(names):
        views = P.make_views(P.load_image(images[rel]), 256, "ten-crop")
        assert R.view_hashes(views) == [str(h) for h in gold["tencrop_view_sha256"][i]], rel

    cfg = released_config("alitok")
    for k, v in R.TENCROP_ARCH.items():
        setattr(cfg.alitok, k, v)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AliTok(cfg).state_dict().items()}
    state = R.random_state(shapes, meta["seed"], meta["codebook_scale"])
    assert R.state_checksum(state) == pytest.approx(meta["state_checksum"], rel=1e-9), "the weight draw changed"
    weights = str(tmp_path / "alitok_depth1.safetensors")
    save_safetensors(state, weights)
    config = tmp_path / "alitok_depth1.yaml"
    config.write_text(yaml.safe_dump({"tokenizer": {**cfg.architecture(), "weights": weights}}))
    R.write_folder(str(tmp_path / "train"), images)
    out = str(tmp_path / "shards")
    tokenize("--input", tmp_path / "train", "--out", out, "--config", config, "--views", "ten-crop",
             "--workers", 0, "--batch-size", 20, "--images-per-shard", 4)
    assert tokenize_main(["--finalize", "--out", out]) == 0
    samples = read_samples(out)
    assert len(samples) == 60
    clear, codes = gold["tencrop_clear"], gold["tencrop_codes"].astype(np.int64)
    loose = 0
    for s in samples.values():
        i, v = names.index(s["src"]), s["view"]
        t = s["tokens"].astype(np.int64)
        assert t.shape == (273,) and s["cls"] == int(s["src"].startswith("n00000002"))
        ok = clear[i, v]  # the ids with a near-tie between two codes are compared loosely (counted below)
        assert np.array_equal(t[ok], codes[i, v][ok]), f"{s['src']} view {v}"
        loose += int((t[~ok] != codes[i, v][~ok]).sum())
    print(f"ten-crop: {clear.sum()} clear ids equal; {loose} of {(~clear).sum()} near-tie ids differ")
    assert (~clear).sum() == meta["near_ties"] < 0.01 * clear.size and loose <= meta["near_ties"]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """The tiny AliTok config: random weights, an ImageNet-style folder of 5 images, ten-crop shards."""
    root = tmp_path_factory.mktemp("alitok_tiny")
    cfg = tokenizer_config(os.path.join(ROOT, "configs", "tokenizer_alitok_tiny.yaml"))
    torch.manual_seed(0)
    tok = build_tokenizer(cfg, load_weights=False)
    with torch.no_grad():  # codebook rows at the latents' scale, so the ids spread over the codebook
        z = tok.latents(torch.rand(8, 3, 32, 32))
        tok.quantize.embedding.weight.copy_(torch.randn(64, 16) * z.std() + z.mean())
    cfg.weights = str(root / "tiny_alitok.safetensors")
    save_safetensors(tok.state_dict(), cfg.weights)
    config = root / "tiny_alitok.yaml"
    config.write_text(yaml.safe_dump({"tokenizer": {**cfg.architecture(), "weights": cfg.weights}}))
    rng = np.random.default_rng(0)
    files = {"n01/a.png": ("RGB", 90, 70), "n01/b.png": ("L", 30, 40), "n02/c.png": ("RGBA", 33, 33),
             "n02/d.png": ("P", 20, 25), "n03/e.png": ("RGB", 64, 200)}
    for rel, (mode, w, h) in files.items():
        p = root / "train" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        (img.convert(mode) if mode != "RGB" else img).save(p)
    out = str(root / "shards")
    tokenize("--input", root / "train", "--out", out, "--config", config, "--views", "ten-crop",
             "--workers", 1, "--batch-size", 7, "--images-per-shard", 2, "--rank", 0, "--world-size", 2)
    assert tokenize_main([str(a) for a in ("--input", root / "train", "--out", out, "--config", config, "--views",
                                            "ten-crop", "--workers", 0, "--batch-size", 7, "--images-per-shard", 2,
                                            "--rank", 1, "--world-size", 2)]) == 0  # the same CLI, in-process
    assert tokenize_main(["--finalize", "--out", out]) == 0
    return build_tokenizer(cfg), out, root / "train"


def test_tiny_shards_hold_the_tokenizers_own_encode_and_the_token_layout(tiny_shards):
    tok, out, images = tiny_shards
    m = S.load_manifest(out)
    t = m["tokenizer"]
    assert (t["name"], t["family"], t["prefix_tokens"], t["grid"], t["num_tokens"], t["token_shape"]) == \
        ("alitok", "alitok", 4, [4, 4], 20, [20])
    assert (m["num_tokens"], m["prefix_tokens"], m["grid"], m["codebook_size"]) == (20, 4, [4, 4], 64)
    assert t["config"]["alitok"]["encoder_width"] == 32 and "base_channels" not in t["config"]
    assert m["accounting"]["images_written"] == 5 and m["num_samples"] == 50
    samples = read_samples(out)
    by_src: dict = {}
    for s in samples.values():
        by_src.setdefault(s["src"], {})[s["view"]] = s["tokens"]
    assert len(by_src) == 5 and all(sorted(v) == list(range(10)) for v in by_src.values())
    for src, views in by_src.items():
        pixels = P.make_views(P.load_image((images / src).read_bytes()), 32, "ten-crop")
        direct = tok.encode(P.to_float_batch(pixels)).numpy()
        got = np.stack([views[v] for v in range(10)])
        assert got.dtype == np.uint16 and got.shape == (10, 20)
        assert np.array_equal(got.astype(np.int64), direct), src
    ids = torch.from_numpy(got.astype(np.int64))
    assert len(np.unique(np.stack([np.stack(list(v.values())) for v in by_src.values()]))) > 10
    images_back = tok.decode(ids)  # shards -> pixels
    assert images_back.shape == (10, 3, 32, 32) and 0 <= images_back.min() <= images_back.max() <= 1


def test_a_maskgit_vqgan_config_refuses_alitok_shards(tiny_shards, tmp_path):
    _, out, _ = tiny_shards
    from rear_ds.data.reader import build_train_loader
    from rear_ds.training import preflight

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [f"data.shards={out}"], need_data=True)
    with pytest.raises(ConfigError) as err:  # the trainer's check, before anything is built
        preflight.check_data(cfg)
    msg = str(err.value)
    assert "made with tokenizer alitok (4 prefix + 4x4 grid = 20 tokens, codebook 64)" in msg
    assert "are alitok tokens, but tokenizer.name=toy_vq is of the maskgit_vqgan family" in msg
    with pytest.raises(ConfigError, match=r"made with tokenizer alitok .*num_tokens=20 disagrees with "
                                          r"model.num_tokens=16"):
        build_train_loader(cfg.data, cfg.model, 0, 1, 0, 4)  # the reader's own check, before any read
    # The matching AliTok config passes the same checks.
    over = [f"data.shards={out}", "model.num_tokens=20", "tokenizer.name=alitok", "tokenizer.image_size=32",
            "tokenizer.alitok.patch_size=8", "tokenizer.alitok.prefix_tokens=4", "tokenizer.alitok.encoder_width=32",
            "tokenizer.alitok.encoder_depth=2", "tokenizer.alitok.encoder_heads=2", "tokenizer.alitok.decoder_width=32",
            "tokenizer.alitok.decoder_depth=2", "tokenizer.alitok.decoder_heads=2",
            "tokenizer.alitok.decoder_registers=4"]
    preflight.check_data(load_config(os.path.join(ROOT, "configs", "tiny.yaml"), over, need_data=True))
