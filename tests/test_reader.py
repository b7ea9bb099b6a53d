"""The training reader: both orders, exact resume, equal data per rank, views per image, mixing, bad data."""
import errno
import json
import logging
import os
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest

from rear_ds.config import ConfigError, DataConfig, ModelConfig
from rear_ds.data import build_train_loader
from rear_ds.data import reader as R
from rear_ds.data import shards as S
from rear_ds.data.jsonl import convert
from rear_ds.data.reader import ReaderStateError
from rear_ds.data.shards import ShardError, load_manifest

GRID, K, C = (4, 4), 64, 10
MODEL = ModelConfig(codebook_size=K, num_tokens=16, num_classes=C)
ORDERS = ["epoch", "resampled"]


def _line(i):
    # tokens encode the line id (base 64 digits) so every sample is identifiable in a batch
    toks = [(i >> (6 * d)) % K for d in range(3)] + [i % 7] * 13
    return json.dumps({"class_id": i % C, "tokens": toks})


def sample_id(tokens_row):
    t = [int(x) for x in tokens_row[:3]]
    return t[0] + (t[1] << 6) + (t[2] << 12)


def ids(batch):
    return [sample_id(r) for r in batch[0]]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    jsonl = root / "tok.jsonl"
    jsonl.write_text("\n".join(_line(i) for i in range(250)) + "\n")
    convert(str(jsonl), str(root / "shards"), GRID, K, samples_per_shard=50)  # 5 shards (uneven over 2 ranks)
    return root


def loader(path, rank=0, world=1, workers=0, batch=8, seed=3, order="epoch", **kw):
    kw.setdefault("shuffle_buffer", 16)
    cfg = DataConfig(shards=str(path), num_workers=workers, order=order, **kw)
    return build_train_loader(cfg, MODEL, rank, world, seed, batch)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(a, b))


@pytest.mark.parametrize("order", ORDERS)
def test_batches_shape_and_dtype(data, order):
    tokens, labels = next(loader(data / "shards", order=order))
    assert tokens.shape == (8, 16) and labels.shape == (8,)
    assert str(tokens.dtype) == "torch.int64" and str(labels.dtype) == "torch.int64"
    assert all(labels[j].item() == sid % C for j, sid in enumerate(ids((tokens, labels))))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_batches(data, order, workers):
    a = loader(data / "shards", workers=workers, order=order)
    ref = take(a, 5)
    state = a.state_dict()
    ref += take(a, 40)  # crosses shard and draw boundaries (and, epoch order, an epoch: 250 samples)
    a.close()
    b = loader(data / "shards", workers=workers, order=order)
    b.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON
    got = take(b, 40)
    b.close()
    assert same(ref[5:], got)
    assert b.stats["samples_read"] == 45 * 8
    if order == "epoch":  # a micro-batch is a function of its index: the worker count does not matter
        assert same(ref, take(loader(data / "shards", workers=2 - workers, order=order), 45))


def test_state_of_another_layout_is_refused(data):
    a = loader(data / "shards")
    next(a)
    with pytest.raises(ReaderStateError, match="seed"):
        loader(data / "shards", seed=4).load_state_dict(a.state_dict())
    with pytest.raises(ReaderStateError, match="order"):
        loader(data / "shards", order="resampled").load_state_dict(a.state_dict())


