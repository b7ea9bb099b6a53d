"""``python -m rear_ds.evaluate`` and rear_ds.evaluation: FID / IS / P-R with a test-made Inception (CPU).

The Inception weights are a randomly initialised torch-fidelity FeatureExtractorInceptionV3 saved by the
test (conv weights re-drawn with a ReLU gain so features do not vanish); nothing is downloaded, and every
socket connection attempt fails the test. Inception runs at 299x299 on the CPU, so image counts are tiny.
"""
import json
import os
import socket
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 10  # one sample per class of the tiny config (IS then has 10 splits of 1)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster than two fighting ones
    yield
    torch.set_num_threads(old)


def make_inception_weights(path: str) -> str:
    """A random torch-fidelity InceptionV3 state dict saved as a plain .pth (no download, no real weights)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from torch import nn

    def no_download(*a, **k):
        raise AssertionError("torch-fidelity tried to download its weights")

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", no_download), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None), \
            mock.patch.object(fe.torch, "load", lambda *a, **k: {}):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="x")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return make_inception_weights(str(tmp_path_factory.mktemp("inception") / "weights-inception-test.pth"))


@pytest.fixture(scope="module")
def extractor(inception):
    from rear_ds.evaluation.inception import InceptionFeatures

    return InceptionFeatures(inception, device="cpu", batch_size=10)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """A real sampling run of the tiny model: N samples in 3 chunks."""
    from test_sampling_cli import make_tiny_checkpoint

    base = tmp_path_factory.mktemp("samples")
    tiny = make_tiny_checkpoint(str(base / "ckpt"))
    out = str(base / "run")
    cmd = [sys.executable, "-m", "rear_ds.sample", "--checkpoint", tiny["ckpt"], "--out-dir", out,
           "--num-samples", str(N), "--chunk-size", "4", "--batch-size", "4", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in [k for k in env if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or k.startswith("SLURM_")]:
        env.pop(k)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    images = np.concatenate([np.load(os.path.join(out, f"chunk_{k:06d}.npz"))["images"] for k in range(3)])
    return {"dir": out, "images": images, **tiny}


@pytest.fixture(scope="module")
def feats(extractor, samples):
    """Inception features of the samples and of a brightness-shifted copy (computed once)."""
    shifted = np.clip(samples["images"].astype(np.int16) + 80, 0, 255).astype(np.uint8)
    return {"shifted": shifted, "f": extractor(samples["images"]), "f_shift": extractor(shifted)}


def test_frechet_matches_torch_fidelity():
    """Our symmetric-eigensolver FID (full and low-rank paths) equals torch-fidelity's formula."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from rear_ds.evaluation.stats import fid_from_features, fid_stats, frechet_distance

    rng = np.random.RandomState(0)
    for n in (12, 200):  # fewer and more samples than the 64 dimensions
        a, b = rng.randn(n, 64), rng.randn(50, 64) * 1.3 + 0.2
        (m1, s1), (m2, s2) = fid_stats(a), fid_stats(b)
        ref = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, False)
        ref = ref["frechet_inception_distance"]
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)
        assert fid_from_features(a, m2, s2) == pytest.approx(ref, rel=1e-6)


def test_fid_self_is_zero_and_shift_is_large(feats):
    from rear_ds.evaluation.stats import fid_from_features, fid_stats

    self_fid = fid_from_features(feats["f"][0], *fid_stats(feats["f"][0]))
    shift_fid = fid_from_features(feats["f"][0], *fid_stats(feats["f_shift"][0]))
    assert shift_fid > 1.0
    assert abs(self_fid) < 1e-6 * shift_fid


