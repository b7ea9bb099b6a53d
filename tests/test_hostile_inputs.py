"""Hostile and flaky inputs (issue 20): each with the real input, each must be skipped and named, never fatal.

The real faults: a 1 x 40,000 PNG; an EPS file named .JPEG with a `gs` on the PATH that records being run;
symlink loops, links and a FIFO in the folder; EIO from the OS (an image that is a link to /proc/self/mem,
whose offset 0 is unmapped); classes outside the model's range in WebDataset and JSONL inputs; a .npy saved
under a chunk name and an .npz header claiming a petabyte; part files left by a run with another world size;
processes killed by the kernel (SIGXFSZ at RLIMIT_FSIZE) in the middle of writing their big outputs.
The last test runs the whole hostile folder through tokenize, one training launch (with a token shard whose
tar header claims 64 GiB), sampling and evaluation.
"""
from __future__ import annotations

import glob
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import train_helpers as th
from rear_ds.config import TokenizerConfig
from rear_ds.data import sources
from rear_ds.data.sources import InputItem, list_folder, read_bytes
from rear_ds.data.tokenize_job import finalize, main as tokenize_main
from rear_ds.models.tokenizers import build_tokenizer
from rear_ds.models.weights import save_safetensors

ROOT = th.ROOT
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
THIN = (1, 40_000)  # W x H: ~200 bytes as PNG; the ADM crop at 256 would make it 256 x 10,240,000 x 3
launcher = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher")


def save_img(path, size=(40, 40), seed=0, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)


def eps_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "EPS")  # PIL writes EPS without Ghostscript
    return buf.getvalue()


@pytest.fixture(scope="module")
def fake_gs(tmp_path_factory):
    """A `gs` first on the PATH that records every run: PIL's EPS plugin calls `gs --version` first."""
    d = tmp_path_factory.mktemp("gsbin")
    marker = d / "gs_ran"
    (d / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 0\n")
    (d / "gs").chmod(0o755)
    return str(d), marker


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The tiny config's toy_vq tokenizer with random weights (tokenize, training and sampling share it)."""
    root = tmp_path_factory.mktemp("tok")
    section = yaml.safe_load(open(TINY))["tokenizer"]
    torch.manual_seed(0)
    weights = str(root / "tok.safetensors")
    save_safetensors(build_tokenizer(TokenizerConfig(**section), load_weights=False).state_dict(), weights)
    return weights


def tokenize(capsys, *args):
    capsys.readouterr()
    rc = tokenize_main([str(a) for a in args])
    return rc, capsys.readouterr().err


def common(inp, out, weights, *extra):
    return ["--input", inp, "--out", out, "--config", TINY, "--tokenizer-weights", weights, "--workers", 0,
            "--batch-size", 8, *extra]


def shard_bytes(out):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "shard-*.tar")))}


# ------------------------------------------------------------------------------------------------
# 1. A thin image would exhaust memory in the ADM crop
# ------------------------------------------------------------------------------------------------


def test_thin_image_is_refused_before_the_upscale(tmp_path):
    """Under a 1 GiB address-space allowance a 1 x 40,000 PNG is refused with a reason, not OOM (25 GB at 256)."""
    path = tmp_path / "thin.png"
    Image.new("RGB", THIN, (200, 10, 10)).save(path)
    assert path.stat().st_size < 1000
    script = ("import resource, sys\n"
              "from rear_ds.data.preprocess import load_image, make_views\n"
              "data = open(sys.argv[1], 'rb').read()\n"
              "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
              "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
              "try:\n"
              "    make_views(load_image(data), 256, 'center+flip'); print('DECODED')\n"
              "except ValueError as e:\n"
              "    print('SKIPPED:', e)\n")
    res = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert res.returncode == 0 and "SKIPPED: too elongated: 1x40000" in res.stdout, res.stdout + res.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# 4. Symlink loops and links: each file once, each loop named
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)  # two loops used to list forever
def test_symlink_loops_and_links_are_listed_once(tmp_path):
    from rear_ds.evaluation.references import open_reference

    root = tmp_path / "train"
    for rel in ("n01/a.JPEG", "n01/sub/b.JPEG", "n02/c.JPEG"):
        save_img(str(root / rel))
    os.symlink(".", root / "n01/loop")  # alone this listed every file 41 times, two never finished
    os.symlink("..", root / "n01/sub/up")
    os.symlink("../n01", root / "n02/alias")  # a second path to a folder already listed
    os.link(root / "n02/c.JPEG", root / "n02/hard.JPEG")  # the same file under two names
    os.mkfifo(root / "n02/pipe.JPEG")
    listing = list_folder(str(root))
    good = sorted(it.src for it in listing.items if not it.problem)
    assert good == ["n01/a.JPEG", "n01/sub/b.JPEG", "n02/c.JPEG"]
    problems = {it.src: it.problem for it in listing.items if it.problem}
    assert set(problems) == {"n01/loop", "n01/sub/up", "n02/alias", "n02/hard.JPEG", "n02/pipe.JPEG"}
    assert problems["n01/loop"] == "link to the folder 'n01', already listed: not followed"
    assert problems["n02/hard.JPEG"].startswith("the same file as 'n02/c.JPEG'")
    assert problems["n02/pipe.JPEG"] == "not a regular file (FIFO)"
    ref = open_reference(str(root), image_size=32)  # the evaluation's reference folder walks the same way
    assert sorted(os.path.relpath(p, root) for p in ref.files) == good
    assert {s["src"] for s in ref.skipped} == set(problems)