def _epoch_run(path, world, batch, batches, pos=None):
    """{global position: sample id} of ``batches`` micro-batches on each of ``world`` ranks (continuing from a
    saved position), and the position to continue from."""
    got, end = {}, None
    for r in range(world):
        it = loader(path, rank=r, world=world, batch=batch)
        assert it.continue_from(pos) is None if pos else True
        base = pos["position"] if pos else 0
        for i in range(batches):
            for j, sid in enumerate(ids(next(it))):
                got[base + (i * world + r) * batch + j] = sid
        end = it.position()
    return got, end


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_order_reads_each_sample_once_per_epoch(data, world):
    n, b = 250, 8
    got, _ = _epoch_run(data / "shards", world, b, -(-2 * n // (world * b)))  # two epochs
    assert sorted(got) == list(range(len(got)))  # the ranks' batches tile the positions
    assert sorted(got[p] for p in range(n)) == list(range(n))  # epoch 0: every sample once
    assert sorted(got[p] for p in range(n, 2 * n)) == list(range(n))  # epoch 1 too, in another order
    assert [got[p] for p in range(n)] != [got[p] for p in range(n, 2 * n)]
    one_rank, _ = _epoch_run(data / "shards", 1, b, 4)  # the global order does not depend on the world size
    assert all(got[p] == one_rank[p] for p in one_rank)


def test_epoch_order_continues_on_another_world_size(data):
    """2 ranks (micro-batch 8) stop mid-epoch; 3 ranks (micro-batch 6) continue from the saved global position:
    epoch 0 still reads every sample exactly once."""
    first, pos = _epoch_run(data / "shards", 2, 8, 7)
    assert pos["position"] == 7 * 2 * 8 and sorted(first) == list(range(112))
    rest, _ = _epoch_run(data / "shards", 3, 6, 8, pos=json.loads(json.dumps(pos)))
    assert min(rest) == 112
    epoch0 = [first.get(p, rest.get(p)) for p in range(250)]
    assert sorted(epoch0) == list(range(250))
    it = loader(data / "shards", order="resampled")
    assert "resampled" in it.continue_from(pos)


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 65, 1000, 4097):
        p = R.Permutation(n, 42, 1, 0)(np.arange(n))
        assert sorted(p.tolist()) == list(range(n))
    a, b = R.Permutation(1000, 1, 1, 0)(np.arange(1000)), R.Permutation(1000, 1, 1, 1)(np.arange(1000))
    assert (a != b).mean() > 0.9  # another epoch, another order
    assert abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.1


def test_resampled_ranks_disjoint_and_equal_batches(data):
    seen = []
    for rank in (0, 1):
        it = loader(data / "shards", rank=rank, world=2, order="resampled")
        batches = take(it, 40)  # both ranks keep going for as long as they are asked
        assert len(batches) == 40 and all(t.shape == (8, 16) for t, _ in batches)
        seen.append({s for b in batches for s in ids(b)})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    assert len(seen[0] | seen[1]) == 250  # together they cover the data


def test_rank_ranges_are_equal_shares():
    for n, world in ((250, 2), (7000, 8), (65_037, 8), (3, 3)):
        shares = [np.subtract(*R.rank_range(n, r, world)[::-1]) for r in range(world)]
        assert max(shares) - min(shares) <= 1 and sum(shares) == n
    with pytest.raises(ConfigError, match="rank 0 of 4 gets no token data"):
        R.TrainLoader(type("Src", (), {"files": lambda self: [("a", "a", 3)]})(), DataConfig(shards="x"), 0, 4, 0, 1)


def test_resampled_reads_every_sample_equally_often_whatever_its_shard_size(tmp_path):
    """Runs at random offsets of the rank's range (wrapping around): a sample of the 5-sample last shard is
    read as often as one of a 50-sample shard."""
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(_line(i) for i in range(105)) + "\n")
    convert(str(jsonl), str(tmp_path / "s"), GRID, K, samples_per_shard=50, shuffle_seed=-1)  # 50 + 50 + 5
    it = loader(tmp_path / "s", batch=5, order="resampled")
    counts = Counter(s for b in take(it, 420) for s in ids(b))  # 2100 samples, about 20 each
    last = sum(counts[i] for i in range(100, 105)) / 5
    rest = sum(counts[i] for i in range(100)) / 100
    assert 0.5 < last / rest < 2.0, (last, rest)


@pytest.mark.parametrize("order", ORDERS)
def test_shuffling_depends_on_seed(data, order):
    assert ids(next(loader(data / "shards", seed=1, order=order))) != ids(next(loader(data / "shards", seed=2, order=order)))


