"""The training reader: exact resume, rank disjointness, corrupt shards, manifest checks, JSONL."""
import json
import logging
import os

import pytest

from rear_ds.config import ConfigError, DataConfig, ModelConfig
from rear_ds.data import build_train_loader
from rear_ds.data.jsonl import convert
from rear_ds.data.reader import ReaderStateError
from rear_ds.data.shards import ShardError, load_manifest

GRID, K, C = (4, 4), 64, 10
MODEL = ModelConfig(codebook_size=K, num_tokens=16, num_classes=C)


def _line(i):
    # tokens encode the line id (base 64 digits) so every sample is identifiable in a batch
    toks = [(i >> (6 * d)) % K for d in range(3)] + [i % 7] * 13
    return json.dumps({"class_id": i % C, "tokens": toks})


def sample_id(tokens_row):
    t = [int(x) for x in tokens_row[:3]]
    return t[0] + (t[1] << 6) + (t[2] << 12)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    jsonl = root / "tok.jsonl"
    jsonl.write_text("\n".join(_line(i) for i in range(250)) + "\n")
    convert(str(jsonl), str(root / "shards"), GRID, K, samples_per_shard=50)  # 5 shards (uneven over 2 ranks)
    return root


def loader(path, rank=0, world=1, workers=0, batch=8, seed=3, **kw):
    cfg = DataConfig(shards=str(path), num_workers=workers, shuffle_buffer=16, **kw)
    return build_train_loader(cfg, MODEL, rank, world, seed, batch)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_shape_and_dtype(data):
    tokens, labels = next(loader(data / "shards"))
    assert tokens.shape == (8, 16) and labels.shape == (8,)
    assert str(tokens.dtype) == "torch.int64" and str(labels.dtype) == "torch.int64"
    ids = [sample_id(r) for r in tokens]
    assert all(labels[j].item() == ids[j] % C for j in range(8))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_batches(data, workers):
    a = loader(data / "shards", workers=workers)
    ref = take(a, 5)
    state = a.state_dict()
    ref += take(a, 9)  # crosses unit boundaries (50 samples per shard, 8 per batch)
    a.close()
    b = loader(data / "shards", workers=workers)
    b.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON
    got = take(b, 9)
    b.close()
    for (t1, y1), (t2, y2) in zip(ref[5:], got):
        assert (t1 == t2).all() and (y1 == y2).all()
    assert b.stats["samples_read"] == 14 * 8


def test_state_of_another_layout_is_refused(data):
    a = loader(data / "shards")
    next(a)
    with pytest.raises(ReaderStateError, match="seed"):
        loader(data / "shards", seed=4).load_state_dict(a.state_dict())


def test_two_ranks_disjoint_and_equal_batches(data):
    seen = []
    for rank in (0, 1):
        it = loader(data / "shards", rank=rank, world=2, workers=0)
        batches = take(it, 100)  # rank 1 holds 2 shards, rank 0 holds 3: both keep going
        assert len(batches) == 100
        seen.append({sample_id(r) for t, _ in batches for r in t})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    assert len(seen[0] | seen[1]) == 250  # together they cover the data


def test_ranks_get_equal_shares():
    from rear_ds.data.reader import make_units

    files = [("a", "a", 10), ("b", "b", 10), ("c", "c", 3)]
    units = [make_units(files, r, 2) for r in (0, 1)]
    assert [(u.name, u.start, u.count) for u in units[0]] == [("a", 0, 10), ("b", 0, 1)]
    assert [(u.name, u.start, u.count) for u in units[1]] == [("b", 1, 9), ("c", 0, 3)]
    # 7 shards on 8 ranks (and 9 on 8): every rank holds the same number of samples, to one
    for n_files in (7, 9, 65):
        files = [(f"s{i}", f"s{i}", 1000 if i < n_files - 1 else 37) for i in range(n_files)]
        shares = [sum(u.count for u in make_units(files, r, 8)) for r in range(8)]
        assert max(shares) - min(shares) <= 1 and sum(shares) == sum(n for _, _, n in files)
    with pytest.raises(ConfigError, match="rank 0 of 4 gets no token data"):
        make_units([("a", "a", 3)], 0, 4)  # 3 samples for 4 ranks


def test_every_sample_is_read_equally_often_whatever_its_shard_size(tmp_path):
    """Uniform draws of whole units: a sample of the 5-sample last shard is read as often as one of a
    50-sample shard (drawing units by size would read it a tenth as often)."""
    from collections import Counter

    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(_line(i) for i in range(105)) + "\n")
    convert(str(jsonl), str(tmp_path / "s"), GRID, K, samples_per_shard=50, shuffle_seed=-1)  # 50 + 50 + 5
    it = loader(tmp_path / "s", batch=5)
    counts = Counter(sample_id(r) for t, _ in take(it, 420) for r in t)  # 2100 samples, about 20 each
    last = sum(counts[i] for i in range(100, 105)) / 5
    rest = sum(counts[i] for i in range(100)) / 100
    assert 0.5 < last / rest < 2.0, (last, rest)