def test_evaluate_cli_end_to_end(samples, feats, inception, tmp_path):
    """ADM-style reference (arr_0 + mu/sigma): stored stats are used for FID, arr_0 for P/R; outputs complete."""
    from rear_ds.evaluate import main
    from rear_ds.evaluation.fid import evaluate_fid
    from rear_ds.evaluation.stats import fid_from_features, fid_stats

    mu_ref, sigma_ref = fid_stats(feats["f_shift"][0])
    ref = str(tmp_path / "VIRTUAL_test_ref.npz")
    np.savez(ref, arr_0=feats["shifted"], mu=mu_ref, sigma=sigma_ref)
    out = str(tmp_path / "eval")
    assert main(["--samples", samples["dir"], "--reference", ref, "--inception-weights", inception,
                 "--out", out, "--batch-size", "10"]) == 0

    adm = np.load(os.path.join(out, "samples_adm.npz"), allow_pickle=False)
    assert list(adm.keys()) == ["arr_0"]
    assert adm["arr_0"].dtype == np.uint8 and adm["arr_0"].shape == (N, 32, 32, 3)
    assert np.array_equal(adm["arr_0"], samples["images"])
    assert os.path.getsize(os.path.join(out, "samples_grid.png")) > 0

    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    assert r["metrics"]["fid"] == pytest.approx(fid_from_features(feats["f"][0], mu_ref, sigma_ref), rel=1e-6)
    assert r["metrics"]["inception_score_mean"] == pytest.approx(1.0)  # 10 splits of one sample each
    assert 0.0 <= r["metrics"]["precision"] <= 1.0 and 0.0 <= r["metrics"]["recall"] <= 1.0
    assert r["reference"]["kind"] == "adm_npz" and r["reference"]["fid_statistics"] == "stored mu/sigma"
    assert r["reference"]["prc_features"] == "computed from reference images"
    assert r["evaluator"]["torch_fidelity_version"] and r["evaluator"]["fid_feature_layer"] == "2048"
    assert r["evaluator"]["is_splits"] == 10 and r["evaluator"]["prc_neighborhood"] == 3
    assert r["num_samples"] == N and r["sampling"]["guidance_scale"] == 3.0 and r["seed"] == 42
    assert len(r["checkpoint"]["sha256"]) == 64
    acc = r["accounting"]
    assert (acc["chunks_expected"], acc["chunks_valid"], acc["samples_counted"], acc["samples_scored"]) == (3, 3, N, N)

    # The in-training helper gives the same number from the same stats file.
    assert evaluate_fid(samples["images"], ref, inception, device="cpu") == pytest.approx(r["metrics"]["fid"],
                                                                                          rel=1e-6)


def test_stored_stats_equal_computed_stats(samples, feats, extractor, tmp_path):
    """mu/sigma read from an npz give the same FID as statistics computed from the same images (a folder)."""
    from PIL import Image

    from rear_ds.evaluation.ref_stats import main as ref_stats_main
    from rear_ds.evaluation.ref_stats import reference_statistics
    from rear_ds.evaluation.references import open_reference
    from rear_ds.evaluation.stats import fid_from_features, fid_stats

    folder = tmp_path / "ref_images"
    folder.mkdir()
    for i, im in enumerate(feats["shifted"]):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    stats_path = str(tmp_path / "ref_stats.npz")
    assert ref_stats_main(["--reference", str(folder), "--out", stats_path,
                           "--inception-weights", extractor.weights_path, "--batch-size", "10"]) == 0
    assert ref_stats_main(["--reference", str(tmp_path / "nope"), "--out", stats_path,  # one line, no traceback
                           "--inception-weights", extractor.weights_path]) == 1
    from_file = reference_statistics(open_reference(stats_path), extractor, need_features=True)
    assert from_file["fid_source"] == "stored mu/sigma" and from_file["features"].shape == (N, 2048)
    computed = fid_stats(feats["f_shift"][0])
    fid_file = fid_from_features(feats["f"][0], from_file["mu"], from_file["sigma"])
    fid_computed = fid_from_features(feats["f"][0], *computed)
    assert fid_file == pytest.approx(fid_computed, rel=1e-9)