def test_mixing_is_close_to_random(tmp_path):
    """Issue 20 item 2: one rank owning a single shard much larger than the old 1000-sample buffer, two
    DataLoader workers, two micro-batches per step. The old reader's workers read that shard in lockstep:
    the micro-batches of a step shared ~4x what random batches share, and so did batch j of a worker's
    consecutive passes. Now both stay near random (epoch order: no sample twice within an epoch)."""
    from rear_ds.data.bench import mixing_stats

    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(_line(i) for i in range(8192)) + "\n")
    convert(str(jsonl), str(tmp_path / "s"), GRID, K, samples_per_shard=8192, shuffle_seed=-1)  # one shard
    for order in ORDERS:
        it = loader(tmp_path / "s", workers=2, batch=128, order=order, shuffle_buffer=R.DataConfig.shuffle_buffer)
        m = mixing_stats(it, pass_batches=64, population=8192, workers=2)
        it.close()
        assert m["random_shared"] == 2.0
        assert m["step_shared"] < 4 and m["pass_shared"] < 4, (order, m)
        if order == "epoch":
            assert m["step_shared"] == 0  # one epoch never repeats a sample


def test_manifest_must_match_model(data):
    with pytest.raises(ConfigError, match=r"manifest.json.*codebook_size=64.*model.codebook_size=128"):
        build_train_loader(DataConfig(shards=str(data / "shards")), ModelConfig(codebook_size=128, num_tokens=16),
                           0, 1, 0, 4)
    with pytest.raises(ConfigError, match=r"num_tokens=16 disagrees with model.num_tokens=256"):
        build_train_loader(DataConfig(shards=str(data / "shards")), ModelConfig(codebook_size=64), 0, 1, 0, 4)


# ---------------------------------------------------------------------------------------------------
# One view per image
# ---------------------------------------------------------------------------------------------------


def _views_shards(root, images=40, views=3, per_shard=15):
    """Shards where sample <image>_<view> has tokens (image, view, ...), each shard in a shuffled order, and
    a manifest; returns the folder."""
    out = root / "views"
    out.mkdir()
    entries, hist, rng = [], {}, np.random.default_rng(0)
    for j, lo in enumerate(range(0, images, per_shard)):
        w = S.ShardWriter(str(out / S.shard_name(j)))
        samples = [(i, v) for i in range(lo, min(images, lo + per_shard)) for v in range(views)]
        for k in rng.permutation(len(samples)):
            i, v = samples[k]
            w.add(S.sample_key(i, v), np.array([i, v] + [0] * 14, dtype=np.uint16).reshape(GRID), i % C, v, f"img{i}")
            hist[str(i % C)] = hist.get(str(i % C), 0) + 1
        entries.append(w.commit())
    S.write_json_atomic(str(out / S.MANIFEST), {
        "format": S.FORMAT, "codebook_size": K, "num_tokens": 16, "grid": list(GRID), "shards": entries,
        "num_samples": images * views, "class_histogram": hist})
    return out


def test_one_view_per_image(tmp_path):
    """views=one_per_image: an epoch is one pass over the images, each fetch reads one of the image's views at
    random (AliTok's trainer); exact resume in both orders; views=all reads every view once per epoch."""
    out = _views_shards(tmp_path)

    def run(order, views, n, state=None, workers=0):
        it = loader(out, batch=4, order=order, views=views, workers=workers)
        if state:
            it.load_state_dict(state)
        batches = take(it, n)
        it.close()
        return [(int(r[0]), int(r[1])) for t, _ in batches for r in t], it.state_dict(), batches

    pairs, _, _ = run("epoch", "one_per_image", 20)  # two epochs of 40 images
    for e in (pairs[:40], pairs[40:]):
        assert sorted(i for i, _ in e) == list(range(40))
    assert len({v for _, v in pairs}) == 3  # views drawn at random, again in every epoch
    assert dict(pairs[:40]) != dict(pairs[40:])
    allv, _, _ = run("epoch", "all", 30)
    assert sorted(allv) == [(i, v) for i in range(40) for v in range(3)]
    for order in ORDERS:
        _, state, _ = run(order, "one_per_image", 3, workers=2)
        _, _, ref = run(order, "one_per_image", 13, workers=2)
        _, _, got = run(order, "one_per_image", 10, state=json.loads(json.dumps(state)), workers=2)
        assert same(ref[3:], got), order
    it = loader(out, order="resampled", views="one_per_image", batch=4)
    assert Counter(i for t, _ in take(it, 100) for i in t[:, 0].tolist()).most_common()[-1][1] > 2  # all images


