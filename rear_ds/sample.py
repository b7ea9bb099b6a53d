"""Generate N class-balanced samples into resumable chunk files: ``python -m rear_ds.sample``.

    python -m rear_ds.sample --checkpoint runs/L/export.safetensors --out-dir samples/L_g10 \\
        [--num-samples 50000] [--chunk-size 500] [--batch-size 50] [--guidance-scale 10 ...]

Checkpoints
  * an exported ``.safetensors`` (``python -m rear_ds.export``): the config is read from its metadata
    key "rear_config"; ``--config`` replaces it;
  * a DeepSpeed run folder, its ``checkpoints/`` folder, or one ``checkpoints/<tag>/`` folder: the tag is
    ``--tag``, else ``checkpoints/latest`` (also accepted as the path itself; complete checkpoints only); it is exported once to
    ``<out-dir>/model_<tag>.safetensors`` with ``rear_ds.export``; config from the tag's rear_config.json;
  * a released ``reAR-{S,B,L}.safetensors`` / ``.bin``: needs ``--config configs/<size>.yaml``.
  ``section.key=value`` overrides go after the flags (e.g. ``tokenizer.weights=/models/maskgit.bin``).

Class order (the reference's [0..C-1] repeated list): sample ``i`` has class ``i % C``; N must be a
multiple of C, so every class gets exactly N / C samples. Sample i's randomness depends only on
(seed, i) (``rear_ds.sampling.generate``), and batches never cross chunk boundaries, so the images do not
depend on how many processes or array tasks share the work.

Work split: chunks of ``--chunk-size`` indices, chunk k -> worker k % W. Workers are numbered
``task * P + rank`` (:mod:`rear_ds.launch`): P processes per task (torchrun/deepspeed, or an srun step), array
tasks from --task-id/--num-tasks (aliases --rank/--world-size, as slurm/sample.sh passes them) or Slurm's array
variables. No process group is created: workers never talk to each other.

Outputs in --out-dir: ``chunk_{k:06d}.npz`` (format in :mod:`rear_ds.evaluation.chunks`), written
atomically and skipped on rerun when complete and valid; ``manifest.json`` (checkpoint + sha256,
tokenizer, sampling settings, N, chunk size, seed, fingerprint), identical from every worker; a rerun
with other settings into the same folder is refused; ``logs/worker_XXXX_of_YYYY.json`` (per-worker
accounting: chunks skipped / written, images, images/s); with --inception-weights (or
$REAR_INCEPTION_WEIGHTS) ``inception/chunk_{k:06d}.npz``, the chunk's Inception features, which
``rear_ds.evaluate`` merges instead of recomputing (:mod:`rear_ds.evaluation.chunk_features`).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script (deepspeed/torchrun rear_ds/sample.py): make rear_ds importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import dataclasses
import hashlib
import json
import signal
import socket
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from rear_ds import cli, launch
from rear_ds.data.shards import write_json_atomic
from rear_ds.evaluation import chunk_features
from rear_ds.evaluation.chunks import chunk_name
from rear_ds.evaluation.safe_npz import load_npz
from rear_ds.models.weights import weights_sha256

FORMAT = "rear_ds.samples/v1"
MANIFEST = "manifest.json"
# What rear_ds.evaluate and a rerun rely on: (key, types, what it must be).
MANIFEST_ENTRIES = (("fingerprint", str, "a string"), ("num_samples", int, "a positive integer"),
                    ("chunk_size", int, "a positive integer"), ("num_classes", int, "a positive integer"),
                    ("seed", int, "an integer"), ("checkpoint", dict, "an object"), ("sampling", dict, "an object"))
# Test hook: SIGKILL this process after it has written this many chunks (simulates preemption).
KILL_AFTER_ENV = "REAR_SAMPLE_KILL_AFTER_CHUNKS"


class SampleError(RuntimeError):
    """Bad arguments, an unusable checkpoint, or an output folder holding another run."""


# --------------------------------------------------------------------------------------
# Checkpoint and config
# --------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    cfg: object  # rear_ds.config.Config
    weights: str  # a .safetensors / .bin file with the released key layout
    kind: str  # "exported", "released", "deepspeed"
    source: str  # what the user passed
    tag: str = ""
    config_source: str = ""


def _with_overrides(data: dict, overrides: list) -> object:
    from rear_ds.config import config_from_dict, parse_override

    data = json.loads(json.dumps(data))  # deep copy
    for text in overrides:
        keys, value = parse_override(text)
        cur = data
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = value
    return config_from_dict(data)


def _safetensors_metadata(path: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise SampleError(f"checkpoint {path!r} is not a readable safetensors file: {e}") from None


def _safetensors_config(path: str) -> Optional[dict]:
    meta = _safetensors_metadata(path)
    if "rear_config" not in meta:
        return None
    try:
        return json.loads(meta["rear_config"])
    except json.JSONDecodeError as e:
        raise SampleError(f"checkpoint {path!r}: metadata key 'rear_config' is not valid JSON: {e}") from None


def _export_deepspeed(path: str, tag: Optional[str], out_dir: str) -> tuple:
    """Export a DeepSpeed checkpoint once to ``<out_dir>/model_<tag>.safetensors``; -> (file, tag, config dir).

    Uses ``rear_ds.export`` (zero_to_fp32 under the hood; it reads the run's own checkpoint files, written
    by our trainer, never files from elsewhere). Each worker that finds no exported file exports it; the
    writers take turns on one locked temporary name (:mod:`rear_ds.tmpfile`), so concurrent array tasks
    are safe (if wasteful: export beforehand for big models) and a killed export leaves no file behind
    that the next one does not take over.
    """
    from rear_ds.export import ExportError, export, locate
    from rear_ds.training.checkpoint import read_meta

    try:
        ckpt_dir, tag = locate(path, tag or "")
    except ExportError as e:
        raise SampleError(f"DeepSpeed checkpoint {path!r}: {e}") from None
    out = os.path.join(out_dir, f"model_{tag}.safetensors")
    made_from = json.dumps(read_meta(os.path.join(ckpt_dir, tag)), sort_keys=True)
    stale = os.path.isfile(out) and _safetensors_metadata(out).get("source_complete") != made_from
    if stale:  # the tag was made again since (a roll-back): the old export, and its samples, would pass for it
        print(f"rear_ds.sample: {out} is not an export of the current {ckpt_dir}/{tag} (made again since): "
              f"exporting it again", file=sys.stderr)
    if stale or not os.path.isfile(out):  # the export replaces the file atomically
        try:
            export(ckpt_dir, out, dtype="fp32", tag=tag)
        except ExportError as e:
            raise SampleError(f"exporting DeepSpeed checkpoint {ckpt_dir}/{tag} failed: {e}") from None
    return out, tag, os.path.join(ckpt_dir, tag)


def resolve_checkpoint(path: str, config: Optional[str], overrides: list, tag: Optional[str],
                       out_dir: str) -> Checkpoint:
    """Find weights and config for any supported checkpoint kind (see module docstring)."""
    from rear_ds.config import load_config

    if not os.path.exists(path):
        raise SampleError(f"checkpoint {path!r} does not exist")
    if os.path.basename(path) == "latest" and os.path.isfile(path):  # checkpoints/latest: its folder
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        weights, tag, tag_dir = _export_deepspeed(path, tag, out_dir)
        if config:
            cfg, src = load_config(config, overrides), config
        else:  # the exported file carries the run's resolved config (rear_config.json of the tag)
            cfg, src = _with_overrides(_safetensors_config(weights), overrides), f"{tag_dir}/rear_config.json"
        return Checkpoint(cfg, weights, "deepspeed", os.path.abspath(path), tag, src)
    stored = _safetensors_config(path) if path.lower().endswith(".safetensors") else None
    if config:
        return Checkpoint(load_config(config, overrides), path, "exported" if stored else "released",
                          os.path.abspath(path), config_source=config)
    if stored is not None:
        return Checkpoint(_with_overrides(stored, overrides), path, "exported", os.path.abspath(path),
                          config_source=f"{path} metadata 'rear_config'")
    raise SampleError(f"checkpoint {path!r} carries no config (released reAR weights, or a file without the "
                      f"'rear_config' metadata key): pass --config configs/<size>.yaml")


# --------------------------------------------------------------------------------------
# Settings, manifest
# --------------------------------------------------------------------------------------


def sampling_settings(cfg, args) -> object:
    """The config's sampling section with the command-line flags applied, validated."""
    flags = {"guidance_scale": args.guidance_scale, "guidance_power": args.guidance_power,
             "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "kv_cache": args.kv_cache, "precision": args.precision, "batch_size": args.batch_size,
             "seed": args.seed}
    s = dataclasses.replace(cfg.sampling, **{k: v for k, v in flags.items() if v is not None})
    s.validate()
    return s