# ------------------------------------------------------------------------------------------------
# 6. Transient I/O errors: retried; if they persist the rank stops, nothing is committed with a hole
# ------------------------------------------------------------------------------------------------


def test_transient_errno_is_retried_and_a_fifo_never_blocks(tmp_path):
    good = tmp_path / "good.JPEG"
    save_img(str(good))
    link = tmp_path / "flaky.JPEG"
    os.symlink("/proc/self/mem", link)  # read at offset 0: EIO from the kernel
    waits = []

    def swap(seconds):  # the fault passes while we wait: the link now names the real file
        waits.append(seconds)
        os.remove(link)
        os.symlink(good, link)

    item = InputItem("flaky.JPEG", 0, str(link))
    assert read_bytes(item, wait=swap) == good.read_bytes() and waits == [sources.RETRY_WAIT_S]
    os.remove(link)
    os.symlink("/proc/self/mem", link)
    waits.clear()
    with pytest.raises(sources.TransientReadError, match="EIO, 4 attempts"):
        read_bytes(item, wait=waits.append)
    assert waits == [1.0, 2.0, 4.0]
    os.mkfifo(tmp_path / "pipe.JPEG")  # open() would wait for a writer forever
    with pytest.raises(ValueError, match=r"not a regular file \(FIFO\)"):
        read_bytes(InputItem("pipe.JPEG", 0, str(tmp_path / "pipe.JPEG")))
    with pytest.raises(ValueError, match="unreadable: No such file"):
        read_bytes(InputItem("gone.JPEG", 0, str(tmp_path / "gone.JPEG")))


def test_persistent_eio_stops_the_rank_and_the_rerun_is_byte_identical(tok, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sources, "RETRY_WAIT_S", 0.0, raising=False)
    root = tmp_path / "train"
    names = [f"n0{i % 2}/img{i}.JPEG" for i in range(6)]
    for i, rel in enumerate(names):
        save_img(str(root / rel), seed=i)
    flaky = root / "n00/img4.JPEG"  # third in sorted order: shard 1 of 3 (2 images per shard, no shuffle)
    real = flaky.read_bytes()
    os.remove(flaky)
    os.symlink("/proc/self/mem", flaky)
    out = str(tmp_path / "out")
    args = common(str(root), out, tok, "--images-per-shard", 2, "--shuffle-seed", -1)
    rc, err = tokenize(capsys, *args)
    assert rc == 75, err[-3000:]
    assert "input n00/img4.JPEG could not be read" in err and "EIO" in err and "shard 1 was not committed" in err
    assert sorted(shard_bytes(out)) == ["shard-000000.tar"] and not glob.glob(os.path.join(out, "*.tmp"))
    os.remove(flaky)  # the fault has passed
    flaky.write_bytes(real)
    assert tokenize(capsys, *args)[0] == 0 and tokenize(capsys, "--finalize", "--out", out)[0] == 0
    clean = str(tmp_path / "clean")
    assert tokenize(capsys, *common(str(root), clean, tok, "--images-per-shard", 2, "--shuffle-seed", -1))[0] == 0
    assert shard_bytes(out) == shard_bytes(clean) and len(shard_bytes(out)) == 3
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["accounting"]["images_skipped"] == 0 and m["accounting"]["images_written"] == 6