def test_one_view_per_image_needs_the_image_index(data, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(data / "shards", old)
    m = load_manifest(str(old))
    for e in m["shards"]:  # as rear_ds wrote shards before v2: no __rear_index__ member
        p = old / e["name"]
        raw = p.read_bytes()[:S.ShardFile(str(p), e["samples"], e["bytes"]).open_layout().index_offset]
        p.write_bytes(raw + b"\0" * (S.tar_bytes(len(raw)) - len(raw)))
        e["bytes"] = p.stat().st_size
    S.write_json_atomic(str(old / S.MANIFEST), m)
    assert len(take(loader(old), 40)) == 40  # still read with views=all
    with pytest.raises(ConfigError, match="one_per_image needs every shard's image index.*no __rear_index__"):
        loader(old, views="one_per_image")


# ---------------------------------------------------------------------------------------------------
# The shard format
# ---------------------------------------------------------------------------------------------------


def test_shards_are_plain_webdataset_deterministic_ustar(data, tmp_path):
    import tarfile

    import webdataset as wds

    convert(str(data / "tok.jsonl"), str(tmp_path / "again"), GRID, K, samples_per_shard=50)
    for e in load_manifest(str(data / "shards"))["shards"]:  # a rerun writes the same bytes
        assert (data / "shards" / e["name"]).read_bytes() == (tmp_path / "again" / e["name"]).read_bytes()
    path = str(data / "shards" / "shard-000000.tar")
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 and not m.pax_headers for m in members)
    raw = open(path, "rb").read(512)
    assert raw[257:265] == b"ustar\x0000"  # POSIX USTAR magic, no PAX/GNU extension headers
    assert members[-1].name == S.INDEX_MEMBER
    plain = list(wds.WebDataset(path, shardshuffle=False).decode())  # what any webdataset user gets
    ours = list(S.iter_shard(path))
    assert len(plain) == len(ours) == 50
    for p, o in zip(plain, ours):
        assert p["__key__"] == o["key"] and p["cls"] == o["cls"] and (p["tokens.npy"] == o["tokens"]).all()
        assert set(p) >= {"cls", "src", "tokens.npy", "view"}