def build_manifest(ckpt: Checkpoint, ckpt_sha: str, tok_sha: str, settings, num_samples: int,
                   chunk_size: int, image_shape: tuple) -> dict:
    """The run description. ``fingerprint`` hashes everything that changes the images (not batch size)."""
    cfg = ckpt.cfg
    sampling = dataclasses.asdict(settings)
    tokenizer = cfg.tokenizer.architecture()  # not the weights path: tokenizer_sha256 identifies the weights
    identity = {"checkpoint_sha256": ckpt_sha, "tokenizer_sha256": tok_sha, "model": dataclasses.asdict(cfg.model),
                "tokenizer": tokenizer, "sampling": {k: v for k, v in sampling.items() if k != "batch_size"},
                "num_samples": num_samples, "chunk_size": chunk_size}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "checkpoint": {"path": ckpt.source, "kind": ckpt.kind, "tag": ckpt.tag, "weights_file": os.path.abspath(
            ckpt.weights), "sha256": ckpt_sha, "config_source": ckpt.config_source},
        "tokenizer": {"name": cfg.tokenizer.name, "weights": os.path.abspath(cfg.tokenizer.weights),
                      "sha256": tok_sha},
        "sampling": sampling,
        "seed": settings.seed,
        "num_samples": num_samples,
        "num_classes": cfg.model.num_classes,
        "samples_per_class": num_samples // cfg.model.num_classes,
        "class_order": "sample i has class i % num_classes ([0..C-1] repeated N/C times)",
        "chunk_size": chunk_size,
        "num_chunks": -(-num_samples // chunk_size),
        "chunk_files": "chunk_{k:06d}.npz holds indices [k*chunk_size, min(N, (k+1)*chunk_size))",
        "image_shape": list(image_shape),
        "config": cfg.to_dict(),
    }