def test_shuffling_depends_on_seed(data):
    a = next(loader(data / "shards", seed=1))[0]
    b = next(loader(data / "shards", seed=2))[0]
    assert not (a == b).all()


def test_manifest_must_match_model(data):
    with pytest.raises(ConfigError, match=r"manifest.json.*codebook_size=64.*model.codebook_size=128"):
        build_train_loader(DataConfig(shards=str(data / "shards")), ModelConfig(codebook_size=128, num_tokens=16),
                           0, 1, 0, 4)
    with pytest.raises(ConfigError, match=r"num_tokens=16 disagrees with model.num_tokens=256"):
        build_train_loader(DataConfig(shards=str(data / "shards")), ModelConfig(codebook_size=64), 0, 1, 0, 4)


def _copy(src, dst):
    os.makedirs(dst)
    for n in os.listdir(src):
        with open(os.path.join(src, n), "rb") as f, open(os.path.join(dst, n), "wb") as g:
            g.write(f.read())


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_shard_is_skipped_and_counted(data, tmp_path, caplog, damage):
    d = tmp_path / "s"
    _copy(data / "shards", d)
    bad = d / "shard-000002.tar"
    raw = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(raw[: len(raw) // 2])
    else:  # same size, a tar header in the middle overwritten
        bad.write_bytes(raw[:20480] + b"\xff" * 1024 + raw[20480 + 1024:])
    it = loader(d, workers=0)
    with caplog.at_level(logging.WARNING):
        batches = take(it, 60)  # > 250 samples: every shard gets drawn
    assert it.stats["corrupt_shards_skipped"] == 1 and it.stats["corrupt_shards"] == ["shard-000002.tar"]
    assert "shard-000002.tar" in caplog.text
    assert len(batches) == 60 and all(t.shape == (8, 16) for t, _ in batches)
    with pytest.raises(ShardError, match="shard-000002.tar.*on_corrupt_shard=error"):
        take(loader(d, workers=0, on_corrupt_shard="error"), 60)


def test_read_errors_are_retried_without_changing_the_stream(data, monkeypatch):
    """An OS-level read failure (EIO, an NFS timeout) is retried from where it stopped: the same batches as
    without it. A shard that keeps failing is skipped like a corrupt one."""
    import rear_ds.data.reader as R
    from rear_ds.data.shards import ShardReadError

    monkeypatch.setattr(R.time, "sleep", lambda s: None)
    ref = take(loader(data / "shards"), 12)
    fails = []

    def flaky(real, always=None):
        def read(unit, skip=0):
            for i, x in enumerate(real(unit, skip)):
                if (i == 20 and len(fails) < 2) or unit.name == always:
                    fails.append(unit.name)
                    raise ShardReadError(f"{unit.name}: [Errno 5] Input/output error")
                yield x
        return read

    it = loader(data / "shards")
    it.source.read = flaky(it.source.read)
    got = take(it, 12)
    assert len(fails) == 2 and it.stats["corrupt_shards_skipped"] == 0
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(ref, got))
    fails.clear()
    fails += ["x", "x"]  # no transient failures this time
    it = loader(data / "shards")
    it.source.read = flaky(it.source.read, always="shard-000001.tar")
    take(it, 60)
    assert it.stats["corrupt_shards"] == ["shard-000001.tar"] and fails.count("shard-000001.tar") == R.READ_ATTEMPTS


def test_jsonl_reader_and_resume(data):
    cfg = DataConfig(jsonl=str(data / "tok.jsonl"), num_workers=0, shuffle_buffer=16)
    a = build_train_loader(cfg, MODEL, 0, 1, 0, 8)
    ref = take(a, 3)
    state = a.state_dict()
    ref += take(a, 3)
    b = build_train_loader(cfg, MODEL, 0, 1, 0, 8)
    b.load_state_dict(state)
    for (t1, _), (t2, _) in zip(ref[3:], take(b, 3)):
        assert (t1 == t2).all()
    ids = {sample_id(r) for t, _ in ref for r in t}
    assert len(ids) == 48  # no repeats within the first pass
    with pytest.raises(ConfigError, match="model.num_tokens=256"):
        build_train_loader(cfg, ModelConfig(codebook_size=64), 0, 1, 0, 8)


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


def test_bench_reader_smoke(data):
    from rear_ds.data.bench import bench_reader

    assert bench_reader(str(data / "shards"), micro_batch_size=8, num_workers=0, batches=3, warmup=1) > 0