def _copy(src, dst):
    shutil.copytree(src, dst)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_shard_is_skipped_and_counted(data, tmp_path, caplog, damage, order):
    d = tmp_path / "s"
    _copy(data / "shards", d)
    bad = d / "shard-000002.tar"
    in_bad = {sample_id(s["tokens"].reshape(-1)) for s in S.iter_shard(str(bad))}
    raw = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(raw[: len(raw) // 2])
    else:  # same size, a tar header in the middle overwritten
        bad.write_bytes(raw[:20480] + b"\xff" * 1024 + raw[20480 + 1024:])
    it = loader(d, order=order)
    with caplog.at_level(logging.WARNING):
        batches = take(it, 60)  # > 250 samples: every shard gets drawn
    assert it.stats["corrupt_shards_skipped"] == 1 and it.stats["corrupt_shards"] == ["shard-000002.tar"]
    assert "skipping corrupt token shard shard-000002.tar" in caplog.text
    assert len(batches) == 60 and all(t.shape == (8, 16) for t, _ in batches)
    # once found corrupt, the shard's samples never come (before, intact ranges of a garbled shard may be read)
    assert not {s for b in take(it, 30) for s in ids(b)} & in_bad
    if order == "epoch":
        assert it.stats["replaced_samples"] > 0 and it.state_dict()["bad"] == ["shard-000002.tar"]
    with pytest.raises(ShardError, match="shard-000002.tar.*on_corrupt_shard=error"):
        take(loader(d, on_corrupt_shard="error", order=order), 60)


def _crafted_huge_member(path):
    """A 1.5 KB tar whose first header claims a 64 GiB member (GNU base-256 size field)."""
    import tarfile

    info = tarfile.TarInfo("000000000_0.cls")
    info.size = 1
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[124:136] = b"\x80" + (64 * 2 ** 30).to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    path.write_bytes(bytes(block) + b"1" + b"\0" * 511 + b"\0" * 512)


@pytest.mark.parametrize("order", ORDERS)
def test_crafted_huge_member_is_a_corrupt_shard(data, tmp_path, order):
    """Issue 20 item 5: tarfile used to read the claimed 64 GiB (MemoryError, not caught: the run died even
    with on_corrupt_shard=skip). Now every read is bounded by the sample layout and the shard is corrupt."""
    d = tmp_path / "s"
    _copy(data / "shards", d)
    _crafted_huge_member(d / "shard-000001.tar")
    with pytest.raises(ShardError, match="shard-000001.tar"):
        list(S.iter_shard(str(d / "shard-000001.tar")))
    from rear_ds.data.sources import InputError, list_wds  # the same tar as a tokenizer input: a clear error

    with pytest.raises(InputError, match="shard-000001.tar.*not a readable tar file"):
        list_wds(str(d / "shard-000001.tar"))
    m = load_manifest(str(d))
    m["shards"][1]["bytes"] = (d / "shard-000001.tar").stat().st_size  # its size agrees with the manifest
    S.write_json_atomic(str(d / S.MANIFEST), m)
    it = loader(d, order=order)
    take(it, 50)
    assert it.stats["corrupt_shards"] == ["shard-000001.tar"]


def test_stat_failure_is_not_corrupt_forever(data, tmp_path, monkeypatch):
    """Issue 20 item 3: the reader sized a shard with os.path.exists, which says False for any OSError: one
    failed stat made the shard corrupt for good (saved in the state, excluded after a resume). The real
    errno here: ELOOP from a symlink loop put in the shard's place. Now the shard is left out for a while
    (not saved as corrupt) and read again once it is back."""
    monkeypatch.setattr(R, "UNREADABLE_RETRY_S", 0.0)
    d = tmp_path / "s"
    _copy(data / "shards", d)
    shard = d / "shard-000003.tar"
    mine = {sample_id(s["tokens"].reshape(-1)) for s in S.iter_shard(str(shard))}
    shard.rename(d / "real.tar")
    shard.symlink_to(shard)  # stat() -> ELOOP
    with pytest.raises(OSError) as e:
        os.stat(shard)
    assert e.value.errno == errno.ELOOP and not os.path.exists(shard)
    it = loader(d)
    before = take(it, 20)
    assert not set(s for b in before for s in ids(b)) & mine
    assert it.stats["corrupt_shards"] == [] and it.state_dict()["bad"] == [] and it.stats["unreadable_skips"] > 0
    shard.unlink()
    (d / "real.tar").rename(shard)
    after = take(it, 40)
    assert set(s for b in after for s in ids(b)) & mine  # read again


def _can_make_eio():
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("losetup", "mkfs.ext2", "mount", "umount"))


@pytest.mark.skipif(not _can_make_eio(), reason="needs root, losetup, mkfs.ext2 and mount for a real EIO")
def test_transient_eio_is_retried_without_changing_the_stream(data, tmp_path, monkeypatch, caplog):
    """A real EIO: the shards sit on an ext2 file system in a loop device; the device is shrunk under the
    mounted file system (reads past its end fail with EIO in the block layer), and grown back (with the same
    bytes) during the reader's first back-off. The retry succeeds and the stream is the undisturbed one."""
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext2", "-q", "-b", "1024", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            (mnt / "s").mkdir()
            shutil.copy(data / "shards" / S.MANIFEST, mnt / "s")  # the manifest in the first blocks, then
            with open(mnt / "filler", "wb") as f:  # a filler, so that the shards land past the first 2 MiB
                f.write(b"\0" * (3 << 20))
            for p in (data / "shards").glob("*.tar"):
                shutil.copy(p, mnt / "s")
            os.sync()
            for p in (mnt / "s").glob("*.tar"):
                fd = os.open(p, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # no page cache: reads go to the device
                os.close(fd)
            ref = take(loader(data / "shards"), 12)
            tail = img.read_bytes()[2 << 20:]
            os.truncate(img, 2 << 20)
            subprocess.run(["losetup", "-c", dev], check=True)
            fixes = []

            def back_off(s):  # the device comes back during the first wait
                if not fixes:
                    with open(img, "r+b") as f:
                        f.seek(2 << 20)
                        f.write(tail)
                    subprocess.run(["losetup", "-c", dev], check=True)
                fixes.append(s)

            monkeypatch.setattr(R.time, "sleep", back_off)
            it = loader(mnt / "s")
            with caplog.at_level(logging.WARNING):
                got = take(it, 12)
            it.close()  # its descriptors would keep the file system busy
            assert "Input/output error" in caplog.text and "EIO" in caplog.text, caplog.text
            assert fixes and it.stats["read_retries"] >= 1 and it.stats["corrupt_shards"] == []
            assert same(ref, got)
        finally:
            if subprocess.run(["umount", str(mnt)]).returncode:
                subprocess.run(["umount", "-l", str(mnt)], check=True)  # detached once the last user is gone
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


# ---------------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_jsonl_reader_and_resume(data, order):
    cfg = DataConfig(jsonl=str(data / "tok.jsonl"), num_workers=0, shuffle_buffer=16, order=order)
    a = build_train_loader(cfg, MODEL, 0, 1, 0, 8)
    ref = take(a, 3)
    state = a.state_dict()
    ref += take(a, 3)
    b = build_train_loader(cfg, MODEL, 0, 1, 0, 8)
    b.load_state_dict(state)
    assert same(ref[3:], take(b, 3))
    if order == "epoch":
        assert len({s for x in ref for s in ids(x)}) == 48  # no repeats within the first pass
    with pytest.raises(ConfigError, match="model.num_tokens=256"):
        build_train_loader(cfg, ModelConfig(codebook_size=64), 0, 1, 0, 8)


def test_jsonl_bad_line_is_skipped_alone(tmp_path, caplog):
    """Issue 20 item 8: one bad line used to drop its whole 8192-line block (those lines were never read).
    Now the line alone is skipped (counted); every other line comes once per epoch."""
    n, bad = 9000, 4321
    src = tmp_path / "x.jsonl"
    src.write_text("\n".join("not json" if i == bad else _line(i) for i in range(n)) + "\n")
    it = build_train_loader(DataConfig(jsonl=str(src), num_workers=0), ModelConfig(codebook_size=K, num_tokens=16,
                                                                                       num_classes=C), 0, 1, 0, 500)
    with caplog.at_level(logging.WARNING):
        got = Counter(s for b in take(it, 18) for s in ids(b))  # exactly one epoch
    assert bad not in got
    assert sum(1 for i in range(n) if i != bad and got[i] >= 1) == n - 1
    assert it.stats["bad_samples"] == 1 and it.stats["replaced_samples"] == 1
    assert f"line {bad + 1}: not a" in caplog.text


def test_line_index_is_numpy_and_says_when_uncached(tmp_path, caplog, monkeypatch):
    """Issue 20 item 14: the index was built in Python lists (~70 bytes a line, ~1 GB per rank at 12.8M lines)
    and, where its cache could not be written, rebuilt on every start without a word. The real error here: a
    directory in the cache file's place, so os.replace fails."""
    import tracemalloc

    from rear_ds.data import jsonl as J

    monkeypatch.setattr(J, "SCAN_CHUNK", 1 << 16)
    src = tmp_path / "x.jsonl"
    n = 200_000
    src.write_text("".join(f'{{"i": {i}}}\n' if i % 100 else "\n" for i in range(n)))
    tracemalloc.start()
    offsets, numbers = J.line_index(str(src))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(offsets) == n - n // 100 and numbers[1] == 3 and offsets.dtype == np.int64
    assert peak / len(offsets) < 48, peak / len(offsets)  # two int64 columns + a chunk of temporaries
    o2, n2 = J.line_index(str(src))  # read back from the cache (memory-mapped)
    assert isinstance(o2, np.memmap) and (o2 == offsets).all() and (n2 == numbers).all()
    os.remove(f"{src}.lineidx.npy")
    os.mkdir(f"{src}.lineidx.npy")
    with caplog.at_level(logging.WARNING):
        J.line_index(str(src))
        J.line_index(str(src))
    assert caplog.text.count("cannot write the line index cache") == 1, caplog.text
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_converter_accounting(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(_line(0) + "\n" + '{"class_id": 1, "tokens": [1, 2]}\n' + "not json\n" + _line(3) + "\n")
    m = convert(str(src), str(tmp_path / "out"), GRID, K, samples_per_shard=10)
    acc = m["accounting"]
    assert acc == {"images_seen": 4, "images_written": 2, "images_skipped": 2, "samples_written": 2}
    assert sorted(s["src"] for s in m["skipped"]) == ["line 2", "line 3"]
    assert load_manifest(str(tmp_path / "out"))["num_samples"] == 2
    with pytest.raises(ShardError, match="already holds shards"):
        convert(str(src), str(tmp_path / "out"), GRID, K)


def test_jsonl_messages_name_the_file_line(tmp_path):
    """Blank lines are skipped, but messages give the line number in the file (what an editor shows); the
    cached index is rebuilt when the file changes."""
    from rear_ds.data.jsonl import JsonlSource, line_index

    src = tmp_path / "x.jsonl"
    src.write_text("\n" + _line(0) + "\n\n\n" + "not json\n" + _line(1) + "\n")
    m = convert(str(src), str(tmp_path / "out"), GRID, K, samples_per_shard=10)
    assert [s["src"] for s in m["skipped"]] == ["line 5"]
    offsets, numbers = line_index(str(src))  # the cached index, read back
    assert numbers.tolist() == [2, 5, 6] and offsets[0] == 1 and offsets[1] == len(_line(0)) + 4
    src.write_text("\n\nnot json\n")
    with pytest.raises(ConfigError, match=r"x.jsonl line 3: not a"):
        JsonlSource(str(src), ModelConfig(num_tokens=GRID[0] * GRID[1], codebook_size=K))


def test_converter_refuses_output_with_no_samples(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text('{"class_id": 2.9, "tokens": [1]}\n{"class_id": -1, "tokens": [1]}\n'
                   '{"class_id": "3", "tokens": [1]}\n' + _line(0) + "\n")
    with pytest.raises(ShardError, match=r"no line could be converted \(4 skipped.*--grid 1x1"):
        convert(str(src), str(tmp_path / "out"), (1, 1), K)  # the last line has 16 tokens, not 1
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith("shard-")]  # nothing left behind
    m = convert(str(src), str(tmp_path / "out"), GRID, K)
    reasons = sorted(s["reason"] for s in m["skipped"])
    assert m["accounting"]["images_written"] == 1 and len(reasons) == 3
    assert sum("must be JSON integers" in r for r in reasons) == 2 and any("class_id -1 is negative" in r for r in reasons)


@pytest.mark.parametrize("order", ORDERS)
def test_bench_reader_smoke(data, order):
    from rear_ds.data.bench import bench_reader

    assert bench_reader(str(data / "shards"), micro_batch_size=8, num_workers=0, batches=3, warmup=1, order=order) > 0