# ------------------------------------------------------------------------------------------------
# 7. Classes outside the model's range are refused where data enters
# ------------------------------------------------------------------------------------------------


def test_class_range_is_checked_at_data_prep(tok, tmp_path, capsys):
    from rear_ds.data.jsonl import convert

    jpg = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(jpg, "JPEG")
    shard = tmp_path / "wds" / "images-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for key, cls in [("ok", b"9"), ("neg", b"-3"), ("big", b"5000000"), ("ten", b"10")]:
            for ext, data in (("jpg", jpg.getvalue()), ("cls", cls)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "out")
    assert tokenize(capsys, *common(str(shard.parent), out, tok))[0] == 0  # tiny.yaml: model.num_classes 10
    assert tokenize(capsys, "--finalize", "--out", out)[0] == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    reasons = {s["src"]: s["reason"] for s in m["skipped"]}
    assert reasons == {f"images-000000.tar:{k}": f"class {c} outside [0, 10) (num_classes)"
                       for k, c in (("neg", -3), ("big", 5000000), ("ten", 10))}
    assert m["class_histogram"] == {"9": 2} and m["num_classes"] == 10
    # a folder input with more class folders than the model has classes: an error before any work
    for c in range(3):
        save_img(str(tmp_path / "folder" / f"c{c}" / "a.JPEG"))
    rc, err = tokenize(capsys, *common(str(tmp_path / "folder"), str(tmp_path / "o2"), tok, "--num-classes", 2))
    assert rc == 2 and "class indices up to 2 (3 classes) but the model has num_classes=2" in err
    assert not glob.glob(str(tmp_path / "o2" / "shard-*"))
    # the JSONL converter: class 10**30 and 1000 are listed, not written
    lines = [{"class_id": c, "tokens": [1] * 16} for c in (3, 10**30, 1000, 999)]
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    m = convert(str(src), str(tmp_path / "conv"), (4, 4), 64, shuffle_seed=-1)
    assert m["num_samples"] == 2 and m["class_histogram"] == {"3": 1, "999": 1}
    assert [s["reason"] for s in m["skipped"]] == [f"line 2: class_id {10**30} outside [0, 1000)",
                                                  "line 3: class_id 1000 outside [0, 1000)"]


# ------------------------------------------------------------------------------------------------
# 12. Only ImageNet's formats are decoded
# ------------------------------------------------------------------------------------------------


def test_eps_named_jpeg_never_reaches_ghostscript(fake_gs, monkeypatch):
    from rear_ds.data.preprocess import load_image

    monkeypatch.setenv("PATH", fake_gs[0] + os.pathsep + os.environ["PATH"])
    with pytest.raises(ValueError) as e:
        load_image(eps_bytes())
    assert not fake_gs[1].exists()  # was run: first `gs --version`, then to render the page
    assert str(e.value) == "not an image in an accepted format (JPEG, PNG, WEBP, BMP, TIFF)"


# ------------------------------------------------------------------------------------------------
# 13. Garbage under a chunk name is an invalid chunk, never a traceback
# ------------------------------------------------------------------------------------------------