def load_manifest(path: str) -> dict:
    """A manifest.json, checked for the entries that locate and identify the samples (named when wrong)."""
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SampleError(f"{path} is unreadable ({e})") from None
    if not isinstance(m, dict):
        raise SampleError(f"{path} holds a JSON {type(m).__name__}, not a {FORMAT} manifest (a JSON object)")
    wrong = [f"{k!r} is {repr(m[k]) if k in m else 'missing'}, expected {what}"
             for k, types, what in MANIFEST_ENTRIES if not isinstance(m.get(k), types) or isinstance(m.get(k), bool)
             or (what.startswith("a positive") and m[k] < 1)]
    if wrong:
        raise SampleError(f"{path} is not a usable {FORMAT} manifest: {'; '.join(wrong)}")
    return m


def write_or_check_manifest(out_dir: str, manifest: dict) -> None:
    """Write manifest.json if absent (atomically); refuse a folder whose manifest names another run."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(path):
        try:
            old = load_manifest(path)
        except SampleError as e:
            raise SampleError(f"{e}; remove it if the folder holds no valid chunks") from None
        if old.get("fingerprint") != manifest["fingerprint"]:
            diffs = [k for k in ("checkpoint", "tokenizer", "sampling", "num_samples", "chunk_size", "seed")
                     if json.dumps(old.get(k), sort_keys=True) != json.dumps(manifest[k], sort_keys=True)]
            raise SampleError(f"{out_dir!r} already holds samples of a different run (manifest fingerprint "
                              f"{str(old.get('fingerprint'))[:12]} != {manifest['fingerprint'][:12]}; differing "
                              f"entries: {', '.join(diffs) or 'model/tokenizer config'}). Use another --out-dir.")
        return
    write_json_atomic(path, manifest)


def read_manifest(samples_dir: str) -> dict:
    path = os.path.join(samples_dir, MANIFEST)
    if not os.path.isfile(path):
        raise SampleError(f"{path} does not exist: {samples_dir!r} was not written by `python -m rear_ds.sample`")
    return load_manifest(path)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def decode(tokenizer, tokens) -> np.ndarray:
    """Tokens -> uint8 (n, H, W, 3) images that do not depend on the process's CPU thread count.

    On the CPU the decoder's rounding depends on torch's intra-op thread count: how a parallel loop is split
    decides which elements take the vectorised or the scalar path of element-wise ops (SiLU), and the
    channels-last GroupNorm kernel reduces per thread. A last-bit difference flips a pixel at the uint8
    truncation (measured: 1 pixel of chunk 1 at 8 threads vs 1). So the CPU decode runs on one thread (a few
    percent of the sampling time); a GPU decode does not depend on the host's threads."""
    import torch
    from rear_ds.evaluation.references import to_uint8_hwc

    threads = torch.get_num_threads()
    if tokens.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return to_uint8_hwc(tokenizer.decode(tokens))
    finally:
        torch.set_num_threads(threads)


