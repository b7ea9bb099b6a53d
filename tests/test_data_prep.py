"""data_prep/tokenize.py end to end on real files: ranks, finalize, accounting, resume, safety."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rear_ds.config import TokenizerConfig
from rear_ds.data import preprocess as P
from rear_ds.data.tokenize_job import finalize, main, resolve_worker
from rear_ds.models.tokenizers import build_tokenizer
from rear_ds.models.weights import save_safetensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = dict(name="toy_vq", image_size=32, base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
           codebook_size=64, embed_dim=16)


# ------------------------------------------------------------------------------------------------
# Fixtures: a tiny random tokenizer and an ImageNet-style folder with bad inputs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    t = build_tokenizer(TokenizerConfig(**TOK), load_weights=False)
    weights = str(root / "toy.safetensors")
    save_safetensors(t.state_dict(), weights)
    cfg = root / "toy.yaml"
    cfg.write_text(yaml.safe_dump({"tokenizer": dict(TOK, weights=weights), "model": {"depth": 2}}))
    return t, str(cfg), weights


def _img(mode, size, seed):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return rgb.convert(mode) if mode != "RGB" else rgb


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "train"
    files = {
        "n01/a.JPEG": ("RGB", (130, 70), "JPEG"),  # short side >= 2x32: BOX halving path
        "n01/b.JPEG": ("L", (40, 50), "JPEG"),
        "n01/c.png": ("RGBA", (33, 80), "PNG"),
        "n01/sub/d.jpg": ("CMYK", (64, 64), "JPEG"),
        "n02/e.png": ("P", (20, 25), "PNG"),  # smaller than the target: upsampled, not skipped
        "n02/f.png": ("LA", (50, 36), "PNG"),
        "n02/g.JPEG": ("RGB", (300, 200), "JPEG"),
    }
    for rel, (mode, size, fmt) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        _img(mode, size, len(rel)).save(p, fmt)
    (root / "n03").mkdir()  # empty class folder (keeps index 2)
    bad = root / "n04"
    bad.mkdir()
    good = (root / "n01/a.JPEG").read_bytes()
    (bad / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (bad / "zero.JPEG").write_bytes(b"")
    (bad / "notes.txt").write_text("not an image")
    (bad / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    _img("RGB", (40, 40), 9).save(bad / "ok.JPEG", "JPEG")
    return root


def tokenize(*args, env=None, check=True):
    cmd = [sys.executable, os.path.join(REPO, "data_prep", "tokenize.py"), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd="/")
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def tokenize_here(capsys, *args):
    """The same CLI in-process (no interpreter start-up): (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def common(images, tok, out, **extra):
    args = ["--input", images, "--out", out, "--config", tok[1], "--images-per-shard", 3, "--batch-size", 5]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


@pytest.fixture(scope="module")
def two_ranks(images, tok, tmp_path_factory):
    """Two ranks run concurrently (one with decode workers), then --finalize."""
    out = str(tmp_path_factory.mktemp("out") / "shards")
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "data_prep", "tokenize.py"),
                               *map(str, common(images, tok, out, rank=r, world_size=2, workers=r))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert "images seen = written + skipped" in err
    # one rank of two cannot know the other is done: no manifest yet, and it says which command writes it
    assert not os.path.exists(os.path.join(out, "manifest.json")) and "--finalize --out" in err
    tokenize("--finalize", "--out", out)
    with open(os.path.join(out, "manifest.json")) as f:
        return out, json.load(f)


# ------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------


def reference_center_crop_arr(pil_image, image_size):  # guided-diffusion, verbatim
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("size", [(130, 70), (31, 45), (300, 1000)])
def test_adm_crop_matches_reference(size):
    img = _img("RGB", size, 1)
    assert np.array_equal(np.asarray(P.center_crop_arr(img, 32)), reference_center_crop_arr(img, 32))


def test_views_match_torchvision():
    import torchvision.transforms as T

    img = _img("RGB", (120, 77), 2)
    ten = P.make_views(img, 32, "ten-crop")
    crops = T.TenCrop(32)(Image.fromarray(reference_center_crop_arr(img, int(32 * 1.1))))
    assert ten.shape == (10, 32, 32, 3)
    for got, want in zip(ten, crops):
        assert np.array_equal(got, np.asarray(want))
    cf = P.make_views(img, 32, "center+flip")
    assert np.array_equal(cf[0], reference_center_crop_arr(img, 32)) and np.array_equal(cf[1], cf[0][:, ::-1])
    x = P.to_float_batch(cf)
    assert torch.equal(x[0], T.ToTensor()(Image.fromarray(cf[0])))


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16", "I", "F", "1"])
def test_rgb_conversion(mode):
    img = _img("L", (8, 8), 3).convert(mode) if mode in ("I;16", "I", "F") else _img(mode, (8, 8), 3)
    out = P.to_rgb(img)
    assert out.mode == "RGB" and np.asarray(out).shape == (8, 8, 3)