def test_missing_chunk_is_named(samples, inception, tmp_path, capsys):
    import shutil

    from rear_ds.evaluate import main

    broken = str(tmp_path / "broken")
    shutil.copytree(samples["dir"], broken)
    os.remove(os.path.join(broken, "chunk_000001.npz"))
    assert main(["--samples", broken, "--reference", broken, "--inception-weights", inception,
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "chunk_000001.npz (absent)" in err and "missing indices: 4-7" in err

    # bad input named before any work (a KeyError / TypeError traceback, or "range() arg 3 must not be zero", once)
    manifest = os.path.join(broken, "manifest.json")
    for text, expected in (("[]", "holds a JSON list, not a rear_ds.samples/v1 manifest"),
                           (json.dumps(dict(json.load(open(manifest)), num_samples="10")),
                            "'num_samples' is '10', expected a positive integer")):
        open(manifest, "w").write(text)
        assert main(["--samples", broken, "--reference", broken, "--inception-weights", inception,
                     "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert f"{manifest} " in err and expected in err, err
    with pytest.raises(SystemExit):
        main(["--samples", broken, "--reference", broken, "--out", str(tmp_path / "o"), "--batch-size", "0"])
    assert "argument --batch-size: '0' is not an integer >= 1" in capsys.readouterr().err
    assert main(["--samples", samples["dir"], "--reference", str(tmp_path / "nope.npz"), "--inception-weights",
                 inception, "--out", str(tmp_path / "o")]) == 1  # a wrong reference: found before the samples pass
    err = capsys.readouterr().err
    assert "nope.npz' does not exist" in err and "inception (samples)" not in err, err
    with pytest.raises(SystemExit):  # -1 dropped the last reference image (images[:-1])
        main(["--samples", broken, "--reference", broken, "--out", str(tmp_path / "o"), "--reference-limit", "-1"])
    assert "argument --reference-limit: '-1' is not an integer >= 0" in capsys.readouterr().err

    # a full disk while writing samples_adm.npz (the OS refuses files over 10 kB; a chunk's images are 12 kB):
    # one line naming the file (was a traceback naming none), no temporary file left
    import resource

    ref = str(tmp_path / "ref_features.npz")  # a statistics file holding features only (80 kB, written first)
    np.savez(ref, features=np.random.default_rng(0).random((10, 2048), dtype=np.float32))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, limit[1]))
    try:
        rc = main(["--samples", samples["dir"], "--reference", ref, "--inception-weights", inception,
                   "--out", str(tmp_path / "full")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    err = capsys.readouterr().err
    assert rc == 1 and f"cannot write {tmp_path / 'full' / 'samples_adm.npz'}: File too large" in err, err
    assert os.listdir(tmp_path / "full") == []


def test_missing_inception_weights_says_which_file(samples, tmp_path, monkeypatch, capsys):
    from rear_ds.evaluate import main

    monkeypatch.delenv("REAR_INCEPTION_WEIGHTS", raising=False)
    assert main(["--samples", samples["dir"], "--reference", samples["dir"], "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "weights-inception-2015-12-05-6726825d.pth" in err and "REAR_INCEPTION_WEIGHTS" in err
    missing = str(tmp_path / "nope.pth")
    assert main(["--samples", samples["dir"], "--reference", samples["dir"], "--out", str(tmp_path),
                 "--inception-weights", missing]) == 1
    assert missing in capsys.readouterr().err


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_pickles_are_refused(tmp_path):
    """A reference .npz with an object array and an Inception .pth with a code pickle: refused, never run."""
    from rear_ds.evaluation.inception import InceptionWeightsError, build_inception
    from rear_ds.evaluation.references import open_reference
    from rear_ds.evaluation.safe_npz import NpzError

    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil(str(marker))
    ref = str(tmp_path / "evil_ref.npz")
    np.savez(ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=evil, sigma=np.eye(2))
    with pytest.raises(NpzError, match="pickled"):
        open_reference(ref)
    weights = str(tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    torch.save({"Conv2d_1a_3x3.conv.weight": _Evil(str(marker))}, weights)
    with pytest.raises(InceptionWeightsError, match="refused"):
        build_inception(weights)
    assert not marker.exists()


def test_token_shard_reference_is_decoded(samples, tmp_path):
    """A token-shard set is decoded with the tokenizer into uint8 images (truncated), honouring --limit."""
    from rear_ds.config import load_config
    from rear_ds.data.shards import ShardWriter, shard_name
    from rear_ds.evaluation.references import open_reference
    from rear_ds.models.tokenizers import build_tokenizer

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [f"tokenizer.weights={samples['tok']}"])
    rng = np.random.RandomState(0)
    grids = rng.randint(0, 64, size=(5, 4, 4)).astype(np.uint16)
    folder = tmp_path / "shards"
    folder.mkdir()
    for s, part in enumerate((grids[:3], grids[3:])):
        w = ShardWriter(str(folder / shard_name(s)))
        for i, g in enumerate(part):
            w.add(f"{s:03d}{i:06d}_0", g, cls=i, view=0, src=f"img{i}")
        w.commit()
    ref = open_reference(str(folder), tokenizer_cfg=cfg.tokenizer, limit=4)
    assert ref.kind == "token_shards"
    images = np.concatenate(list(ref.iter_images(batch_size=3)))
    tok = build_tokenizer(cfg.tokenizer)
    with torch.no_grad():
        expected = (tok.decode(torch.from_numpy(grids[:4].astype(np.int64))).clamp(0, 1) * 255).byte()
    assert images.dtype == np.uint8 and images.shape == (4, 32, 32, 3)
    assert np.array_equal(images, expected.permute(0, 2, 3, 1).numpy())


def wandb_records(run_file: str) -> list:
    """The records of a W&B offline run file (``run-<id>.wandb``: a LevelDB-style log of 32 KiB blocks whose
    chunks are framed as crc32, length, type; after a 7-byte ":W&B" header), as protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, out, pos, buf = open(run_file, "rb").read(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_results_go_to_the_training_runs_wandb_offline(samples, inception, tmp_path, monkeypatch):
    """--wandb-run RUN_DIR resumes the training run's W&B run (its id and project) in offline mode, with no
    network: the metrics land in that run as eval/*; WANDB_MODE=disabled writes nothing."""
    import _socket
    import glob
    import shutil

    from rear_ds.evaluate import checkpoint_step, main
    from rear_ds.training.metrics import log_to_wandb_run, wandb_run_of

    def local_only(sock, address):  # W&B talks to its own local service process; nothing else may connect
        if sock.family == socket.AF_UNIX or address[0] in ("127.0.0.1", "localhost", "::1"):
            return _socket.socket.connect(sock, address)
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", local_only)
    run_dir = tmp_path / "train_run"
    run_dir.mkdir()
    (run_dir / "wandb_id").write_text("evaltest0001\n")
    (run_dir / "config.yaml").write_text("wandb:\n  enabled: true\n  project: rear_eval_test\n  mode: ''\n")
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=np.clip(samples["images"].astype(np.int16) + 40, 0, 255).astype(np.uint8))
    argv = ["--samples", samples["dir"], "--reference", ref, "--inception-weights", inception, "--no-adm-npz",
            "--is-splits", "2", "--batch-size", "10", "--wandb-run", str(run_dir)]
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(argv + ["--out", str(tmp_path / "eval")]) == 0
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert results["wandb"] == {"id": "evaltest0001", "project": "rear_eval_test", "mode": "offline"}

    def logged_runs(folder) -> list:
        """[(run id, project, {key: value} of its history)] of the offline runs in a run folder."""
        out = []
        for run_file in glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb")):
            records = wandb_records(run_file)
            run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
            history = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}
            out.append((run.run_id, run.project, history))
        return out

    [(run_id, project, logged)] = logged_runs(run_dir)
    assert (run_id, project) == ("evaltest0001", "rear_eval_test")
    assert logged["eval/fid"] == pytest.approx(results["metrics"]["fid"], rel=1e-9) and logged["eval/fid"] > 1
    assert logged["eval/inception_score_mean"] == pytest.approx(results["metrics"]["inception_score_mean"])
    assert logged["eval/num_samples"] == N and logged["eval/recall"] == pytest.approx(results["metrics"]["recall"])
    assert "train/step" not in logged and checkpoint_step(samples["ckpt"]) is None  # no step in this file's metadata
    # A checkpoint with its step: the values are plotted against the training step.
    other = tmp_path / "other_run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("wandb"))
    log_to_wandb_run(wandb_run_of(str(other)), {"fid": 7.5}, 1234, "eval")
    [(run_id, _, logged)] = logged_runs(other)
    assert run_id == "evaltest0001" and (logged["eval/fid"], logged["train/step"]) == (7.5, 1234)

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(argv + ["--out", str(tmp_path / "eval2")]) == 0
    assert json.load(open(tmp_path / "eval2" / "results.json"))["wandb"]["mode"] == "disabled"
    assert len(glob.glob(str(run_dir / "wandb" / "offline-run-*"))) == 1  # nothing new written

    (run_dir / "wandb_id").unlink()  # not a W&B run: a clear error before any work
    assert main(argv + ["--out", str(tmp_path / "eval3")]) == 1
    assert not os.path.exists(tmp_path / "eval3")


def test_checkpoint_step_comes_from_the_exported_metadata(tmp_path):
    from rear_ds.evaluate import checkpoint_step
    from rear_ds.models.weights import save_safetensors

    path = str(tmp_path / "m.safetensors")
    save_safetensors({"w": torch.zeros(2)}, path, metadata={"step": "1234"})
    assert checkpoint_step(path) == 1234
    save_safetensors({"w": torch.zeros(2)}, path, metadata={"step": ""})  # an export of an unknown step
    assert checkpoint_step(path) is None
    assert checkpoint_step(str(tmp_path / "gone.safetensors")) is None


def test_batch_script_array_makes_every_chunk_and_its_features(samples, feats, inception, extractor, tmp_path,
                                                                capsys):
    """Issue 20 item 10 + issue 16 item 2 (sharded evaluation), through slurm/sample.sh with the environment of
    `sbatch --ntasks=4 --array=0-1` and no srun (SLURM_PROCID=0, SLURM_NTASKS=4 in each batch script): every
    chunk is made (each task used to take itself for process 0 of 4: 1 of 3 chunks) with its Inception features;
    rear_ds.evaluate merges them into the metrics of a single pass. Stored features that are absent or come from
    other Inception weights are recomputed and named, never mixed in."""
    from rear_ds.evaluate import main
    from rear_ds.evaluation import chunk_features as cf
    from rear_ds.evaluation.stats import fid_from_features, fid_stats, inception_score, precision_recall, save_ref_stats

    out = str(tmp_path / "array")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE",
                                                                                          "LOCAL_RANK")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable,
               REAR_INCEPTION_WEIGHTS=inception, SLURM_JOB_ID="77", SLURM_NTASKS="4", SLURM_NPROCS="4",
               SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_COUNT="2")
    cmd = ["bash", "slurm/sample.sh", "--checkpoint", samples["ckpt"], "--out-dir", out, "--num-samples", str(N),
           "--chunk-size", "4", "--batch-size", "4", "--inception-batch-size", "10", "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, SLURM_ARRAY_TASK_ID=str(t)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for t in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "SLURM_NTASKS=4 outside an srun step" in err
    names = [f"chunk_{k:06d}.npz" for k in range(3)]
    assert sorted(n for n in os.listdir(out) if n.startswith("chunk_")) == names
    assert sorted(os.listdir(os.path.join(out, cf.FEATURES_DIR))) == names
    got = np.concatenate([np.load(os.path.join(out, n))["images"] for n in names])
    assert got.tobytes() == samples["images"].tobytes()  # the same images as the single-process run

    ref = str(tmp_path / "ref_stats.npz")  # half of the samples and half of their shifted copies: P/R inside (0, 1)
    ref_features = np.concatenate([feats["f"][0][:5], feats["f_shift"][0][5:]]).astype(np.float32)
    save_ref_stats(ref, *fid_stats(ref_features), features=ref_features)

    def evaluate(name):
        assert main(["--samples", out, "--reference", ref, "--inception-weights", inception, "--out",
                     str(tmp_path / name), "--batch-size", "10", "--is-splits", "2", "--no-adm-npz"]) == 0
        with open(tmp_path / name / "results.json") as f:
            return json.load(f)

    merged = evaluate("merged")
    assert merged["accounting"]["chunks_features_from_sampler"] == 3
    # the unsharded evaluation: the same formulas on the features of all samples from one pass (one batch of 10)
    pool, logits = (f.astype(np.float32) for f in feats["f"])
    stored = [cf.read(cf.features_path(out, names[k]), np.arange(4 * k, min(N, 4 * k + 4)),
                      merged["samples_fingerprint"], cf.images_sha256(samples["images"][4 * k:4 * k + 4]),
                      extractor.identity())[0] for k in range(3)]
    np.testing.assert_allclose(np.concatenate([p for p, _ in stored]), pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([lg for _, lg in stored]), logits, rtol=1e-5, atol=1e-6)
    whole = {"fid": fid_from_features(pool, *fid_stats(ref_features))}
    whole["inception_score_mean"], whole["inception_score_std"] = inception_score(logits, 2)
    whole["precision"], whole["recall"] = precision_recall(pool, ref_features, 3)
    assert set(merged["metrics"]) == set(whole) and 0 < whole["recall"] < 1
    for k, v in whole.items():  # equal to the last bit when measured; 1e-6 is the stated tolerance
        assert merged["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k

    # chunk 0's features gone, chunk 1's made with other weights (its file says so), chunk 2's with a crafted
    # 'extractor' entry (JSON, not an object: an AttributeError once): all recomputed and named
    os.remove(cf.features_path(out, names[0]))
    path2 = cf.features_path(out, names[2])
    np.savez(path2, **dict(np.load(path2), extractor=np.array("[]")))
    path1 = cf.features_path(out, names[1])
    d = dict(np.load(path1))
    made_by = json.loads(str(d["extractor"]))
    d["extractor"] = np.array(json.dumps(dict(made_by, inception_weights_sha256="0" * 64)))
    d["pool"] = d["pool"] + 1.0  # features that must not reach the metrics
    np.savez(path1, **d)
    mixed = evaluate("mixed")
    acc = mixed["accounting"]
    assert (acc["chunks_features_from_sampler"], acc["chunks_features_computed"]) == (0, 3)
    assert acc["features_recomputed"] == [f"{names[1]}: made by another Inception: inception_weights_sha256 "
                                          f"{'0' * 64} != {made_by['inception_weights_sha256']}",
                                          f"{names[2]}: unreadable (key 'extractor' holds '[]', not a JSON object)"]
    for k, v in whole.items():
        assert mixed["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k

    # a sampler rerun with the weights makes no image, only the features that are missing or stale
    from rear_ds.sample import main as sample_main

    capsys.readouterr()
    assert sample_main(cmd[2:] + ["--inception-weights", inception]) == 0
    err = capsys.readouterr().err
    assert f"recomputing the Inception features of {names[1]}: made by another Inception" in err
    assert f"recomputing the Inception features of {names[2]}: unreadable" in err
    assert "3 already complete, 0 to do" in err
    for n in names:
        d = np.load(os.path.join(out, n))
        stored, why = cf.read(cf.features_path(out, n), d["indices"], merged["samples_fingerprint"],
                              cf.images_sha256(d["images"]), extractor.identity())
        assert why == "" and np.array_equal(stored[0], cf.compute(extractor, d["images"])[0]), n