def sample_range(model, tokenizer, start: int, stop: int, num_classes: int, settings, device,
                 progress=None) -> tuple:
    """Images (uint8 (n, H, W, 3)), labels, indices and the generated tokens (n, N) for global indices
    start..stop-1, in batches."""
    import torch
    from rear_ds.sampling import generate

    images, token_list = [], []
    for s in range(start, stop, settings.batch_size):
        idx = torch.arange(s, min(stop, s + settings.batch_size), dtype=torch.long)
        labels = idx % num_classes
        tokens = generate(model, labels.to(device), idx, settings.seed, settings)
        token_list.append(tokens.cpu().numpy())
        images.append(decode(tokenizer, tokens.to(device)))
        if progress is not None:
            progress(images[-1].shape[0])
    indices = np.arange(start, stop, dtype=np.int64)
    return np.concatenate(images), indices % num_classes, indices, np.concatenate(token_list)


class ChunkFeatures:
    """The Inception features of this worker's chunks (:mod:`rear_ds.evaluation.chunk_features`) when weights are
    given, so that ``rear_ds.evaluate`` only merges them."""

    def __init__(self, out_dir: str, weights: Optional[str], batch_size: int, device, fingerprint: str):
        from rear_ds.evaluation.inception import InceptionFeatures, InceptionWeightsError

        self.out_dir, self.fp, self.written, self.extractor = out_dir, fingerprint, 0, None
        if weights:
            try:
                self.extractor = InceptionFeatures(weights, device=device, batch_size=batch_size)
            except InceptionWeightsError as e:
                raise SampleError(str(e)) from None

    def _chunk(self, k: int) -> dict:
        return load_npz(os.path.join(self.out_dir, chunk_name(k)), "sample chunk", keys=("images", "indices"))

    def stale(self, complete: list) -> list:
        """The chunks among ``complete`` whose stored features are missing or do not fit (named on stderr)."""
        if self.extractor is None:
            return []
        out = []
        for k in complete:
            d = self._chunk(k)
            _, why = chunk_features.read(chunk_features.features_path(self.out_dir, chunk_name(k)), d["indices"],
                                         self.fp, chunk_features.images_sha256(d["images"]), self.extractor.identity())
            if why:
                out.append(k)
                if why != "absent":
                    print(f"rear_ds.sample: recomputing the Inception features of {chunk_name(k)}: {why}",
                          file=sys.stderr)
        return out

    def write(self, k: int, images: Optional[np.ndarray] = None, indices: Optional[np.ndarray] = None) -> None:
        """Compute and store chunk ``k``'s features (from its file when ``images`` is None)."""
        if self.extractor is None:
            return
        if images is None:
            d = self._chunk(k)
            images, indices = d["images"], d["indices"]
        pool, logits = chunk_features.compute(self.extractor, images)
        chunk_features.write(chunk_features.features_path(self.out_dir, chunk_name(k)), pool, logits, indices,
                             self.fp, chunk_features.images_sha256(images), self.extractor)
        self.written += 1


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "python -m rear_ds.sample", "rear-sample")
    p.add_argument("--checkpoint", required=True,
                   help="exported .safetensors, DeepSpeed run/checkpoints/tag folder, or released weights")
    p.add_argument("--config", default=None, help="config YAML (required for released weights)")
    p.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: checkpoints/latest)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--num-samples", type=cli.positive_int, default=50_000)
    p.add_argument("--chunk-size", type=cli.positive_int, default=500, help="indices per chunk file (fixed for a run)")
    p.add_argument("--tokenizer-weights", default=None, help="overrides tokenizer.weights")
    p.add_argument("--task-id", "--rank", dest="task_id", type=int, default=None,
                   help="array task index (else SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)")
    p.add_argument("--num-tasks", "--world-size", dest="num_tasks", type=int, default=None,
                   help="number of array tasks (else SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--device", default=None, help="default: this process's GPU among those it sees (cuda:LOCAL_RANK "
                   "modulo their number) if available, else cpu")
    g = p.add_argument_group("sampling (default: the config's sampling section)")
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--guidance-power", type=float, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--kv-cache", dest="kv_cache", action="store_true", default=None)
    g.add_argument("--no-kv-cache", dest="kv_cache", action="store_false")
    g.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    g.add_argument("--batch-size", type=int, default=None, help="samples per forward (CFG doubles it)")
    g.add_argument("--seed", type=int, default=None)
    p.add_argument("--inception-weights", default=None,
                   help="also store the Inception features of every chunk (rear_ds.evaluate then merges them): "
                   "torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: $REAR_INCEPTION_WEIGHTS)")
    p.add_argument("--inception-batch-size", type=cli.positive_int, default=50,
                   help="Inception batch size (as rear_ds.evaluate's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p


def main(argv=None) -> int:
    from rear_ds.config import ConfigError
    from rear_ds.models.weights import WeightsError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (SampleError, ConfigError, WeightsError, OSError) as e:  # OSError: a full disk, a missing file
        print(f"rear_ds.sample: error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    import torch

    from rear_ds.backends import enable_fast_kernels
    from rear_ds.evaluation.chunks import chunk_is_complete, chunk_range, chunks_for_worker, num_chunks, write_chunk
    from rear_ds.evaluation.inception import ENV_VAR as INCEPTION_ENV
    from rear_ds.models import load_generator
    from rear_ds.models.tokenizers import build_tokenizer, tokenizer_weights_sha256

    try:
        me = launch.parse(task_id=args.task_id, num_tasks=args.num_tasks)
    except launch.LaunchError as e:
        raise SampleError(f"launch environment: {e}") from None
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    overrides = list(args.overrides)
    if args.tokenizer_weights:
        overrides.append(f"tokenizer.weights={args.tokenizer_weights}")
    ckpt = resolve_checkpoint(args.checkpoint, args.config, overrides, args.tag, out_dir)
    cfg = ckpt.cfg
    settings = sampling_settings(cfg, args)
    C, N, cs = cfg.model.num_classes, args.num_samples, args.chunk_size
    if N % C:
        raise SampleError(f"--num-samples {N} is not a multiple of the {C} classes: every class must get "
                          f"exactly N / C samples")
    device = torch.device(launch.local_device(me, args.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    enable_fast_kernels()  # TF32 for the fp32 sampler, as the reference sample script allows

    ckpt_sha = weights_sha256(ckpt.weights)  # content hash: equal for concurrent exports
    if not cfg.tokenizer.weights or not os.path.isfile(cfg.tokenizer.weights):
        build_tokenizer(cfg.tokenizer, load_weights=True)  # raises the "which file where" error
    tok_sha = tokenizer_weights_sha256(cfg.tokenizer.weights)
    size = cfg.tokenizer.image_size
    manifest = build_manifest(ckpt, ckpt_sha, tok_sha, settings, N, cs, (size, size, 3))
    write_or_check_manifest(out_dir, manifest)
    fp = manifest["fingerprint"]

    total = num_chunks(N, cs)
    mine = chunks_for_worker(total, me.worker, me.workers)
    todo, skipped, replaced = [], 0, []
    for k in mine:
        start, stop = chunk_range(k, cs, N)
        ok, why = chunk_is_complete(os.path.join(out_dir, chunk_name(k)), start, stop, C, fp, (size, size, 3))
        if ok:
            skipped += 1
        else:
            todo.append(k)
            if why != "absent":
                replaced.append(f"{chunk_name(k)}: {why}")
    for r in replaced:
        print(f"rear_ds.sample: regenerating {r}", file=sys.stderr)
    print(f"rear_ds.sample: worker {me.worker}/{me.workers} ({me.source}) on {device}: "
          f"{len(mine)} of {total} chunks are mine, {skipped} already complete, {len(todo)} to do",
          file=sys.stderr, flush=True)
    weights = (args.inception_weights or os.environ.get(INCEPTION_ENV, "")) if mine else ""
    features = ChunkFeatures(out_dir, weights, args.inception_batch_size, device, fp)
    stale = features.stale([k for k in mine if k not in todo])

    stats = {"worker": me.worker, "num_workers": me.workers, "worker_source": me.source,
             "host": socket.gethostname(), "device": str(device), "fingerprint": fp,
             "chunks_assigned": len(mine), "chunks_skipped_complete": skipped, "chunks_regenerated_invalid":
             len(replaced), "chunks_written": 0, "images_generated": 0, "seconds": 0.0,
             "inception_features": "on" if features.extractor else "off (no --inception-weights)"}
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    t0 = time.time()
    if todo:
        model = load_generator(ckpt.weights, cfg.model, device=device)
        tokenizer = build_tokenizer(cfg.tokenizer, load_weights=True, device=device)
        n_todo = sum(chunk_range(k, cs, N)[1] - chunk_range(k, cs, N)[0] for k in todo)
        bar = cli.progress(n_todo, f"sample w{me.worker}/{me.workers}", disable=args.no_progress)
        try:
            for k in todo:
                start, stop = chunk_range(k, cs, N)
                images, labels, indices, tokens = sample_range(model, tokenizer, start, stop, C, settings, device,
                                                                 progress=bar.update)
                write_chunk(os.path.join(out_dir, chunk_name(k)), images, labels, indices, fp, tokens)
                stats["chunks_written"] += 1
                stats["images_generated"] += int(images.shape[0])
                if kill_after and stats["chunks_written"] >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                features.write(k, images, indices)
        finally:
            bar.close()
    for k in stale:  # complete chunks whose features are missing or stale
        features.write(k)
    stats["inception_features_written"] = features.written
    stats["seconds"] = round(time.time() - t0, 3)
    stats["images_per_s"] = round(stats["images_generated"] / max(stats["seconds"], 1e-9), 3)
    log_path = os.path.join(out_dir, "logs", f"worker_{me.worker:04d}_of_{me.workers:04d}.json")
    write_json_atomic(log_path, stats, sort_keys=False)
    print(f"rear_ds.sample: worker {me.worker} done: wrote {stats['chunks_written']} chunks "
          f"({stats['images_generated']} images, {stats['images_per_s']} img/s), skipped {skipped}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