def test_rank_from_slurm():
    """The tokenizer's rank r of W is rear_ds.launch's worker (tests/test_launch.py has the whole precedence)."""
    def rank(env, *flags):
        w = resolve_worker(*(flags or (None, None)), env)
        return w.worker, w.workers

    assert rank({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)
    assert rank({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}) == (2, 4)  # srun step
    assert rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == (0, 1)  # the batch script: one process
    assert rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, 1, 2) == (1, 2)


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def read_tar(path):
    samples = {}
    with tarfile.open(path) as tf:
        for m in tf:
            if m.name.startswith("__") and m.name.endswith("__"):  # metadata to webdataset: __rear_index__
                continue
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def test_manifest_and_accounting(two_ranks):
    out, m = two_ranks
    acc = m["accounting"]
    assert acc["images_seen"] == 12 == acc["images_written"] + acc["images_skipped"]
    assert acc["images_written"] == 8 and acc["samples_written"] == 16 == m["num_samples"]
    reasons = {s["src"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"n04/truncated.JPEG", "n04/zero.JPEG", "n04/notes.txt", "n04/corrupt.JPEG"}
    assert reasons["n04/zero.JPEG"] == "zero-byte file" and "not an image" in reasons["n04/notes.txt"]
    assert reasons["n04/truncated.JPEG"].startswith("truncated")
    assert m["empty_class_folders"] == ["n03"] and m["classes"] == ["n01", "n02", "n03", "n04"]
    assert m["class_histogram"] == {"0": 8, "1": 6, "3": 2}
    assert m["codebook_size"] == 64 and m["grid"] == [16, 16] and m["num_tokens"] == 256
    assert m["tokenizer"]["weights_sha256"] and m["preprocessing"]["views"] == "center+flip"
    assert len(m["shards"]) == 4 == m["shard_plan"]["num_shards"]
    assert sum(s["samples"] for s in m["shards"]) == 16


def test_views_of_an_image_are_not_written_side_by_side(two_ranks):
    """Samples are written in a seeded random order, so an image's views do not sit next to each other."""
    from rear_ds.data.shards import iter_shard

    out, m = two_ranks
    keys = [s["key"] for e in m["shards"] for s in iter_shard(os.path.join(out, e["name"]))]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 16
    in_order = [k for e in m["shards"] for k in sorted(s["key"] for s in iter_shard(os.path.join(out, e["name"])))]
    assert keys != in_order  # 4 shards of 2-6 samples: all in key order has probability < 1e-3


def test_shards_read_back_and_equal_direct_tokenizer(two_ranks, images, tok):
    import webdataset as wds

    out, m = two_ranks
    plain = {}
    for s in m["shards"]:
        plain.update(read_tar(os.path.join(out, s["name"])))
    assert len(plain) == 16
    urls = [os.path.join(out, s["name"]) for s in m["shards"]]
    via_wds = {x["__key__"]: x for x in wds.WebDataset(urls, shardshuffle=False)}
    assert set(via_wds) == set(plain)
    for key, s in plain.items():
        assert set(s) == {"tokens.npy", "cls", "view", "src"}
        assert s["tokens.npy"] == via_wds[key]["tokens.npy"]
        t = np.load(io.BytesIO(s["tokens.npy"]), allow_pickle=False)
        assert t.dtype == np.uint16 and t.shape == (16, 16)
        src, view = s["src"].decode(), int(s["view"])
        views = P.make_views(Image.open(os.path.join(images, src)), 32, "center+flip")
        direct = tok[0].encode(P.to_float_batch(views[view: view + 1]))[0].numpy()
        assert np.array_equal(t.astype(np.int64), direct), key
        assert int(s["cls"]) == ["n01", "n02", "n03", "n04"].index(src.split("/")[0])


def test_killed_run_rerun_is_byte_identical(two_ranks, images, tok, tmp_path, capsys):
    out_ref, m = two_ranks
    out = str(tmp_path / "resumed")
    r = tokenize(*common(images, tok, out, workers=0), env={"REAR_DS_TOKENIZE_KILL_AFTER_SHARDS": "1"}, check=False)
    assert r.returncode == 137
    assert any(n.endswith(".tmp") for n in os.listdir(out))  # a partial shard was left behind
    bad = os.path.join(out, "shard-000000.tar")  # and a complete one gets damaged: must be redone
    with open(bad, "r+b") as f:
        f.seek(700)
        f.write(b"\x00\x01")
    r = tokenize(*common(images, tok, out, workers=0))
    assert "1 already complete" not in r.stderr
    # a one-process run finalizes by itself: the same shards as the two ranks' manifest names
    assert f"finalized {out}" in r.stderr
    with open(os.path.join(out, "manifest.json")) as f:
        mine = json.load(f)
    assert mine["shards"] == m["shards"] and mine["accounting"] == m["accounting"]
    for s in m["shards"]:  # one rank now, two ranks before: same bytes
        with open(os.path.join(out, s["name"]), "rb") as a, open(os.path.join(out_ref, s["name"]), "rb") as b:
            assert a.read() == b.read(), s["name"]
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    rc, err = tokenize_here(capsys, *common(images, tok, out, workers=0))  # a third run has nothing to do
    assert rc == 0 and "4 shards (4 already complete), 0 images" in err


def test_errors_before_work(images, tok, tmp_path, two_ranks, capsys):
    out = str(tmp_path / "o")
    rc, err = tokenize_here(capsys, "--input", tmp_path / "nope", "--out", out, "--config", tok[1])
    assert rc == 2 and "does not exist" in err
    rc, err = tokenize_here(capsys, *common(images, tok, out, tokenizer_weights=tmp_path / "missing.safetensors"))
    assert rc == 2 and "missing.safetensors" in err
    other = build_tokenizer(TokenizerConfig(**dict(TOK, embed_dim=8)), load_weights=False)
    save_safetensors(other.state_dict(), str(tmp_path / "other.safetensors"))
    rc, err = tokenize_here(capsys, *common(images, tok, out, tokenizer_weights=tmp_path / "other.safetensors"))
    assert rc == 2 and "other.safetensors" in err
    before = sorted(os.listdir(two_ranks[0]))
    rc, err = tokenize_here(capsys, *common(images, tok, two_ranks[0], views="ten-crop"))
    assert rc == 2 and "preprocessing.views" in err and "ten-crop" in err
    assert sorted(os.listdir(two_ranks[0])) == before
    rc, err = tokenize_here(capsys, "--finalize", "--out", out)
    assert rc == 2 and "nothing to finalize" in err
    assert not os.path.isdir(out) or not any(n.startswith("shard") for n in os.listdir(out))


def test_unsafe_tar_members_never_escape(tok, tmp_path, capsys):
    """WebDataset image shards with ../ and absolute member names: read in memory, nothing written there."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    shard = work / "images-000000.tar"
    jpg = io.BytesIO()
    _img("RGB", (40, 40), 4).save(jpg, "JPEG")
    with tarfile.open(shard, "w") as tf:
        for name, data in [("../evil.jpg", jpg.getvalue()), ("../evil.cls", b"1"),
                           ("/tmp/abs_evil.jpg", jpg.getvalue()), ("/tmp/abs_evil.cls", b"0"),
                           ("ok.jpg", jpg.getvalue()), ("ok.cls", b"2"), ("nolabel.jpg", jpg.getvalue())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    before = set(os.listdir(tmp_path / "a"))
    out = str(work / "out")
    assert tokenize_here(capsys, "--input", shard, "--out", out, "--config", tok[1], "--workers", 0)[0] == 0
    assert tokenize_here(capsys, "--finalize", "--out", out)[0] == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["accounting"] == {"images_seen": 4, "images_written": 3, "images_skipped": 1, "samples_written": 6}
    assert m["skipped"][0]["reason"] == "no cls member"
    assert set(os.listdir(tmp_path / "a")) == before and not os.path.exists("/tmp/abs_evil.jpg")
    assert sorted(os.listdir(out)) == ["_parts", "manifest.json", "shard-000000.tar"]
    with tarfile.open(os.path.join(out, "shard-000000.tar")) as tf:
        assert all("/" not in n and ".." not in n.split(".")[0] for n in tf.getnames())
