"""``python -m rear_ds.sample``: chunked, resumable, worker-count-independent sampling (CPU, tiny model).

Sampling runs are subprocesses (the real CLI) with one CPU thread each, so that the images do not
depend on the pytest process's thread settings.
"""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, CHUNK, BATCH = 40, 6, 4  # 10 classes x 4; 7 chunks (the last holds 4); batches of 4 + 2 inside a chunk


def make_tiny_checkpoint(folder: str, with_config: bool = True) -> dict:
    """Random tiny generator (.safetensors, config in metadata) + random toy tokenizer weights."""
    from rear_ds.config import config_json, load_config
    from rear_ds.models.generator import ReARGenerator
    from rear_ds.models.tokenizers import build_tokenizer
    from rear_ds.models.weights import save_safetensors

    os.makedirs(folder, exist_ok=True)
    tok_path = os.path.join(folder, "tok.safetensors")
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [f"tokenizer.weights={tok_path}"])
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.tokenizer, load_weights=False)
    save_safetensors(tok.state_dict(), tok_path)
    model = ReARGenerator(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    ckpt = os.path.join(folder, "model.safetensors")
    save_safetensors(model.inference_state_dict(), ckpt,
                     metadata={"rear_config": config_json(cfg)} if with_config else None)
    return {"cfg": cfg, "ckpt": ckpt, "tok": tok_path}


def sample_cmd(ckpt, out_dir, *extra, n=N):
    return [sys.executable, "-m", "rear_ds.sample", "--checkpoint", ckpt, "--out-dir", out_dir,
            "--num-samples", str(n), "--chunk-size", str(CHUNK), "--batch-size", str(BATCH), "--no-progress",
            *extra]


def env(**extra):
    e = {k: v for k, v in os.environ.items()  # a suite run inside a Slurm job must not split the work
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith("SLURM_")}
    e.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return e


def run(cmd, **extra):
    return subprocess.run(cmd, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=300)


def chunk_files(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("chunk_") and n.endswith(".npz"))


def assert_same_chunks(a, b):
    names = chunk_files(a)
    assert names == chunk_files(b) == [f"chunk_{k:06d}.npz" for k in range(-(-N // CHUNK))]
    for n in names:
        x, y = np.load(os.path.join(a, n)), np.load(os.path.join(b, n))
        for key in ("images", "labels", "indices", "fingerprint", "tokens"):
            assert np.array_equal(x[key], y[key]), (n, key)
        assert x["images"].tobytes() == y["images"].tobytes()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_ckpt")))


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    """One uninterrupted single-process run: the images every other run must reproduce byte for byte."""
    out = str(tmp_path_factory.mktemp("ref_run"))
    res = run(sample_cmd(tiny["ckpt"], out))
    assert res.returncode == 0, res.stderr
    return out


def test_chunk_format_and_class_order(tiny, reference_run):
    import json

    from rear_ds.evaluation.chunks import gather_chunks
    from rear_ds.evaluation.references import to_uint8_hwc
    from rear_ds.models.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(tiny["cfg"].tokenizer)

    with open(os.path.join(reference_run, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["num_samples"] == N and manifest["chunk_size"] == CHUNK and manifest["seed"] == 42
    assert manifest["sampling"]["guidance_scale"] == 3.0 and manifest["sampling"]["kv_cache"] is True
    assert len(manifest["checkpoint"]["sha256"]) == 64 and manifest["checkpoint"]["kind"] == "exported"
    labels = []
    for n in chunk_files(reference_run):
        d = np.load(os.path.join(reference_run, n), allow_pickle=False)
        assert d["images"].dtype == np.uint8 and d["images"].shape[1:] == (32, 32, 3)
        assert np.array_equal(d["labels"], d["indices"] % 10)
        # the generated tokens travel with their images (token round-trip diagnostic): they decode to them
        assert d["tokens"].dtype == np.int32 and d["tokens"].shape == (len(d["labels"]), tiny["cfg"].model.num_tokens)
        decoded = to_uint8_hwc(tokenizer.decode(torch.from_numpy(d["tokens"]).long()))
        assert np.abs(decoded.astype(int) - d["images"].astype(int)).max() <= 1  # thread-count rounding only
        labels.append(d["labels"])
    labels = np.concatenate(labels)
    assert np.array_equal(np.bincount(labels), np.full(10, N // 10))  # exactly N / C per class
    g = gather_chunks(reference_run, N, CHUNK, 10, manifest["fingerprint"])
    assert g.accounting["samples_counted"] == N and g.accounting["chunks_valid"] == 7


def test_two_processes_match_one(tiny, reference_run, tmp_path):
    """Two workers (torchrun-style RANK/WORLD_SIZE) split the chunks round-robin; images are identical."""
    import json

    out = str(tmp_path / "two")
    procs = [subprocess.Popen(sample_cmd(tiny["ckpt"], out), cwd=ROOT, env=env(RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert_same_chunks(reference_run, out)
    for w, expected in ((0, 4), (1, 3)):  # chunks 0,2,4,6 and 1,3,5
        with open(os.path.join(out, "logs", f"worker_{w:04d}_of_0002.json")) as f:
            assert json.load(f)["chunks_written"] == expected


def test_killed_run_resumes_without_redoing(tiny, reference_run, tmp_path):
    import json

    out = str(tmp_path / "killed")
    res = run(sample_cmd(tiny["ckpt"], out), REAR_SAMPLE_KILL_AFTER_CHUNKS="2")
    assert res.returncode == -signal.SIGKILL
    assert chunk_files(out) == ["chunk_000000.npz", "chunk_000001.npz"]
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in chunk_files(out)}
    # Damage of the kind a crash or a bad copy leaves: a killed writer's scratch folder (rear_ds.tmpfile: its
    # lock died with it) holding half a chunk, and a chunk with wrong content.
    os.makedirs(os.path.join(out, "chunk_000003.npz.tmp"))
    for name in ("lock", "chunk_000003.npz"):
        open(os.path.join(out, "chunk_000003.npz.tmp", name), "wb").write(b"partial")
    shutil.copy(os.path.join(out, "chunk_000000.npz"), os.path.join(out, "chunk_000002.npz"))

    # The rerun starts while another writer of chunk 5 (two array tasks on one chunk after a requeue) is inside
    # write_npz_atomic with its temporary file made. The rerun used to delete that file at start-up, and the
    # other writer then died in os.replace (FileNotFoundError); now the rerun waits for its lock.
    from rear_ds.evaluation.safe_npz import write_npz_atomic

    rerun = {}

    def start_rerun():
        rerun["p"] = subprocess.Popen(sample_cmd(tiny["ckpt"], out), cwd=ROOT, env=env(), text=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rerun["start"] = ""
        for line in rerun["p"].stderr:  # wait until it is past its start-up
            rerun["start"] += line
            if "chunks are mine" in line:
                return
        raise AssertionError("the rerun ended before it listed its chunks")

    with np.load(os.path.join(reference_run, "chunk_000005.npz")) as d:
        chunk5 = dict(d)
    write_npz_atomic(os.path.join(out, "chunk_000005.npz"), **dict(chunk5, images=_Converted(chunk5["images"],
                                                                                            start_rerun)))
    _, err = rerun["p"].communicate(timeout=300)
    assert rerun["p"].returncode == 0, err
    assert "regenerating chunk_000002.npz" in rerun["start"] + err
    for n, t in before.items():
        assert os.stat(os.path.join(out, n)).st_mtime_ns == t, f"{n} was redone"
    with open(os.path.join(out, "logs", "worker_0000_of_0001.json")) as f:
        log = json.load(f)
    assert log["chunks_skipped_complete"] == 2 and log["chunks_written"] == 5
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert_same_chunks(reference_run, out)


class _Converted:
    """An array that runs ``hook`` when np.savez converts it, i.e. after the writer has made its temporary file."""

    def __init__(self, array, hook):
        self.array, self.hook = array, hook

    def __array__(self, dtype=None, copy=None):
        self.hook()
        return self.array


def main_in_process(cmd, capsys):
    """Run the CLI's main() here (for runs that stop before sampling: no subprocess start-up cost)."""
    from rear_ds.sample import main

    capsys.readouterr()
    rc = main(cmd[3:])
    return rc, capsys.readouterr().err


def test_images_do_not_depend_on_the_callers_thread_count(tiny, reference_run, tmp_path, capsys):
    """Worker 1 of 3 (chunks 1 and 4) in this process, after other runs, at 5 and 8 CPU threads: the bytes of
    the fresh one-thread process. Before the CPU decode was pinned to one thread, 8 threads changed one pixel
    of chunk 1 and 5 threads one of chunk 4 (the decoder's rounding follows the thread split)."""
    threads = torch.get_num_threads()
    try:
        for n in (5, 8):
            torch.set_num_threads(n)
            out = str(tmp_path / f"threads{n}")
            rc, err = main_in_process(sample_cmd(tiny["ckpt"], out, "--task-id", "1", "--num-tasks", "3"), capsys)
            assert rc == 0, err
            assert torch.get_num_threads() == n  # the caller's setting is left alone
            assert chunk_files(out) == ["chunk_000001.npz", "chunk_000004.npz"]
            for name in chunk_files(out):
                got, want = np.load(os.path.join(out, name)), np.load(os.path.join(reference_run, name))
                assert got["images"].tobytes() == want["images"].tobytes(), (n, name)
                assert np.array_equal(got["tokens"], want["tokens"]), (n, name)
    finally:
        torch.set_num_threads(threads)


def test_other_settings_refused_in_same_folder(tiny, reference_run, capsys):
    rc, err = main_in_process(sample_cmd(tiny["ckpt"], reference_run, "--guidance-scale", "5.0"), capsys)
    assert rc == 1 and "different run" in err and "sampling" in err


def test_bad_arguments(tiny, tmp_path, capsys):
    rc, err = main_in_process(sample_cmd(tiny["ckpt"], str(tmp_path / "a"), n=45), capsys)
    assert rc == 1 and "not a multiple of the 10 classes" in err
    bare = make_tiny_checkpoint(str(tmp_path / "bare"), with_config=False)
    rc, err = main_in_process(sample_cmd(bare["ckpt"], str(tmp_path / "b")), capsys)
    assert rc == 1 and "pass --config" in err
    rc, err = main_in_process(sample_cmd(tiny["ckpt"], str(tmp_path / "c"), "tokenizer.weights=/nope.bin"), capsys)
    assert rc == 1 and "/nope.bin" in err
    with pytest.raises(SystemExit):  # with Inception weights: a traceback at the first Inception batch, once
        main_in_process(sample_cmd(tiny["ckpt"], str(tmp_path / "d"), "--inception-batch-size", "0"), capsys)
    assert "argument --inception-batch-size: '0' is not an integer >= 1" in capsys.readouterr().err
    os.makedirs(tmp_path / "e")
    (tmp_path / "e" / "manifest.json").write_text("[]")  # was an AttributeError
    rc, err = main_in_process(sample_cmd(tiny["ckpt"], str(tmp_path / "e")), capsys)
    assert rc == 1 and f"{tmp_path / 'e' / 'manifest.json'} holds a JSON list" in err

    # A full disk, for real: the OS refuses files over 10 kB (the manifest fits, a chunk of 20 kB does not).
    # It was a traceback ending in "[Errno 27] File too large", naming no file.
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, limit[1]))
    try:
        rc, err = main_in_process(sample_cmd(tiny["ckpt"], str(tmp_path / "f"), n=10), capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    assert rc == 1 and f"cannot write {tmp_path / 'f' / 'chunk_000000.npz'}: File too large" in err, err
    assert sorted(os.listdir(tmp_path / "f")) == ["logs", "manifest.json"]  # no temporary file left


def test_gather_reports_missing_and_duplicates(reference_run, tmp_path):
    import json

    from rear_ds.evaluation.chunks import IncompleteSamplesError, gather_chunks

    out = str(tmp_path / "copy")
    shutil.copytree(reference_run, out)
    fp = json.load(open(os.path.join(out, "manifest.json")))["fingerprint"]
    os.remove(os.path.join(out, "chunk_000003.npz"))
    shutil.copy(os.path.join(out, "chunk_000001.npz"), os.path.join(out, "chunk_000009.npz"))
    with pytest.raises(IncompleteSamplesError) as e:
        gather_chunks(out, N, CHUNK, 10, fp)
    msg = str(e.value)
    assert "chunk_000003.npz (absent)" in msg and "18-23" in msg
    assert "6 in chunk_000001.npz and chunk_000009.npz" in msg


def test_crafted_pickle_in_chunk_is_refused(reference_run, tmp_path):
    """A chunk whose arrays are pickled objects is reported invalid; the pickle never runs."""
    import json

    from rear_ds.evaluation.chunks import IncompleteSamplesError, gather_chunks

    out = str(tmp_path / "evil")
    shutil.copytree(reference_run, out)
    fp = json.load(open(os.path.join(out, "manifest.json")))["fingerprint"]
    marker = tmp_path / "pwned"
    with np.load(os.path.join(out, "chunk_000000.npz")) as d:
        good = dict(d)
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil(str(marker))
    with open(os.path.join(out, "chunk_000000.npz"), "wb") as f:
        np.savez(f, images=good["images"], labels=evil, indices=good["indices"], fingerprint=good["fingerprint"])
    with pytest.raises(IncompleteSamplesError) as e:
        gather_chunks(out, N, CHUNK, 10, fp)
    assert "chunk_000000.npz" in str(e.value) and "pickled" in str(e.value)
    assert not marker.exists()


class _Evil:
    """Unpickling this would create a file (stands in for arbitrary code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_deepspeed_checkpoint_folder(tiny, reference_run, tmp_path, capsys):
    """checkpoints/latest of a run -> exported once via rear_ds.export; the same images per index."""
    import json

    from rear_ds.config import config_json
    from rear_ds.models.weights import read_state_dict

    tag_dir = tmp_path / "run" / "checkpoints" / "step_00000010"
    tag_dir.mkdir(parents=True)
    state = read_state_dict(tiny["ckpt"])  # a ZeRO-0 layout: the module weights whole in one file
    torch.save({"module": state}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / "rear_config.json").write_text(config_json(tiny["cfg"]))
    (tag_dir / "COMPLETE").write_text(json.dumps({"step": 10, "world_size": 1, "zero_stage": 0}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000010")
    out = str(tmp_path / "ds_samples")
    res = run(sample_cmd(str(tmp_path / "run" / "checkpoints" / "latest"), out, n=10))
    assert res.returncode == 0, res.stderr
    assert os.path.isfile(os.path.join(out, "model_step_00000010.safetensors"))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["checkpoint"]["kind"] == "deepspeed" and manifest["checkpoint"]["tag"] == "step_00000010"
    got = np.concatenate([np.load(os.path.join(out, n))["images"] for n in chunk_files(out)])
    want = np.concatenate([np.load(os.path.join(reference_run, n))["images"] for n in chunk_files(reference_run)])
    assert got.tobytes() == want[:10].tobytes()
    # The tag made again with other weights (training rolled back past it): exported again, so the folder's
    # samples are refused as another run's (the old export and the old samples passed for the new tag once)
    torch.save({"module": {k: v + 1 for k, v in state.items()}}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / "COMPLETE").write_text(json.dumps({"step": 10, "world_size": 1, "zero_stage": 0, "time": 2.0}))
    rc, err = main_in_process(sample_cmd(str(tmp_path / "run" / "checkpoints" / "latest"), out, n=10), capsys)
    assert rc == 1 and "exporting it again" in err and "already holds samples of a different run" in err, err
    (tag_dir / "COMPLETE").unlink()  # a partial checkpoint is never used
    rc, err = main_in_process(sample_cmd(str(tmp_path / "run"), str(tmp_path / "other"), n=10), capsys)
    assert rc == 1 and "COMPLETE" in err