def absurd_npz(path, key="labels", shape=(10**15,), descr="<i8"):
    """A chunk-like .npz whose ``key`` header claims ``shape`` (8 PB of int64) over 8 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{key}.npy", buf.getvalue() + b"\0" * 8)
        for k in ("images", "labels", "indices", "fingerprint"):
            if k != key:
                b = io.BytesIO()
                np.save(b, np.zeros(1, np.int64))
                zf.writestr(f"{k}.npy", b.getvalue())


def test_garbage_chunks_are_listed_as_invalid(tmp_path):
    from rear_ds.evaluation.chunks import IncompleteSamplesError, chunk_is_complete, gather_chunks, write_chunk

    d = str(tmp_path)
    for k in range(2):  # N = 8, chunks of 4, 2 classes
        idx = np.arange(4 * k, 4 * k + 4)
        write_chunk(os.path.join(d, f"chunk_{k:06d}.npz"), np.zeros((4, 8, 8, 3), np.uint8), idx % 2, idx, "fp")
    np.save(os.path.join(d, "x.npy"), np.arange(3))
    os.replace(os.path.join(d, "x.npy"), os.path.join(d, "chunk_000002.npz"))
    absurd_npz(os.path.join(d, "chunk_000003.npz"))
    g = gather_chunks(d, 8, 4, 2, "fp")  # the valid chunks hold every index: named, not fatal
    bad = g.accounting["invalid_chunk_files"]
    assert g.accounting["chunks_invalid"] == 2 and len(g.files) == 2
    assert bad[0].startswith("chunk_000002.npz (unreadable: sample chunk") and "not an .npz file" in bad[0]
    assert bad[1].startswith("chunk_000003.npz (unreadable: ") and "claims shape (1000000000000000,)" in bad[1]
    absurd_npz(os.path.join(d, "chunk_000000.npz"), "images", (1, 10**6, 10**6, 3), "|u1")
    ok, why = chunk_is_complete(os.path.join(d, "chunk_000000.npz"), 0, 4, 2, "fp")  # what the sampler asks
    assert not ok and "claims shape" in why
    with pytest.raises(IncompleteSamplesError, match=r"chunk_000000.npz \(present but invalid\)"):
        gather_chunks(d, 8, 4, 2, "fp")


# ------------------------------------------------------------------------------------------------
# 14. Part files: appended, not rewritten; finalize takes the entry that matches the file
# ------------------------------------------------------------------------------------------------


def io_written() -> int:
    return int(next(line for line in open("/proc/self/io") if line.startswith("wchar")).split()[1])


def test_part_file_grows_by_one_line_per_shard(tok, tmp_path, capsys):
    root = tmp_path / "train"
    for i in range(12):
        save_img(str(root / f"n0{i % 3}/img{i}.JPEG"), seed=i)
    out = str(tmp_path / "out")
    before = io_written()
    assert tokenize(capsys, *common(str(root), out, tok, "--images-per-shard", 1))[0] == 0
    written = io_written() - before
    (part,) = glob.glob(os.path.join(out, "_parts", "rank-00000-of-00001.*"))
    # bytes this process wrote = the shards + the part file once + the manifest (a one-process run finalizes
    # itself); rewriting the part file after every shard (as it was) wrote 11 more copies of its header and 66
    # more of its entries
    extra = (written - sum(map(len, shard_bytes(out).values())) - os.path.getsize(part)
             - os.path.getsize(os.path.join(out, "manifest.json")))
    assert 0 <= extra < 0.1 * os.path.getsize(part), (written, extra, os.path.getsize(part))
    lines = open(part).read().splitlines()
    assert len(lines) == 13 and [json.loads(x)["shard"]["name"] for x in lines[1:]] == \
        [f"shard-{j:06d}.tar" for j in range(12)]


def test_finalize_takes_the_entry_matching_the_file_over_a_leftover_part(tok, tmp_path, capsys):
    """World size 4 first; an image is replaced in place and its shard redone with world size 2: the
    leftover part of the 4-rank run still describes the old file. Finalize must not prefer it (it did, by
    file name order: every rerun and finalize then failed the same way)."""
    root = tmp_path / "train"
    for i in range(8):
        save_img(str(root / f"n0{i % 2}/img{i}.JPEG"), seed=i)
    out = str(tmp_path / "out")
    args = common(str(root), out, tok, "--images-per-shard", 2, "--shuffle-seed", -1)
    for r in range(4):
        assert tokenize(capsys, *args, "--rank", r, "--world-size", 4)[0] == 0
    save_img(str(root / "n01/img3.JPEG"), seed=99)  # same name, new content: shard 2 of the sorted list
    os.remove(os.path.join(out, "shard-000002.tar"))
    for r in range(2):
        assert tokenize(capsys, *args, "--rank", r, "--world-size", 2)[0] == 0
    parts = sorted(os.listdir(os.path.join(out, "_parts")))
    assert len(parts) == 6, parts
    rc, err = tokenize(capsys, "--finalize", "--out", out, "--world-size", 2)
    assert rc == 0, err
    m = json.load(open(os.path.join(out, "manifest.json")))
    from rear_ds.data.shards import sha256_file

    assert all(s["sha256"] == sha256_file(os.path.join(out, s["name"])) for s in m["shards"])
    finalize(out)  # and again: stable


def test_scratch_folder_of_a_killed_writer_is_taken_over_and_a_live_one_refused(tmp_path):
    """rear_ds.tmpfile: the writer is SIGKILLed holding the lock; the next one takes the folder over."""
    from rear_ds.tmpfile import ClaimedTmp, TmpBusyError

    target = str(tmp_path / "samples_adm.npz")
    script = ("import os, signal, sys\nfrom rear_ds.tmpfile import ClaimedTmp\n"
              "c = ClaimedTmp(sys.argv[1])\nopen(c.tmp, 'wb').write(b'partial' * 1000)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    res = subprocess.run([sys.executable, "-c", script, target], env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert res.returncode == -9 and sorted(os.listdir(target + ".tmp")) == ["lock", "samples_adm.npz"]
    claim = ClaimedTmp(target, wait=False)  # the lock died with its holder
    assert os.listdir(claim.dir) == ["lock"]  # its partial file is gone
    with pytest.raises(TmpBusyError, match="in use by another live process"):
        ClaimedTmp(target, wait=False)  # (flock locks are per open file: a second claim in-process is refused too)
    open(claim.tmp, "wb").write(b"done")
    claim.commit()
    assert os.listdir(tmp_path) == ["samples_adm.npz"] and open(target, "rb").read() == b"done"


# ------------------------------------------------------------------------------------------------
# The hostile folder through tokenize, training, sampling and evaluation
# ------------------------------------------------------------------------------------------------


def run_killed_at_file_size(module: str, args: list, limit: int, **env_extra):
    """Run ``python -m module args`` with RLIMIT_FSIZE=limit and SIGXFSZ at its default action (Python ignores
    it): the kernel kills the process at the write that crosses the limit, as a preemption would."""
    script = ("import resource, runpy, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
              f"sys.argv = [{module!r}] + sys.argv[1:]\n"
              f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=th.env(PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="",
                                                             PYTHONDONTWRITEBYTECODE="1", **env_extra))


def leftovers(folder) -> list:
    return sorted(n for n in os.listdir(folder) if ".tmp" in n)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """3 classes x 4 good images, and: a 1 x 40,000 PNG, an EPS named .JPEG, a symlink loop, a link to a
    folder already listed, a FIFO named .JPEG. (The test adds a token shard with a 64 GiB tar header for
    training, garbage chunk files for sampling and evaluation.)"""
    root = tmp_path_factory.mktemp("hostile") / "train"
    for c in range(3):
        for i in range(4):
            save_img(str(root / f"n0{c}/img{i}.JPEG"), size=(48 + 8 * i, 40), seed=10 * c + i)
    Image.new("RGB", THIN, (200, 10, 10)).save(root / "n00/thin.png")
    (root / "n01/eps.JPEG").write_bytes(eps_bytes())
    os.symlink(".", root / "n01/loop")
    os.symlink("../n00", root / "n02/alias")
    os.mkfifo(root / "n02/pipe.JPEG")
    return root


BAD = {"n00/thin.png": "too elongated: 1x40000",
       "n01/eps.JPEG": "not an image in an accepted format (JPEG, PNG, WEBP, BMP, TIFF)",
       "n01/loop": "link to the folder 'n01', already listed: not followed",
       "n02/alias": "link to the folder 'n00', already listed: not followed",
       "n02/pipe.JPEG": "not a regular file (FIFO)"}


@launcher
@pytest.mark.timeout(900)
def test_hostile_folder_through_the_whole_pipeline(hostile, tok, fake_gs, tmp_path, capsys, monkeypatch):
    from test_evaluate import make_inception_weights

    monkeypatch.setenv("PATH", fake_gs[0] + os.pathsep + os.environ["PATH"])
    # --- tokenize: every bad input skipped and named, each good image once ---
    shards = str(tmp_path / "shards")
    rc, err = tokenize(capsys, *common(str(hostile), shards, tok, "--images-per-shard", 5))
    assert rc == 0, err[-3000:]
    assert tokenize(capsys, "--finalize", "--out", shards)[0] == 0
    m = json.load(open(os.path.join(shards, "manifest.json")))
    reasons = {s["src"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(BAD) and all(reasons[k].startswith(v) for k, v in BAD.items()), reasons
    assert m["accounting"] == {"images_seen": 17, "images_written": 12, "images_skipped": 5, "samples_written": 24}
    from rear_ds.data.shards import iter_shard

    srcs = [s["src"] for e in m["shards"] for s in iter_shard(os.path.join(shards, e["name"]))]
    assert sorted(srcs) == sorted(f"n0{c}/img{i}.JPEG" for c in range(3) for i in range(4) for _ in range(2))
    assert not fake_gs[1].exists()
    # --- a crafted shard in the training set: 1.5 KB whose first tar header claims a 64 GiB member ---
    from test_reader import _crafted_huge_member
    from rear_ds.data.shards import write_json_atomic

    crafted = m["shards"][-1]["name"]
    _crafted_huge_member(pathlib.Path(shards, crafted))
    m["shards"][-1]["bytes"] = os.path.getsize(os.path.join(shards, crafted))  # its size agrees with the manifest
    write_json_atomic(os.path.join(shards, "manifest.json"), m)
    # --- one training launch on those shards ---
    run_dir = str(tmp_path / "run")
    res = th.run(th.command("zero2_bf16.json", [f"train.out_dir={run_dir}", f"data.shards={shards}",
                                                f"tokenizer.weights={tok}", "data.num_workers=0", "train.max_steps=4",
                                                "train.ckpt_every=4", "train.log_every=1"]), timeout=400)
    assert res.returncode == 0, res.output[-5000:]
    curve = th.losses(run_dir)
    assert sorted(curve) == [1, 2, 3, 4] and curve[4]["corrupt_shards_skipped"] == 1
    assert f"skipping corrupt token shard {crafted}" in res.output
    # --- sampling from the run folder: garbage where chunk 0 goes, an absurd chunk outside the range ---
    samples = str(tmp_path / "samples")
    os.makedirs(samples)
    np.save(os.path.join(samples, "garbage.npy"), np.arange(5))
    os.replace(os.path.join(samples, "garbage.npy"), os.path.join(samples, "chunk_000000.npz"))
    absurd_npz(os.path.join(samples, "chunk_000007.npz"))
    sample_args = ["--checkpoint", run_dir, "--out-dir", samples, "--num-samples", "10", "--chunk-size", "4",
                   "--batch-size", "4", "--no-progress"]
    killed = run_killed_at_file_size("rear_ds.sample", sample_args, 256 * 1024)  # dies writing the fp32 export
    assert killed.returncode == -25, killed.stderr[-3000:]
    assert leftovers(samples) == ["model_step_00000004.safetensors.tmp"]
    res = subprocess.run([sys.executable, "-m", "rear_ds.sample", *sample_args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env=th.env(PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "regenerating chunk_000000.npz: unreadable: sample chunk" in res.stderr and "not an .npz" in res.stderr
    assert leftovers(samples) == []
    # --- evaluation against the hostile folder itself as reference; killed once while writing samples_adm ---
    weights = make_inception_weights(str(tmp_path / "weights-inception-test.pth"))
    ev = str(tmp_path / "eval")
    eval_args = ["--samples", samples, "--reference", str(hostile), "--inception-weights", weights, "--out", ev,
                 "--batch-size", "10"]
    killed = run_killed_at_file_size("rear_ds.evaluate", eval_args, 16 * 1024)
    assert killed.returncode == -25 and leftovers(ev) == ["samples_adm.npz.tmp"], killed.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "rear_ds.evaluate", *eval_args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=th.env(PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stderr[-3000:]
    assert leftovers(ev) == [] and np.load(os.path.join(ev, "samples_adm.npz"))["arr_0"].shape == (10, 32, 32, 3)
    r = json.load(open(os.path.join(ev, "results.json")))
    acc = r["accounting"]
    assert acc["samples_scored"] == 10 and acc["reference_images"] == 12 and acc["reference_images_skipped"] == 5
    assert acc["invalid_chunk_files"][0].startswith("chunk_000007.npz (unreadable:")
    ref_reasons = {s["src"]: s["reason"] for s in r["reference"]["skipped"]}
    assert set(ref_reasons) == set(BAD) and all(ref_reasons[k].startswith(v) for k, v in BAD.items()), ref_reasons
    assert np.isfinite(r["metrics"]["fid"]) and not fake_gs[1].exists()
